"""What the speaker has actually played, and when: the playback clock and the echo reference.

`PlaybackClock` counts output frames in three places — queued by the consumer, handed to the
device by the output callback (real audio only, never zero-fill), dropped by a flush — and
converts them to the 24 kHz samples the codec produced. The device plays a handed frame one
output latency later, which `heard_samples_24k` subtracts.

`StreamAnchor` and `ReferenceTimeline` put both directions on PortAudio's stream clock at
16 kHz: the output callback's DAC time says when a block leaves the speaker, the input
callback's ADC time when a block entered the microphone, so the echo canceller can be fed
the reference that was playing at the microphone's instant.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

import numpy as np

from audio_io.constants import MODEL_INPUT_RATE_HZ, MODEL_OUTPUT_RATE_HZ
from audio_io.resample import StreamingResampler

REANCHOR_TOLERANCE_SAMPLES = 160  # 10 ms at 16 kHz: after an xrun, a gap this long re-anchors
UNFLAGGED_GAP_SAMPLES = 800  # 50 ms: an unflagged gap; timestamp ramps stayed within 13 ms
DEVIATION_WINDOW_BLOCKS = 15  # 300 ms of 20 ms blocks: a median outvotes late single blocks
MIN_DEVIATION_BLOCKS = 5  # blocks a gap is judged on
REFERENCE_CAPACITY_SAMPLES = 1 << 15  # 2.05 s at 16 kHz of playback kept for the echo canceller


class PlaybackClock:
    """Frame counters of one output stream, read as 24 kHz codec samples.

    Writers: `on_enqueued`/`on_dropped` from the consumer thread, `on_handed` from the
    output callback. Each counter has a single writer and int assignment is atomic, so no
    lock is needed; readers may see a value one callback old.

    Args:
        native_rate_hz: the output device's rate.
        clock: monotonic seconds (injected by tests).
    """

    def __init__(self, native_rate_hz: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.native_rate_hz = native_rate_hz
        self.clock = clock
        self.enqueued_frames = 0
        self.handed_frames = 0  # real audio only; written by the output callback
        self.dropped_frames = 0  # written by the consumer (flush)
        self.dropped_in_callback_frames = 0  # the callback's partial block discarded by a flush
        self.last_handed_at_s = 0.0  # when the callback last handed real audio
        self.last_handed_frames = 0  # how much it handed then
        self.output_latency_s = 0.0  # DAC time − callback time, as the stream reports it

    def on_enqueued(self, frames: int) -> None:
        self.enqueued_frames += frames

    def on_dropped(self, frames: int) -> None:
        self.dropped_frames += frames

    def on_handed(self, frames: int, latency_s: float | None) -> None:
        """Called by the output callback: `frames` of real audio went to the device."""
        if frames:
            self.handed_frames += frames
            self.last_handed_frames = frames
            self.last_handed_at_s = self.clock()
        if latency_s is not None and 0.0 <= latency_s < 2.0:
            self.output_latency_s = latency_s

    def to_24k(self, frames: int) -> int:
        return frames * MODEL_OUTPUT_RATE_HZ // self.native_rate_hz

    @property
    def handed_samples_24k(self) -> int:
        """24 kHz samples handed to the device (real audio only)."""
        return self.to_24k(self.handed_frames)

    def heard_samples_24k(self) -> int:
        """Handed samples minus those still inside the device's output latency.

        The last block handed at time t starts playing at t + latency and ends one block
        later; everything handed before it was contiguous, so what is not out yet at `now`
        is latency + last block − (now − t), at the device rate.
        """
        ahead_frames = self.output_latency_s * self.native_rate_hz + self.last_handed_frames
        since_last_s = max(0.0, self.clock() - self.last_handed_at_s)
        in_flight = max(0.0, ahead_frames - since_last_s * self.native_rate_hz)
        return self.to_24k(max(0, self.handed_frames - int(in_flight)))

    @property
    def queued_frames(self) -> int:
        dropped = self.dropped_frames + self.dropped_in_callback_frames
        return max(0, self.enqueued_frames - self.handed_frames - dropped)


class StreamAnchor:
    """Maps a stream's running 16 kHz sample index to ticks (1/16000 s) of PortAudio's clock.

    The offset is taken from the first block's timestamp and kept while the samples keep
    coming: timestamps are not trusted to 10 ms. Through PulseAudio's ALSA plugin one
    direction's timestamps ramp away from its sample count by up to 0.3 % and snap back by
    10 ms while the samples stay in step (the echo in the microphone keeps one lag behind the
    reference), and single blocks arrive up to 10.6 ms off. Re-anchoring on such a ramp moved
    one direction by 10 ms, and AEC3 then lost the echo for seconds (ERLE 7-18 dB instead
    of 70). So the offset moves only on a gap: after a block flagged as an xrun (samples were
    lost or inserted), to the median timestamp of the next blocks if it is more than
    `REANCHOR_TOLERANCE_SAMPLES` off; and, unflagged, when the median of recent timestamps is
    more than `UNFLAGGED_GAP_SAMPLES` off, further than any ramp seen. Without timestamps (0
    or missing, as some host APIs report) the stream starts at tick 0.

    Args:
        native_rate_hz: rate of the blocks whose timestamps are given.
    """

    def __init__(self, native_rate_hz: int) -> None:
        self.native_rate_hz = native_rate_hz
        self.offset_ticks: int | None = None
        self.reanchors = 0
        self._deviations: deque[int] = deque(maxlen=DEVIATION_WINDOW_BLOCKS)  # measured − offset
        self._blocks_since_xrun: int | None = None

    def update(self, first_native_frame: int, block_time_s: float | None, xrun: bool = False) -> int:
        """Register a block starting at `first_native_frame` taken at `block_time_s` (`xrun`:
        the host flagged lost samples just before it); returns the offset to add to 16 kHz
        sample indices of this stream."""
        if xrun:
            self._blocks_since_xrun = 0
            self._deviations.clear()  # judge the gap on the blocks after it alone
        position = first_native_frame * MODEL_INPUT_RATE_HZ / self.native_rate_hz
        if block_time_s is None or block_time_s <= 0.0:
            if self.offset_ticks is None:
                self.offset_ticks = 0
            return self.offset_ticks
        measured = int(round(block_time_s * MODEL_INPUT_RATE_HZ - position))
        if self.offset_ticks is None:
            self.offset_ticks = measured
            return self.offset_ticks
        self._deviations.append(measured - self.offset_ticks)
        if len(self._deviations) >= MIN_DEVIATION_BLOCKS:
            drift = int(np.median(np.fromiter(self._deviations, dtype=np.int64)))
            after_xrun = (self._blocks_since_xrun is not None
                          and self._blocks_since_xrun < DEVIATION_WINDOW_BLOCKS)
            if abs(drift) > (REANCHOR_TOLERANCE_SAMPLES if after_xrun else UNFLAGGED_GAP_SAMPLES):
                self.offset_ticks += drift
                self._deviations = deque((d - drift for d in self._deviations),
                                         maxlen=DEVIATION_WINDOW_BLOCKS)
                self.reanchors += 1
                self._blocks_since_xrun = None
        if self._blocks_since_xrun is not None:
            self._blocks_since_xrun += 1
        return self.offset_ticks


class ReferenceTimeline:
    """Ring of recently played 16 kHz samples, addressed by absolute tick.

    Reads of ticks never written (before playback started, gaps, or older than the ring)
    return silence, which is what the speaker played then.
    """

    def __init__(self, capacity_samples: int = REFERENCE_CAPACITY_SAMPLES) -> None:
        self.capacity = capacity_samples
        self._values = np.zeros(capacity_samples, dtype=np.float32)
        self._ticks = np.full(capacity_samples, -1, dtype=np.int64)  # which tick each slot holds
        self.known_until = -1  # ticks before this are known (written, or known to be silent)

    def write(self, first_tick: int, samples: np.ndarray) -> None:
        samples = samples[-self.capacity:]
        ticks = first_tick + np.arange(len(samples), dtype=np.int64)
        slots = ticks % self.capacity
        self._values[slots] = samples
        self._ticks[slots] = ticks
        self.mark_known(first_tick + len(samples))

    def mark_known(self, until_tick: int) -> None:
        """Ticks before `until_tick` have been played (silence needs no write)."""
        self.known_until = max(self.known_until, until_tick)

    def read(self, first_tick: int, count: int) -> np.ndarray:
        """(count,) float32 samples for ticks first_tick … first_tick + count − 1."""
        ticks = first_tick + np.arange(count, dtype=np.int64)
        slots = ticks % self.capacity
        return np.where(self._ticks[slots] == ticks, self._values[slots], 0.0).astype(np.float32)

    def clear(self) -> None:
        self._ticks.fill(-1)
        self.known_until = -1


class TimedResampler:
    """Native-rate blocks with frame numbers and timestamps → 16 kHz samples with ticks.

    Blocks normally follow each other; when one is missing (a dropped queue item) or the
    stream goes silent, the resampler's tail is flushed and a new segment starts at the next
    block's frame number, so ticks stay tied to the device clock.

    Args:
        native_rate_hz: rate of the incoming blocks.
    """

    def __init__(self, native_rate_hz: int) -> None:
        self.native_rate_hz = native_rate_hz
        self.anchor = StreamAnchor(native_rate_hz)
        self._resampler = StreamingResampler(native_rate_hz, MODEL_INPUT_RATE_HZ)
        self._next_frame: int | None = None  # frame number the current segment expects next
        self._segment_start = 0  # 16 kHz position of the current segment's first frame
        self._offset = 0

    def push(self, samples: np.ndarray, first_frame: int, time_s: float | None,
             xrun: bool = False) -> list[tuple[int, np.ndarray]]:
        """Resample one (T,) float block; returns [(first_tick, (K,) float32 samples), ...]."""
        pieces = []
        if self._next_frame is not None and first_frame != self._next_frame:
            pieces += self.end_segment()
        if self._next_frame is None:
            self._segment_start = int(round(first_frame * MODEL_INPUT_RATE_HZ / self.native_rate_hz))
        self._offset = self.anchor.update(first_frame, time_s, xrun)
        before = self._resampler.emitted
        pieces.append(self._tick_of(before, self._resampler.process(samples)))
        self._next_frame = first_frame + len(samples)
        return [p for p in pieces if len(p[1])]

    def silent_block(self, first_frame: int, frames: int, time_s: float | None,
                     xrun: bool = False) -> tuple[list[tuple[int, np.ndarray]], int]:
        """A block of silence: ends the current segment; returns (its tail pieces, the tick just
        after the silent block)."""
        pieces = self.end_segment()
        offset = self.anchor.update(first_frame, time_s, xrun)
        return pieces, offset + int(round((first_frame + frames) * MODEL_INPUT_RATE_HZ / self.native_rate_hz))

    def end_segment(self) -> list[tuple[int, np.ndarray]]:
        """Flush the held-back tail (as if silence followed) and wait for a new segment."""
        if self._next_frame is None:
            return []
        piece = self._tick_of(self._resampler.emitted, self._resampler.flush())
        self._next_frame = None
        return [piece] if len(piece[1]) else []

    def _tick_of(self, first_index: int, out: np.ndarray) -> tuple[int, np.ndarray]:
        return self._offset + self._segment_start + first_index, out
