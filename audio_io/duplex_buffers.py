"""The two sides of a full-duplex stream: PortAudio callbacks and the consumer thread.

The callbacks run on PortAudio's real-time threads. They only copy bytes into or out of
bounded queues, zero-fill and count; they never block, log, take a lock of their own or
raise (PyAudio turns an exception into an aborted stream and re-raises it asynchronously in
the main thread). Everything else — int16 conversion, resampling, echo control, chunking —
happens on the consumer side, in ordinary threads.

`DuplexBuffers` needs no sound card, so tests and fakes drive its callbacks directly;
`audio_io.duplex.DuplexStream` connects it to real PortAudio streams.
"""
from __future__ import annotations

import queue
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from audio_io.aec import EchoCanceller
from audio_io.constants import (
    BYTES_PER_SAMPLE,
    DEFAULT_BLOCK_MS,
    INT16_FULL_SCALE,
    MODEL_CHUNK_SAMPLES,
    MODEL_INPUT_RATE_HZ,
    MODEL_OUTPUT_RATE_HZ,
    MS_PER_S,
)
from audio_io.playback_clock import PlaybackClock, ReferenceTimeline, TimedResampler
from audio_io.resample import StreamingResampler
from audio_io.wav_file import float_to_int16

PA_CONTINUE = 0  # pyaudio.paContinue, spelled out so this module needs no PyAudio
PA_STATUS_XRUN = 0x1 | 0x2 | 0x4 | 0x8  # paInput/Output Underflow/Overflow status flags
DEFAULT_QUEUE_BLOCKS = 50  # 1 s of 20 ms microphone blocks before the oldest is dropped
DEFAULT_OUTPUT_QUEUE_S = 30.0  # answer audio that may wait for the speaker
# The echo reference is read this far ahead of the microphone's instant: a margin against
# timestamp errors (AEC3 copes with a reference up to ~500 ms early, not with a late one). It
# must stay constant: AEC3 re-adapts to every change of delay.
DEFAULT_REFERENCE_LEAD_MS = 30
MAX_REFERENCE_WAIT_MS = 100  # the output went quiet (device gone): clean the mic with what is known
_END = object()  # queued after an utterance: the silence that follows is no underrun


def _stamp(time_info: Any, key: str) -> float | None:
    """A PortAudio time-info entry in seconds, or None if absent or not a number."""
    value = time_info.get(key) if isinstance(time_info, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


class DuplexBuffers:
    """Bounded queues, counters and edge processing between PortAudio and the daemon.

    The consumer methods (`read_model_chunk`, `play`, `finish_playback`, `flush_playback`,
    `reconfigure`) belong to one thread, the daemon loop; the callbacks to PortAudio's.

    Args:
        input_rate_hz: microphone device rate.
        output_rate_hz: speaker device rate.
        block_ms: PortAudio block length (play() splits audio into blocks of this size).
        queue_blocks: microphone blocks buffered before the oldest is dropped (overrun).
        input_channels: channels the input stream delivers (mixed down to mono).
        output_channels: channels the output stream takes (mono is duplicated).
        echo_canceller: applied to the 16 kHz microphone signal with the played signal as
            reference; None: the microphone passes unchanged.
        output_queue_s: answer audio that may be queued ahead of the speaker.
        reference_lead_ms: margin by which the echo reference leads the microphone, constant (see
            _clean_mic); a microphone piece waits until its reference is known that far.
        clock: monotonic seconds (tests inject a fake).
    """

    def __init__(self, input_rate_hz: int, output_rate_hz: int, block_ms: int = DEFAULT_BLOCK_MS,
                 queue_blocks: int = DEFAULT_QUEUE_BLOCKS, input_channels: int = 1, output_channels: int = 1,
                 echo_canceller: EchoCanceller | None = None, output_queue_s: float = DEFAULT_OUTPUT_QUEUE_S,
                 reference_lead_ms: int = DEFAULT_REFERENCE_LEAD_MS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.block_ms, self.queue_blocks, self.output_queue_s = block_ms, queue_blocks, output_queue_s
        self.echo_canceller = echo_canceller
        self._reference_lead_ticks = reference_lead_ms * MODEL_INPUT_RATE_HZ // MS_PER_S
        self._max_reference_wait_ticks = MAX_REFERENCE_WAIT_MS * MODEL_INPUT_RATE_HZ // MS_PER_S
        self.clock = clock
        # counters survive reconfigure(); written by one side each
        self.underruns = 0  # output callback ran dry in the middle of an utterance
        self.overruns = 0  # microphone block dropped because the consumer fell behind
        self.xruns = 0  # PortAudio status flags reported a device-level under/overflow
        self.callback_errors = 0  # exceptions swallowed by a callback
        self.play_overflows = 0  # play() found the output queue full and dropped audio
        self._base_heard_24k = 0  # heard before the last reconfigure()
        self.reconfigure(input_rate_hz, output_rate_hz, input_channels, output_channels)

    def reconfigure(self, input_rate_hz: int, output_rate_hz: int, input_channels: int = 1,
                    output_channels: int = 1) -> None:
        """New device formats (after a re-open). Call only while no callback can run.

        Queued audio is dropped (the device it was meant for is gone); the playback clock
        keeps counting from where it was.
        """
        if hasattr(self, "playback"):
            self.flush_playback()
            self._base_heard_24k += self.playback.heard_samples_24k()
        self.input_rate_hz, self.output_rate_hz = input_rate_hz, output_rate_hz
        self._in_frame_bytes = BYTES_PER_SAMPLE * input_channels
        self._out_frame_bytes = BYTES_PER_SAMPLE * output_channels
        self.input_channels, self.output_channels = input_channels, output_channels
        self.output_block_frames = max(1, round(output_rate_hz * self.block_ms / MS_PER_S))
        self._in_q: queue.Queue = queue.Queue(maxsize=self.queue_blocks)
        self._ref_q: queue.Queue = queue.Queue(maxsize=self.queue_blocks)
        out_blocks = max(1, int(self.output_queue_s * MS_PER_S / self.block_ms))
        self._out_q: queue.Queue = queue.Queue(maxsize=out_blocks)
        self.playback = PlaybackClock(output_rate_hz, self.clock)
        self._reset_callback_state()
        self._reset_consumer_state()

    def _reset_callback_state(self) -> None:
        self._carry = b""  # rest of a queued piece that did not fit the last output block
        self._playing = False  # the last output block carried real audio
        self._flush_requests = 0  # bumped by flush_playback(); the callback drops its carry
        self._flush_seen = 0
        self._in_frames = 0  # frame number of the next microphone block
        self._out_frames = 0  # frame number of the next output block
        self.input_callbacks = 0
        self.output_callbacks = 0
        self.last_input_callback_s = self.clock()
        self.last_output_callback_s = self.clock()

    def _reset_consumer_state(self) -> None:
        self._play_resampler = StreamingResampler(MODEL_OUTPUT_RATE_HZ, self.output_rate_hz)
        self._mic_stream = TimedResampler(self.input_rate_hz)
        self._ref_stream = TimedResampler(self.output_rate_hz)
        self._reference = ReferenceTimeline()
        self._model_pending = np.zeros(0, dtype=np.float32)  # (< MODEL_CHUNK_SAMPLES,) cleaned 16 kHz
        self._uncleaned: deque[tuple[int, np.ndarray]] = deque()  # 16 kHz mic pieces awaiting their reference
        if self.echo_canceller is not None:
            self.echo_canceller.reset()

    # ---- PortAudio side (real-time threads) ----

    def input_callback(self, in_data: Any, frame_count: Any, time_info: Any, status: Any) -> tuple[None, int]:
        """PyAudio input callback: copy the block into the bounded queue, nothing else."""
        try:
            self.last_input_callback_s = self.clock()
            self.input_callbacks += 1
            xrun = isinstance(status, int) and bool(status & PA_STATUS_XRUN)
            self.xruns += xrun
            if not isinstance(in_data, (bytes, bytearray, memoryview)):
                self.callback_errors += 1
                return None, PA_CONTINUE
            data = bytes(in_data)  # PyAudio passes bytes (no copy); a view is copied
            frames = len(data) // self._in_frame_bytes
            item = (data, self._in_frames, _stamp(time_info, "input_buffer_adc_time"), xrun)
            self._in_frames += frames
            self._put_dropping_oldest(self._in_q, item, count_overrun=True)
        except Exception:  # noqa: BLE001 - a raise would abort the stream; count instead
            self.callback_errors += 1
        return None, PA_CONTINUE

    def output_callback(self, in_data: Any, frame_count: Any, time_info: Any,
                        status: Any) -> tuple[bytes, int]:
        """PyAudio output callback: hand over one block of queued audio, zero-filled if short."""
        try:
            nbytes = int(frame_count) * self._out_frame_bytes
        except (TypeError, ValueError):
            self.callback_errors += 1
            return b"", PA_CONTINUE
        try:
            self.last_output_callback_s = self.clock()
            self.output_callbacks += 1
            xrun = isinstance(status, int) and bool(status & PA_STATUS_XRUN)
            self.xruns += xrun
            data, real_bytes = self._fill(nbytes)
            dac, now = _stamp(time_info, "output_buffer_dac_time"), _stamp(time_info, "current_time")
            latency = dac - now if dac and now else None
            self.playback.on_handed(real_bytes // self._out_frame_bytes, latency)
            item = (data if real_bytes else None, self._out_frames, nbytes // self._out_frame_bytes,
                    dac, xrun)
            self._out_frames += nbytes // self._out_frame_bytes
            self._put_dropping_oldest(self._ref_q, item, count_overrun=False)
            return data, PA_CONTINUE
        except Exception:  # noqa: BLE001 - a raise would abort the stream; zero-fill instead
            self.callback_errors += 1
            return bytes(max(0, nbytes)), PA_CONTINUE

    def _fill(self, nbytes: int) -> tuple[bytes, int]:
        """Take up to `nbytes` of queued audio; returns (exactly nbytes, real audio bytes)."""
        if self._flush_seen != self._flush_requests:
            self._flush_seen = self._flush_requests
            self.playback.dropped_in_callback_frames += len(self._carry) // self._out_frame_bytes
            self._carry = b""
            self._playing = False  # a flush ends the utterance on purpose: no underrun
        parts, need, ended = [], nbytes, False
        while need > 0:
            piece = self._carry
            if not piece:
                try:
                    piece = self._out_q.get_nowait()
                except queue.Empty:
                    break
                if piece is _END:
                    ended = True
                    continue
            parts.append(piece[:need])
            self._carry = piece[need:]
            need -= len(parts[-1])
        real = nbytes - need
        if need:
            if (self._playing or real) and not ended:
                self.underruns += 1
            self._playing = False
            parts.append(bytes(need))
        else:
            self._playing = True
        return b"".join(parts), real

    def _put_dropping_oldest(self, q: queue.Queue, item: Any, count_overrun: bool) -> None:
        try:
            q.put_nowait(item)
            return
        except queue.Full:
            pass
        if count_overrun:
            self.overruns += 1
        try:
            q.get_nowait()
        except queue.Empty:
            pass
        try:
            q.put_nowait(item)
        except queue.Full:  # the consumer refilled it meanwhile: this block is the one lost
            pass

    # ---- consumer side (ordinary threads) ----

    def read_model_chunk(self, timeout_s: float) -> np.ndarray | None:
        """The next 160 ms of microphone audio for the model, echo-controlled.

        Args:
            timeout_s: how long to wait for enough audio (0: only what is queued now).

        Returns:
            (MODEL_CHUNK_SAMPLES,) float32 at 16 kHz in ±1, or None if the timeout passed
            first (the partial chunk is kept for the next call).
        """
        deadline = self.clock() + max(0.0, timeout_s)
        while True:
            self._drain_reference()
            self._clean_mic()
            if len(self._model_pending) >= MODEL_CHUNK_SAMPLES:
                break
            remaining = deadline - self.clock()
            try:
                data, first_frame, adc, xrun = self._in_q.get(timeout=remaining) if remaining > 0 \
                    else self._in_q.get_nowait()
            except queue.Empty:
                return None
            self._consume_mic_block(data, first_frame, adc, xrun)
        chunk = self._model_pending[:MODEL_CHUNK_SAMPLES]
        self._model_pending = self._model_pending[MODEL_CHUNK_SAMPLES:]
        return chunk

    def _consume_mic_block(self, data: bytes, first_frame: int, adc_time: float | None, xrun: bool) -> None:
        mono = self._to_mono(data, self.input_channels)
        self._uncleaned.extend(self._mic_stream.push(mono, first_frame, adc_time, xrun))

    def _clean_mic(self) -> None:
        """Echo-cancel the microphone pieces whose reference is known, oldest first.

        The reference is always read `reference_lead_ms` ahead of the microphone's instant, so
        the echo path AEC3 sees keeps one delay (reading only as far as the output callback had
        reached made it jump by an output block from one piece to the next, and AEC3 sometimes
        lost the echo: 10-15 dB instead of 30+). A piece waits for its reference at most
        `MAX_REFERENCE_WAIT_MS` of newer microphone audio; past that the output has stopped
        (a lost device) and what was never played reads as silence.
        """
        while self._uncleaned:
            tick, mic = self._uncleaned[0]
            if self.echo_canceller is not None:
                end = tick + len(mic) + self._reference_lead_ticks
                newest_tick, newest = self._uncleaned[-1]
                waited = newest_tick + len(newest) - (tick + len(mic))
                if self._reference.known_until < end and waited < self._max_reference_wait_ticks:
                    return
                mic = self.echo_canceller.process(mic, self._reference.read(tick + self._reference_lead_ticks,
                                                                            len(mic)))
            self._uncleaned.popleft()
            self._model_pending = np.concatenate([self._model_pending, mic])

    def _drain_reference(self) -> None:
        """Put every block the output callback handed over onto the 16 kHz reference timeline."""
        while True:
            try:
                data, first_frame, frames, dac_time, xrun = self._ref_q.get_nowait()
            except queue.Empty:
                return
            if self.echo_canceller is None:
                continue
            if data is None:  # silence: nothing to write, but the resampler's tail is due
                pieces, silent_until = self._ref_stream.silent_block(first_frame, frames, dac_time, xrun)
                self._reference.mark_known(silent_until)
            else:
                mono = self._to_mono(data, self.output_channels)
                pieces = self._ref_stream.push(mono, first_frame, dac_time, xrun)
            for tick, samples in pieces:
                self._reference.write(tick, samples)

    @staticmethod
    def _to_mono(data: bytes, channels: int) -> np.ndarray:
        usable = len(data) // (BYTES_PER_SAMPLE * channels) * (BYTES_PER_SAMPLE * channels)
        pcm = np.frombuffer(data[:usable], dtype=np.int16).astype(np.float32) / INT16_FULL_SCALE
        return pcm.reshape(-1, channels).mean(axis=1) if channels > 1 else pcm  # (frames, ch) → (frames,)

    def play(self, pcm_24k: np.ndarray) -> None:
        """Queue 24 kHz float audio for the speaker (resampled to the device rate, in blocks).

        Consecutive calls join seamlessly (the resampler keeps its state); the last ~0.4 ms
        is held back until the next call or `finish_playback()`.
        """
        pcm = np.asarray(pcm_24k, dtype=np.float32).reshape(-1)
        if len(pcm):
            self._enqueue_native(self._play_resampler.process(pcm))

    def finish_playback(self) -> None:
        """The utterance is complete: release the held-back tail; the silence that follows
        is not counted as an underrun."""
        self._enqueue_native(self._play_resampler.flush())
        try:
            self._out_q.put_nowait(_END)
        except queue.Full:
            pass

    def _enqueue_native(self, native: np.ndarray) -> None:
        pcm16 = float_to_int16(native)
        if self.output_channels > 1:
            pcm16 = np.repeat(pcm16, self.output_channels)  # (frames * ch,) interleaved
        data = pcm16.tobytes()
        step = self.output_block_frames * self._out_frame_bytes
        for start in range(0, len(data), step):
            piece = data[start:start + step]
            frames = len(piece) // self._out_frame_bytes
            self.playback.on_enqueued(frames)
            try:
                self._out_q.put_nowait(piece)
            except queue.Full:
                self.play_overflows += 1
                self.playback.on_dropped(frames)

    def flush_playback(self) -> int:
        """Drop all queued output at once (barge-in); the callback also drops the rest of the
        block it had started. Returns the 24 kHz samples dropped (queue + resampler)."""
        dropped = 0
        while True:
            try:
                piece = self._out_q.get_nowait()
            except queue.Empty:
                break
            if piece is not _END:
                dropped += len(piece) // self._out_frame_bytes
        self._flush_requests += 1  # after draining, so no old block can slip in behind it
        self.playback.on_dropped(dropped)
        held = self._play_resampler.pending_input_samples
        self._play_resampler.reset()
        return self.playback.to_24k(dropped) + held

    @property
    def played_samples_24k(self) -> int:
        """24 kHz samples given to play() that have left the speaker (real audio only, output
        latency subtracted); cumulative over the object's life."""
        return self._base_heard_24k + self.playback.heard_samples_24k()

    @property
    def queued_samples_24k(self) -> int:
        """24 kHz samples given to play() not yet handed to the device (nor dropped)."""
        return self.playback.to_24k(self.playback.queued_frames) + self._play_resampler.pending_input_samples

    @property
    def playing(self) -> bool:
        """Audio is queued or still inside the device's output latency."""
        in_device = self.playback.heard_samples_24k() < self.playback.handed_samples_24k
        return self.queued_samples_24k > 0 or in_device

    @property
    def healthy(self) -> bool:
        """Buffers alone have no device to lose (`DuplexStream` overrides this)."""
        return True

    def reopen(self) -> bool:
        return True

    def counters(self) -> dict[str, int]:
        return {"underruns": self.underruns, "overruns": self.overruns, "xruns": self.xruns,
                "callback_errors": self.callback_errors, "play_overflows": self.play_overflows}
