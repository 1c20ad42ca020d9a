"""Finding sound devices by name through PortAudio (PyAudio), never by index.

Card numbers and PortAudio indices change when a USB device is re-plugged, so devices are
named by a case-insensitive substring of their name and looked up again on every open.
PyAudio is imported lazily: without it (or without any device) the caller gets a one-line
`NoAudioDeviceError` instead of a traceback.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Literal

logger = logging.getLogger(__name__)

Direction = Literal["input", "output"]
PA_INT16 = 0x8  # PortAudio's paInt16 sample format
PA_FORMAT_IS_SUPPORTED = 0
PA_NOT_INITIALIZED = -10000
INSTALL_HINT = "apt-get install libportaudio2 && pip install 'freeze-omni-assistant[audio]'"

# PortAudio's ALSA and JACK back ends print probing noise on C-level stderr while they
# enumerate devices; the redirect that hides it is process-wide, so only one at a time.
_STDERR_LOCK = threading.RLock()


class NoAudioDeviceError(RuntimeError):
    """No usable sound device: PortAudio missing, no devices, or no name match."""


@dataclass(frozen=True)
class DeviceInfo:
    """One PortAudio device as the host API reports it."""

    index: int
    """PortAudio index: valid only for the PortAudio session that listed it."""
    name: str
    max_input_channels: int
    max_output_channels: int
    default_rate_hz: int
    """The device's native (default) sample rate, e.g. 44100 or 48000."""
    host_api: str
    """e.g. ALSA, JACK, Core Audio, WASAPI."""

    def channels(self, direction: Direction) -> int:
        return self.max_input_channels if direction == "input" else self.max_output_channels

    def describe(self) -> str:
        """One line for `freeze-omni devices`."""
        return (f"{self.index:3d}  {self.name}  [{self.host_api}]  in {self.max_input_channels} ch, "
                f"out {self.max_output_channels} ch, {self.default_rate_hz} Hz")


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the duration (PortAudio probing noise).

    Python-level logging done by other threads in this window is lost too, so keep the
    window short: only around device enumeration, format probing and stream opening.
    """
    with _STDERR_LOCK:
        saved = os.dup(2)
        try:
            with open(os.devnull, "wb") as devnull:
                os.dup2(devnull.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def load_pyaudio() -> Any:
    """Import PyAudio or raise `NoAudioDeviceError` with the install command."""
    try:
        import pyaudio
    except ImportError as err:  # also raised when libportaudio.so itself is missing
        raise NoAudioDeviceError(
            f"no audio devices: PyAudio/PortAudio is not installed ({INSTALL_HINT})") from err
    return pyaudio


def open_portaudio(quiet: bool = True) -> Any:
    """A new `pyaudio.PyAudio()` session; PortAudio enumerates devices at this moment.

    PortAudio counts initialisations: devices are enumerated afresh only when every earlier
    session has been terminated.
    """
    pyaudio = load_pyaudio()
    try:
        if quiet:
            with quiet_native_stderr():
                return pyaudio.PyAudio()
        return pyaudio.PyAudio()
    except OSError as err:
        raise NoAudioDeviceError(f"no audio devices: PortAudio failed to start ({err})") from err


def devices_of(pa: Any) -> list[DeviceInfo]:
    """Every device of an open PortAudio session."""
    devices = []
    for index in range(pa.get_device_count()):
        raw = pa.get_device_info_by_index(index)
        host = pa.get_host_api_info_by_index(raw["hostApi"])["name"]
        devices.append(DeviceInfo(
            index=index, name=str(raw["name"]),
            max_input_channels=int(raw["maxInputChannels"]),
            max_output_channels=int(raw["maxOutputChannels"]),
            default_rate_hz=int(round(raw["defaultSampleRate"])), host_api=str(host)))
    return devices


def list_devices() -> list[DeviceInfo]:
    """Every device PortAudio sees now (a fresh enumeration)."""
    pa = open_portaudio()
    try:
        return devices_of(pa)
    finally:
        pa.terminate()


def find_device(name_substring: str | None, direction: Direction) -> DeviceInfo:
    """The device to use for `direction`, by name, from a fresh enumeration.

    Args:
        name_substring: case-insensitive part of the device name; None: the system default.
        direction: "input" (microphone) or "output" (speaker).

    Raises:
        NoAudioDeviceError: PortAudio missing, or no device of that direction matches.
    """
    pa = open_portaudio()
    try:
        return find_in_session(pa, name_substring, direction)
    finally:
        pa.terminate()


def find_in_session(pa: Any, name_substring: str | None, direction: Direction) -> DeviceInfo:
    """`find_device` inside an already open PortAudio session (indices valid for `pa`)."""
    if direction not in ("input", "output"):
        raise ValueError(f"direction must be 'input' or 'output', got {direction!r}")
    candidates = [d for d in devices_of(pa) if d.channels(direction) > 0]
    if name_substring is None:
        found = _default_device(pa, candidates, direction)
    else:
        found = pick_by_name(candidates, name_substring)
    if found is None:
        raise NoAudioDeviceError(_not_found_message(candidates, name_substring, direction))
    logger.debug("%s device: %s", direction, found.describe())
    return found


def pick_by_name(candidates: list[DeviceInfo], name_substring: str) -> DeviceInfo | None:
    """An exact (case-insensitive) name match first, else the first substring match."""
    wanted = name_substring.casefold()
    exact = [d for d in candidates if d.name.casefold() == wanted]
    partial = [d for d in candidates if wanted in d.name.casefold()]
    return (exact or partial or [None])[0]


def _default_device(pa: Any, candidates: list[DeviceInfo], direction: Direction) -> DeviceInfo | None:
    try:
        if direction == "input":
            raw = pa.get_default_input_device_info()
        else:
            raw = pa.get_default_output_device_info()
    except OSError:  # PyAudio raises IOError when there is no default device
        return None
    return next((d for d in candidates if d.index == raw["index"]), None)


def _not_found_message(candidates: list[DeviceInfo], name_substring: str | None, direction: Direction) -> str:
    looked_for = "the system default" if name_substring is None else repr(name_substring)
    available = ", ".join(repr(d.name) for d in candidates) or "none"
    return f"no audio {direction} device found (looked for {looked_for}); available: {available}"


class _PaStreamParameters(ctypes.Structure):
    """PortAudio's PaStreamParameters."""

    _fields_ = [("device", ctypes.c_int), ("channelCount", ctypes.c_int), ("sampleFormat", ctypes.c_ulong),
                ("suggestedLatency", ctypes.c_double), ("hostApiSpecificStreamInfo", ctypes.c_void_p)]


@functools.lru_cache(maxsize=1)
def _portaudio_library() -> Any:
    name = ctypes.util.find_library("portaudio")
    try:
        library = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if library is not None:
        library.Pa_IsFormatSupported.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double]
        library.Pa_IsFormatSupported.restype = ctypes.c_int
    return library


def format_supported(pa: Any, device_index: int, direction: Direction, rate_hz: int, channels: int) -> bool:
    """Whether the device takes 16-bit PCM at this rate and channel count, now.

    Asks the shared libportaudio directly when PyAudio links it dynamically (Linux): PyAudio
    0.2.14 leaks its error tuple on every refusal, which adds up when a missing device is
    probed every 0.5 s. Falls back to PyAudio where PortAudio is linked into the extension.
    """
    library = _portaudio_library()
    if library is not None:
        params = _PaStreamParameters(device_index, channels, PA_INT16, 0.0, None)
        pair = (ctypes.byref(params), None) if direction == "input" else (None, ctypes.byref(params))
        code = library.Pa_IsFormatSupported(*pair, float(rate_hz))
        if code != PA_NOT_INITIALIZED:  # another PortAudio copy than PyAudio's answers "not initialised"
            return code == PA_FORMAT_IS_SUPPORTED
    prefix = "input" if direction == "input" else "output"
    kwargs = {f"{prefix}_device": device_index, f"{prefix}_channels": channels, f"{prefix}_format": PA_INT16}
    try:
        return bool(pa.is_format_supported(rate_hz, **kwargs))
    except ValueError:
        return False
