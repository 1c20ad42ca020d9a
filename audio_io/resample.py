"""Sample-rate conversion at the edges of the system (polyphase, anti-aliased).

`resample` converts a whole signal at once; `StreamingResampler` converts a stream block by
block with the same filter, so the concatenated output equals the one-shot result (up to
the last few samples, which the stream holds back until more input or `flush()` arrives)
and block edges never click.
"""
from __future__ import annotations

from math import gcd

import numpy as np

KAISER_BETA = 5.0  # scipy.signal.resample_poly's default window, so both paths share one filter
HALF_LEN_PER_RATE = 10  # filter half-length in units of max(up, down), as resample_poly


def resample(samples: np.ndarray, from_rate_hz: int, to_rate_hz: int) -> np.ndarray:
    """Resample float32 mono audio with a polyphase Kaiser-windowed filter.

    Output length is round(len * to / from).
    """
    _check_rates(from_rate_hz, to_rate_hz)
    if from_rate_hz == to_rate_hz:
        return np.asarray(samples, dtype=np.float32)
    from scipy.signal import resample_poly

    common = gcd(from_rate_hz, to_rate_hz)
    out = resample_poly(np.asarray(samples, dtype=np.float64), to_rate_hz // common, from_rate_hz // common)
    target_len = int(round(len(samples) * to_rate_hz / from_rate_hz))
    return out[:target_len].astype(np.float32)


def _check_rates(from_rate_hz: int, to_rate_hz: int) -> None:
    if from_rate_hz <= 0 or to_rate_hz <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate_hz} → {to_rate_hz}")


class StreamingResampler:
    """Stateful polyphase resampler: feed blocks of any size, get output as soon as it is exact.

    Output sample k is `sum_m x[m] * h[k*down + half_len - m*up]`, the zero-phase definition
    `resample_poly` uses, so output k ↔ input time k * from / to exactly (no delay to undo).
    Computing k needs input up to index (k*down + half_len) // up, so the stream lags the
    input by about `half_len / up` input samples (0.4–0.7 ms for 24↔48 kHz and 44.1→16 kHz).

    Args:
        from_rate_hz: input rate.
        to_rate_hz: output rate.
    """

    def __init__(self, from_rate_hz: int, to_rate_hz: int) -> None:
        _check_rates(from_rate_hz, to_rate_hz)
        self.from_rate_hz, self.to_rate_hz = from_rate_hz, to_rate_hz
        common = gcd(from_rate_hz, to_rate_hz)
        self._up, self._down = to_rate_hz // common, from_rate_hz // common
        self._half_len = HALF_LEN_PER_RATE * max(self._up, self._down)
        self._phases = self._polyphase_matrix() if self._up != self._down else None
        self._taps = 0 if self._phases is None else self._phases.shape[1]
        self.reset()

    def _polyphase_matrix(self) -> np.ndarray:
        from scipy.signal import firwin

        max_rate = max(self._up, self._down)
        h = firwin(2 * self._half_len + 1, 1.0 / max_rate, window=("kaiser", KAISER_BETA)) * self._up
        taps = -(-len(h) // self._up)
        padded = np.zeros(taps * self._up)
        padded[: len(h)] = h
        # (taps, up) → (up, taps): row p holds h[p], h[p + up], h[p + 2 up], ...
        return np.ascontiguousarray(padded.reshape(taps, self._up).T)

    def reset(self) -> None:
        """Forget all input: the next block starts a new stream (as if preceded by zeros)."""
        self._history = np.zeros(self._taps, dtype=np.float64)  # the last `taps` inputs (zeros at start)
        self._received = 0  # input samples seen since reset
        self._emitted = 0  # output samples produced since reset

    @property
    def emitted(self) -> int:
        """Output samples produced since the last reset."""
        return self._emitted

    @property
    def pending_input_samples(self) -> int:
        """Input samples not yet fully turned into output (the stream's lag)."""
        return max(0, self._received - int(self._emitted * self._down / self._up))

    def process(self, block: np.ndarray) -> np.ndarray:
        """Resample one block; returns the float32 output samples that became exact.

        Args:
            block: (T,) float samples at `from_rate_hz`.

        Returns:
            (K,) float32 at `to_rate_hz`; over a stream, the sum of K follows T * to / from.
        """
        block = np.asarray(block, dtype=np.float64).reshape(-1)
        if self._phases is None:
            self._received += len(block)
            self._emitted += len(block)
            return block.astype(np.float32)
        return self._run(block, self._received + len(block))

    def flush(self) -> np.ndarray:
        """Emit the held-back output as if the input were followed by silence, then reset.

        Returns:
            (K,) float32: the rest of the stream, so that round(received * to / from) samples
            were emitted in total since the last reset.
        """
        if self._phases is None:
            self.reset()
            return np.zeros(0, dtype=np.float32)
        target = int(round(self._received * self._up / self._down))
        out = np.zeros(0, dtype=np.float32)
        if target > self._emitted:
            needed_input = ((target - 1) * self._down + self._half_len) // self._up + 1
            padding = np.zeros(max(0, needed_input - self._received), dtype=np.float64)
            missing = target - self._emitted
            out = self._run(padding, self._received + len(padding))[:missing]
        self.reset()
        return out

    def _run(self, block: np.ndarray, available: int) -> np.ndarray:
        up, down, half = self._up, self._down, self._half_len
        # history covers input indices [start, available) after appending the block
        history = np.concatenate([self._history, block])
        start = available - len(history)
        # output k is computable once its newest input index (k*down + half)//up < available
        last_k = (up * available - half - 1) // down  # largest k with (k*down+half)//up < available
        ks = np.arange(self._emitted, last_k + 1, dtype=np.int64)
        if len(ks) == 0:
            out = np.zeros(0, dtype=np.float32)
        else:
            shifted = ks * down + half
            newest, phase = shifted // up, shifted % up
            idx = newest[:, None] - np.arange(self._taps)[None, :] - start  # (K, taps)
            window = np.where(idx >= 0, history[np.clip(idx, 0, None)], 0.0)  # zeros before the stream
            out = np.einsum("kt,kt->k", window, self._phases[phase]).astype(np.float32)
        self._emitted = int(last_k + 1) if len(ks) else self._emitted
        self._received = available
        self._history = history[len(history) - self._taps:]
        return out
