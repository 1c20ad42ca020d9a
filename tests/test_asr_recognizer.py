"""The pocketsphinx recognizer behind `eval tts` and `eval codec` is order-independent.

Before its front end was reset per utterance, transcribing a loud, noisy utterance first changed
the transcript of the next one ("of home" instead of "from home" below), so every WER depended on
what had been evaluated before it.
"""
from __future__ import annotations

import io
import subprocess
import wave

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
