"""Reading and writing wav files as float32 numpy arrays (no torch here)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from audio_io.resample import resample

logger = logging.getLogger(__name__)

INT16_FULL_SCALE = 32768.0  # float ±1 ↔ int16


class AudioFileError(ValueError):
    """An audio file is missing, unreadable or empty."""


def read_mono(path: Path | str, target_rate_hz: int) -> np.ndarray:
    """Read any wav/flac/ogg file as float32 mono in ±1 at `target_rate_hz`.

    Stereo and multi-channel audio is averaged to mono (logged); other rates are
    resampled.
    """
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise AudioFileError(f"input audio {path} does not exist")
    try:
        data, rate_hz = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise AudioFileError(f"{path} is not a readable audio file ({err})") from err
    if data.shape[0] == 0:
        raise AudioFileError(f"{path} contains no audio samples")
    if data.shape[1] > 1:
        logger.info("%s has %d channels; mixing down to mono", path, data.shape[1])
    mono = data.mean(axis=1).astype(np.float32)  # (T,)
    if rate_hz != target_rate_hz:
        logger.info("%s: resampling %d Hz to %d Hz", path, rate_hz, target_rate_hz)
        mono = resample(mono, rate_hz, target_rate_hz)
    return mono


def write_pcm16(path: Path | str, samples: np.ndarray, rate_hz: int) -> None:
    """Write float samples in ±1 as 16-bit PCM mono (rounded, clipped)."""
    import soundfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = float_to_int16(samples)
    soundfile.write(str(path), pcm, rate_hz, subtype="PCM_16")


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    scaled = np.round(np.asarray(samples, dtype=np.float64) * INT16_FULL_SCALE)
    return np.clip(scaled, -INT16_FULL_SCALE, INT16_FULL_SCALE - 1).astype(np.int16)
