"""Full-duplex PortAudio stream: devices by name, native rates, loss detection and re-open.

`DuplexStream` opens one input and one output PortAudio stream (int16, callback API) at each
device's native rate and wires them to `DuplexBuffers`, which does everything else: bounded
queues, resampling to 16 kHz in / from 24 kHz out, echo control and the playback clock.

Device loss (a USB device unplugged, a PulseAudio sink unloaded) shows as a stream that
stopped or whose callbacks stalled: `healthy` turns False once, with one log line, and the
caller retries `reopen()` (every 0.5 s, say). Each attempt looks the same device up by name;
a failed attempt leaves no stream, thread or memory behind (see `RescanPolicy` for when
devices are enumerated afresh).
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from audio_io.aec import EchoCanceller
from audio_io.constants import DEFAULT_BLOCK_MS, MS_PER_S
from audio_io.devices import (
    DeviceInfo,
    Direction,
    NoAudioDeviceError,
    find_in_session,
    format_supported,
    load_pyaudio,
    open_portaudio,
    quiet_native_stderr,
)
from audio_io.duplex_buffers import DEFAULT_QUEUE_BLOCKS, DuplexBuffers

logger = logging.getLogger(__name__)

FALLBACK_RATES_HZ = (48_000, 44_100, 32_000, 16_000)  # tried when the default rate is refused
ALSA_CARD_SUFFIX = re.compile(r"\s*\(hw:\d+,\d+\)$")  # card numbers change when a device is re-plugged
DEFAULT_STALL_TIMEOUT_S = 1.0  # no callback for this long: the device is gone
DEFAULT_START_TIMEOUT_S = 3.0  # first callback may take this long (PulseAudio's ALSA plugin: ~1 s)
DEFAULT_REPORT_INTERVAL_S = 60.0  # counters logged at INFO this often


class RescanPolicy:
    """When a lost device may be looked for with a fresh PortAudio enumeration.

    PortAudio enumerates devices only in `Pa_Initialize`, and each initialise/terminate
    cycle of PortAudio 19.6 leaks about 12 kB, so a retry every 0.5 s would grow the daemon by
    ~90 MB an hour. Re-enumeration therefore happens only when the OS's sound devices changed
    (Linux: /dev/snd and /proc/asound/cards) or, as a fallback, after an interval that doubles
    up to `max_interval_s`; in between, retries re-open by name within the same session,
    which costs nothing and is all a PulseAudio/PipeWire device or a card that comes back
    under the same number needs.

    Args:
        clock: monotonic seconds.
        signature: cheap snapshot of the OS's device set (injected by tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 signature: Callable[[], object] | None = None,
                 first_interval_s: float = 2.0, max_interval_s: float = 300.0) -> None:
        self.clock, self.signature = clock, signature or os_device_signature
        self.first_interval_s, self.max_interval_s = first_interval_s, max_interval_s
        self.rescans = 0
        self.succeeded()

    def due(self) -> bool:
        return self.signature() != self._seen or self.clock() >= self._next_s

    def rescanned(self) -> None:
        """A fresh enumeration was made (and the device still could not be opened)."""
        self.rescans += 1
        self._seen = self.signature()
        self._next_s = self.clock() + self._interval_s
        self._interval_s = min(self.max_interval_s, 2 * self._interval_s)

    def succeeded(self) -> None:
        self._seen = self.signature()
        self._interval_s = self.first_interval_s
        self._next_s = self.clock() + self._interval_s


def os_device_signature() -> object:
    """The set of sound devices the OS shows (Linux); () elsewhere, so only the interval applies."""
    try:
        nodes = tuple(sorted(os.listdir("/dev/snd")))
        cards = Path("/proc/asound/cards").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    return nodes, cards


@dataclass
class _Streams:
    """The two open streams and what they were opened on (valid for one PortAudio session)."""

    input_device: DeviceInfo
    output_device: DeviceInfo
    input_format: tuple[int, int]  # (rate Hz, channels)
    output_format: tuple[int, int]
    input_stream: Any = None
    output_stream: Any = None

    def close(self) -> None:
        for stream in (self.input_stream, self.output_stream):
            if stream is not None:
                try:
                    stream.close()  # Pa_CloseStream aborts a running stream: no draining
                except OSError:
                    pass
        self.input_stream = self.output_stream = None


class DuplexStream(DuplexBuffers):
    """Microphone and speaker through PortAudio, read and written in model units.

    Args:
        input_device: case-insensitive substring of the microphone's name (None: default).
        output_device: same for the speaker.
        block_ms: PortAudio callback block.
        queue_blocks: microphone blocks buffered before overruns.
        echo_canceller: applied to the microphone before `read_model_chunk` returns it.
        input_rate_hz: force a microphone rate (None: the device's native rate).
        output_rate_hz: force a speaker rate (None: native).
        stall_timeout_s: callbacks silent this long mean the device is gone.
        start_timeout_s: the same before a new stream's first callback (capture through
            PulseAudio's ALSA plugin can take a second to deliver its first block).
        report_interval_s: counters are logged at INFO this often (by the reader).
        rescan: when `reopen()` may re-enumerate devices (default: `RescanPolicy()`).
        clock: monotonic seconds (tests inject a fake).

    Raises:
        NoAudioDeviceError: a device is missing or cannot be opened (one-line message).
    """

    def __init__(self, input_device: str | None = None, output_device: str | None = None,
                 block_ms: int = DEFAULT_BLOCK_MS, queue_blocks: int = DEFAULT_QUEUE_BLOCKS,
                 echo_canceller: EchoCanceller | None = None, input_rate_hz: int | None = None,
                 output_rate_hz: int | None = None, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
                 report_interval_s: float = DEFAULT_REPORT_INTERVAL_S, rescan: RescanPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.requested = {"input": input_device, "output": output_device}
        self.found_names: dict[str, str] = {}
        self.rate_overrides = {"input": input_rate_hz, "output": output_rate_hz}
        self.block_ms, self.stall_timeout_s, self.start_timeout_s = block_ms, stall_timeout_s, start_timeout_s
        self.report_interval_s = report_interval_s
        self.rescan = rescan or RescanPolicy(clock)
        self.device_losses = 0
        self.reopens = 0
        self._healthy = False
        self._started_at_s = 0.0
        self._streams: _Streams | None = None
        self._streams_formats: dict[str, tuple[str, tuple[int, int]]] = {}  # direction → (name, format)
        # one bound-method object per direction: PyAudio 0.2.14 keeps a reference to the callback
        # when opening fails, so a fresh bound method per retry would leak one object each time
        self._callbacks = {"input": self.input_callback, "output": self.output_callback}
        with quiet_native_stderr():
            self._pa: Any = open_portaudio()
            try:
                streams = self._streams = self._open_streams()
                super().__init__(streams.input_format[0], streams.output_format[0], block_ms, queue_blocks,
                                 streams.input_format[1], streams.output_format[1], echo_canceller,
                                 clock=clock)
                self._start(streams)
            except BaseException:
                self.close()
                raise
        self._last_report_s = self.clock()

    # ---- opening and closing ----

    def _open_streams(self) -> _Streams:
        """Find both devices by name in the current PortAudio session and open (not start)
        their streams. Raises NoAudioDeviceError, leaving nothing open."""
        devices = {d: self._refind(d) for d in ("input", "output")}
        formats = {d: self._format_for(devices[d], d) for d in devices}
        streams = _Streams(devices["input"], devices["output"], formats["input"], formats["output"])
        try:
            streams.input_stream = self._open_stream(devices["input"], "input", formats["input"])
            streams.output_stream = self._open_stream(devices["output"], "output", formats["output"])
        except BaseException:
            streams.close()
            raise
        return streams

    def _format_for(self, device: DeviceInfo, direction: Direction) -> tuple[int, int]:
        """The format that worked last time on this device, else a probed one (probing a
        missing device costs memory in PortAudio, so retries skip it)."""
        last = self._streams_formats.get(direction)
        if last is None or last[0] != device.name:
            return _pick_format(self._pa, device, direction, self.rate_overrides[direction])
        rate_hz, channels = last[1]
        if not format_supported(self._pa, device.index, direction, rate_hz, channels):
            raise NoAudioDeviceError(f"audio {direction} device {device.name!r} is not available")
        return last[1]

    def _refind(self, direction: Direction) -> DeviceInfo:
        """The device by the name found last time, then without its ALSA card number, then by
        the name the user asked for."""
        names = []
        if direction in self.found_names:
            names += [self.found_names[direction], ALSA_CARD_SUFFIX.sub("", self.found_names[direction])]
        names.append(self.requested[direction])
        error: NoAudioDeviceError | None = None
        for name in dict.fromkeys(names):  # unique, in order
            try:
                return find_in_session(self._pa, name, direction)
            except NoAudioDeviceError as err:
                error = error or err
        assert error is not None
        raise error

    def _open_stream(self, device: DeviceInfo, direction: Direction, fmt: tuple[int, int]) -> Any:
        rate_hz, channels = fmt
        pyaudio = load_pyaudio()
        is_input = direction == "input"
        try:
            return self._pa.open(
                format=pyaudio.paInt16, channels=channels, rate=rate_hz, input=is_input, output=not is_input,
                frames_per_buffer=max(1, round(rate_hz * self.block_ms / MS_PER_S)),
                input_device_index=device.index if is_input else None,
                output_device_index=None if is_input else device.index,
                stream_callback=self._callbacks[direction], start=False)
        except (OSError, ValueError) as err:
            raise NoAudioDeviceError(
                f"could not open audio {direction} device {device.name!r} at {rate_hz} Hz ({err})") from err

    def _start(self, streams: _Streams) -> None:
        self._streams = streams
        for direction, device, fmt in (("input", streams.input_device, streams.input_format),
                                       ("output", streams.output_device, streams.output_format)):
            self.found_names[direction] = device.name
            self._streams_formats[direction] = (device.name, fmt)
        streams.output_stream.start_stream()
        streams.input_stream.start_stream()
        self.playback.output_latency_s = float(streams.output_stream.get_output_latency())
        self._started_at_s = self.clock()
        self._healthy = True
        logger.info("audio: input %r at %d Hz (%d ch), output %r at %d Hz (%d ch), %d ms blocks, "
                    "output latency %.0f ms", streams.input_device.name, *streams.input_format,
                    streams.output_device.name, *streams.output_format, self.block_ms,
                    1000.0 * self.playback.output_latency_s)

    def _close_streams(self) -> None:
        streams, self._streams = self._streams, None
        self._healthy = False
        if streams is not None:
            streams.close()

    def close(self) -> None:
        """Stop both streams and release PortAudio (idempotent)."""
        self._close_streams()
        pa, self._pa = getattr(self, "_pa", None), None
        if pa is not None:
            pa.terminate()

    def __enter__(self) -> "DuplexStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- health ----

    @property
    def healthy(self) -> bool:
        """False from the first sign of device loss until a successful `reopen()`."""
        if self._healthy:
            problem = self._stream_problem()
            if problem is not None:
                self._healthy = False
                self.device_losses += 1
                logger.warning("audio device lost: %s; re-opening %r / %r by name", problem,
                               self.found_names.get("input"), self.found_names.get("output"))
        return self._healthy

    def _stream_problem(self) -> str | None:
        streams = self._streams
        if streams is None:
            return "streams closed"
        now = self.clock()
        # a device that just came back may deliver its first blocks unevenly (PulseAudio moves
        # streams, a null sink renders in 2 s blocks until a reader attaches): start-up grace
        starting = now - self._started_at_s < self.start_timeout_s
        for direction, stream, last_s, count in (
                ("input", streams.input_stream, self.last_input_callback_s, self.input_callbacks),
                ("output", streams.output_stream, self.last_output_callback_s, self.output_callbacks)):
            try:
                active = stream.is_active()
            except OSError as err:
                return f"{direction} stream failed ({err})"
            if not active:
                return f"{direction} stream stopped"
            if now - last_s > (self.stall_timeout_s if count and not starting else self.start_timeout_s):
                return f"no {direction} callback for {now - last_s:.1f} s"
        return None

    def reopen(self) -> bool:
        """Re-open both devices by name; cheap enough to call every 0.5 s while one is missing.

        Returns:
            True if the streams run again (or never stopped), False if a device is still
            missing (logged at DEBUG only, so retries do not flood the log).
        """
        if self.healthy:
            return True
        self._close_streams()
        # PortAudio's ALSA back end prints every failed probe of a missing device on stderr
        with quiet_native_stderr():
            if self._pa is not None and self._try_open():
                return True
            if not self.rescan.due():
                return False
            if self._pa is not None:
                self._pa.terminate()
                self._pa = None
            try:
                self._pa = open_portaudio()
            except NoAudioDeviceError as err:
                logger.debug("audio re-open failed: %s", err)
                return False
            finally:
                self.rescan.rescanned()
            return self._try_open()

    def _try_open(self) -> bool:
        try:
            streams = self._open_streams()
        except NoAudioDeviceError as err:
            logger.debug("audio re-open failed: %s", err)
            return False
        try:
            self.reconfigure(streams.input_format[0], streams.output_format[0],
                             streams.input_format[1], streams.output_format[1])
            self._start(streams)
        except OSError as err:
            self._close_streams()
            logger.debug("audio re-open failed while starting: %s", err)
            return False
        self.rescan.succeeded()
        self.reopens += 1
        return True

    def read_model_chunk(self, timeout_s: float) -> np.ndarray | None:
        chunk = super().read_model_chunk(timeout_s)
        now = self.clock()
        if now - self._last_report_s >= self.report_interval_s:
            self._last_report_s = now
            logger.info("audio counters: %s", self.counters())
        return chunk

    def counters(self) -> dict[str, int]:
        return {**super().counters(), "device_losses": self.device_losses, "reopens": self.reopens,
                "rescans": self.rescan.rescans}


def _pick_format(pa: Any, device: DeviceInfo, direction: Direction,
                 rate_override: int | None) -> tuple[int, int]:
    """(rate Hz, channels): the native rate first, mono first (some USB devices are stereo-only)."""
    if rate_override:
        rates = [rate_override]
    else:
        rates = list(dict.fromkeys([device.default_rate_hz, *FALLBACK_RATES_HZ]))
    channel_options = [c for c in (1, 2) if c <= max(1, device.channels(direction))]
    for rate_hz in rates:
        for channels in channel_options:
            if format_supported(pa, device.index, direction, rate_hz, channels):
                return rate_hz, channels
    raise NoAudioDeviceError(
        f"audio {direction} device {device.name!r} supports none of {rates} Hz as 16-bit PCM")
