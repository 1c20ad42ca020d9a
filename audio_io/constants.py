"""Audio constants of the whole system, in one place, derived rather than re-typed.

The model side is fixed by the checkpoints: the speech encoder's Kaldi fbank front end runs
at 16 kHz and consumes 160 ms per step; the codec writes 24 kHz. Devices run at their own
native rate (often 44.1 or 48 kHz) and are resampled to these at the edge.
"""
from __future__ import annotations

from typing import Final


def exact_div(numerator: int, denominator: int) -> int:
    """`numerator // denominator`, raising if the division leaves a remainder.

    Frame sizes derived from rates must come out whole: a silent truncation would let two
    clocks drift apart by a fraction of a sample per frame.
    """
    quotient, remainder = divmod(numerator, denominator)
    if remainder:
        raise ValueError(f"{numerator} is not a multiple of {denominator}")
    return quotient


MS_PER_S: Final = 1000
BYTES_PER_SAMPLE: Final = 2  # 16-bit PCM on the device side
INT16_FULL_SCALE: Final = 32768.0  # float ±1 ↔ int16

MODEL_INPUT_RATE_HZ: Final = 16_000  # speech encoder input (Kaldi fbank at 16 kHz)
MODEL_OUTPUT_RATE_HZ: Final = 24_000  # codec output
MODEL_CHUNK_MS: Final = 160  # one encoder step: 16 fbank frames of 10 ms
MODEL_CHUNK_SAMPLES: Final = exact_div(MODEL_INPUT_RATE_HZ * MODEL_CHUNK_MS, MS_PER_S)  # 2560 = 160 ms

VAD_RATE_HZ: Final = MODEL_INPUT_RATE_HZ  # webrtcvad takes 8, 16, 32 or 48 kHz, 16-bit mono
VAD_FRAME_MS: Final = 30  # webrtcvad takes 10, 20 or 30 ms frames
VAD_FRAME_SAMPLES: Final = exact_div(VAD_RATE_HZ * VAD_FRAME_MS, MS_PER_S)  # 480 = 30 ms
VAD_FRAME_MS_CHOICES: Final = (10, 20, 30)

AEC_FRAME_MS: Final = 10  # WebRTC's audio processing module works on 10 ms frames
AEC_FRAME_SAMPLES: Final = exact_div(MODEL_INPUT_RATE_HZ * AEC_FRAME_MS, MS_PER_S)  # 160 = 10 ms

DEFAULT_BLOCK_MS: Final = 20  # PortAudio callback block: 50 callbacks/s, short enough for barge-in


def samples_for_ms(rate_hz: int, duration_ms: int) -> int:
    """Samples in `duration_ms` at `rate_hz`, exact (44.1 kHz × 20 ms = 882 is fine; 44.1 kHz ×
    1 ms is not)."""
    return exact_div(rate_hz * duration_ms, MS_PER_S)
