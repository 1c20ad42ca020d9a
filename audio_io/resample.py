"""Sample-rate conversion at the edges of the system (polyphase, anti-aliased)."""
from __future__ import annotations

from math import gcd

import numpy as np


def resample(samples: np.ndarray, from_rate_hz: int, to_rate_hz: int) -> np.ndarray:
    """Resample float32 mono audio with a polyphase Kaiser-windowed filter.

    Output length is round(len * to / from).
    """
    if from_rate_hz <= 0 or to_rate_hz <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate_hz} → {to_rate_hz}")
    if from_rate_hz == to_rate_hz:
        return np.asarray(samples, dtype=np.float32)
    from scipy.signal import resample_poly

    common = gcd(from_rate_hz, to_rate_hz)
    out = resample_poly(np.asarray(samples, dtype=np.float64), to_rate_hz // common, from_rate_hz // common)
    target_len = int(round(len(samples) * to_rate_hz / from_rate_hz))
    return out[:target_len].astype(np.float32)
