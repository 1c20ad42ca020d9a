"""Voice activity gate: webrtcvad frames with start/stop hysteresis and a pre-roll.

`VadGate.push` takes microphone audio in any chunk size (the model's 160 ms chunks) and
returns events. Concatenating a START's pre-roll with the AUDIO events up to the STOP gives
the contiguous audio from `preroll_ms` before the speech onset to the end of the hangover,
so the model hears the first syllable even though the gate decides a few frames late.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import numpy as np

from audio_io.constants import MODEL_INPUT_RATE_HZ, VAD_FRAME_MS, VAD_FRAME_MS_CHOICES, samples_for_ms
from audio_io.wav_file import float_to_int16

VAD_RATES_HZ = (8000, 16000, 32000, 48000)  # the rates webrtcvad accepts
VAD_INSTALL_HINT = "pip install 'freeze-omni-assistant[audio]' (webrtcvad-wheels)"


class VadEventKind(Enum):
    START = auto()
    """Speech began; `audio` is the pre-roll (the `preroll_ms` before the onset frame)."""
    AUDIO = auto()
    """Audio while speech is active (speech frames and the hangover), in order."""
    STOP = auto()
    """`stop_frames` non-speech frames in a row ended the speech; `audio` is empty."""


@dataclass(frozen=True)
class VadEvent:
    kind: VadEventKind
    audio: np.ndarray
    """(T,) float32 at the gate's rate."""


@dataclass
class VadState:
    """Everything the gate remembers between pushes."""

    active: bool = False
    """Inside speech (between START and STOP)."""
    speech_run: int = 0
    """Consecutive speech frames (while inactive)."""
    silence_run: int = 0
    """Consecutive non-speech frames (while active)."""
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    """Samples not yet making a whole frame: (< frame_samples,)."""
    recent: deque = field(default_factory=deque)
    """Frames seen while inactive, newest last: pre-roll + the start window."""
    frames_seen: int = 0
    speech_frames_last_push: int = 0
    """Frames of the last `push` judged speech (hangover frames are not)."""


class VadGate:
    """webrtcvad with hysteresis and pre-roll; a pure object (no threads, no clock).

    Args:
        sample_rate_hz: 8, 16, 32 or 48 kHz.
        frame_ms: 10, 20 or 30.
        aggressiveness: 0 (keeps most audio as speech) to 3 (most aggressive filtering).
        start_frames: consecutive speech frames that open the gate.
        stop_frames: consecutive non-speech frames that close it.
        preroll_ms: audio before the onset handed out with START.
        settle_ms: at the start of a stream webrtcvad calls the first few frames speech
            whatever they hold (its noise estimate starts at zero); they cannot open the gate.
        min_level_dbfs: frames quieter than this (RMS, dB full scale) are never speech, or
            None for no floor. webrtcvad judges spectral shape, not loudness: it calls the
            −70 dBFS residue that echo cancellation leaves of our own voice speech.

    Raises:
        ValueError: unsupported rate, frame or aggressiveness.
        RuntimeError: webrtcvad is not installed.
    """

    def __init__(self, sample_rate_hz: int = MODEL_INPUT_RATE_HZ, frame_ms: int = VAD_FRAME_MS,
                 aggressiveness: int = 2, start_frames: int = 3, stop_frames: int = 20,
                 preroll_ms: int = 480, settle_ms: int = 300, min_level_dbfs: float | None = -60.0) -> None:
        _validate(sample_rate_hz, frame_ms, aggressiveness, start_frames, stop_frames, preroll_ms)
        if min_level_dbfs is not None and min_level_dbfs >= 0:
            raise ValueError(f"min_level_dbfs must be below 0 dBFS, got {min_level_dbfs}")
        self.min_power = None if min_level_dbfs is None else 10.0 ** (min_level_dbfs / 10.0)
        self.sample_rate_hz, self.frame_ms = sample_rate_hz, frame_ms
        self.frame_samples = samples_for_ms(sample_rate_hz, frame_ms)
        self.start_frames, self.stop_frames = start_frames, stop_frames
        self.preroll_samples = preroll_ms * sample_rate_hz // 1000
        self.settle_frames = -(-settle_ms // frame_ms)
        self.aggressiveness = aggressiveness
        self._recent_frames = -(-self.preroll_samples // self.frame_samples) + start_frames
        self.reset()

    def reset(self) -> None:
        """Start a new stream (new device, or after a long gap)."""
        self._vad = _make_vad(self.aggressiveness)
        self.state = VadState(recent=deque(maxlen=self._recent_frames))

    def is_speech(self, frame: np.ndarray) -> bool:
        """webrtcvad's verdict on one (frame_samples,) float frame, below the floor: no."""
        # webrtcvad sees every frame, so its noise estimate keeps adapting
        verdict = bool(self._vad.is_speech(float_to_int16(frame).tobytes(), self.sample_rate_hz))
        if self.min_power is None:
            return verdict
        return verdict and float(np.mean(np.square(frame, dtype=np.float64))) >= self.min_power

    def push(self, chunk: np.ndarray) -> list[VadEvent]:
        """Feed (T,) float32 audio at `sample_rate_hz`; returns the events it caused, in order.

        Samples that do not fill a whole frame wait for the next push.
        """
        samples = np.concatenate([self.state.pending, np.asarray(chunk, dtype=np.float32).reshape(-1)])
        whole = len(samples) // self.frame_samples * self.frame_samples
        self.state.pending = samples[whole:]
        events: list[VadEvent] = []
        active_audio: list[np.ndarray] = []
        self.state.speech_frames_last_push = 0
        for frame in samples[:whole].reshape(-1, self.frame_samples):  # (F, frame_samples)
            self.state.frames_seen += 1
            speech = self.is_speech(frame)
            self.state.speech_frames_last_push += int(speech)
            if self.state.active:
                active_audio.append(frame)
                if self._step_active(speech):
                    events += [_audio_event(active_audio), VadEvent(VadEventKind.STOP, _EMPTY)]
                    active_audio = []
            elif self._step_inactive(frame, speech):
                events.append(VadEvent(VadEventKind.START, self._preroll()))
                active_audio = list(self.state.recent)[-self.start_frames:]
                self.state.recent.clear()
        if active_audio:
            events.append(_audio_event(active_audio))
        return events

    def _step_inactive(self, frame: np.ndarray, speech: bool) -> bool:
        """Returns True when this frame opens the gate."""
        self.state.recent.append(frame)
        settled = self.state.frames_seen > self.settle_frames
        self.state.speech_run = self.state.speech_run + 1 if speech and settled else 0
        if self.state.speech_run < self.start_frames:
            return False
        self.state.active, self.state.speech_run, self.state.silence_run = True, 0, 0
        return True

    def _step_active(self, speech: bool) -> bool:
        """Returns True when this frame closes the gate."""
        self.state.silence_run = 0 if speech else self.state.silence_run + 1
        if self.state.silence_run < self.stop_frames:
            return False
        self.state.active, self.state.silence_run = False, 0
        return True

    def _preroll(self) -> np.ndarray:
        """The last `preroll_samples` before the start window (shorter if the stream is young)."""
        before_onset = list(self.state.recent)[: -self.start_frames]
        if not before_onset or self.preroll_samples == 0:
            return _EMPTY
        return np.concatenate(before_onset)[-self.preroll_samples:]


_EMPTY = np.zeros(0, dtype=np.float32)


def _audio_event(frames: list[np.ndarray]) -> VadEvent:
    return VadEvent(VadEventKind.AUDIO, np.concatenate(frames).astype(np.float32))


def _validate(rate_hz: int, frame_ms: int, aggressiveness: int, start_frames: int, stop_frames: int,
              preroll_ms: int) -> None:
    if rate_hz not in VAD_RATES_HZ:
        raise ValueError(f"webrtcvad takes {VAD_RATES_HZ} Hz, got {rate_hz}")
    if frame_ms not in VAD_FRAME_MS_CHOICES:
        raise ValueError(f"webrtcvad takes {VAD_FRAME_MS_CHOICES} ms frames, got {frame_ms}")
    if not 0 <= aggressiveness <= 3:
        raise ValueError(f"aggressiveness must be 0..3, got {aggressiveness}")
    if start_frames < 1 or stop_frames < 1 or preroll_ms < 0:
        raise ValueError(f"need start_frames ≥ 1, stop_frames ≥ 1, preroll_ms ≥ 0 "
                         f"(got {start_frames}, {stop_frames}, {preroll_ms})")


def _make_vad(aggressiveness: int) -> Any:
    try:
        import webrtcvad
    except ImportError as err:
        raise RuntimeError(f"the voice activity gate needs webrtcvad ({VAD_INSTALL_HINT})") from err
    return webrtcvad.Vad(aggressiveness)


class VadChunkGate:
    """Adapts the frame-level `VadGate` to a per-chunk view (the daemon's and the client's)."""

    def __init__(self, vad: VadGate) -> None:
        self.vad = vad

    def speech_started(self, chunk: np.ndarray) -> tuple[bool, bool]:
        """(speech started, speech stopped) within this chunk."""
        kinds = [event.kind for event in self.vad.push(chunk)]
        return VadEventKind.START in kinds, VadEventKind.STOP in kinds

    @property
    def speech_ms(self) -> int:
        """Voiced audio in the last chunk, in VAD frames (a 40 ms burst of echo residue
        counts 40 ms, not the whole 160 ms chunk it fell into)."""
        return self.vad.state.speech_frames_last_push * self.vad.frame_ms
