"""Echo control on the microphone signal, before the VAD and the model.

`WebRtcEchoCanceller` runs WebRTC's AEC3 (through pywebrtc-audio) with the playback signal as
the reference ("reverse") stream; `HalfDuplexGate` is the fallback without AEC: it mutes the
microphone while the speaker plays and for a tail afterwards. Both take the microphone and
the time-aligned reference at 16 kHz (`DuplexStream` aligns them by the playback clock) and
stream: output may lag input by less than one 10 ms frame.
"""
from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from audio_io.constants import AEC_FRAME_MS, MODEL_INPUT_RATE_HZ, MS_PER_S, samples_for_ms
from audio_io.near_end import NearEndDetector

logger = logging.getLogger(__name__)

ACTIVITY_THRESHOLD = 1e-4  # |sample| above −80 dBFS counts as "the speaker is playing"
AEC_INSTALL_HINT = "pip install 'freeze-omni-assistant[audio]' (pywebrtc-audio)"
AEC3_OUTPUT_DELAY_MS = 8  # AEC3 returns its input this much later (128 samples at 16 kHz, measured)


class AecUnavailableError(RuntimeError):
    """pywebrtc-audio is missing or unusable; use `HalfDuplexGate` instead."""


class EchoCanceller(Protocol):
    """Removes (or mutes) the speaker's own signal from the microphone signal."""

    @property
    def in_warmup(self) -> bool:
        """True while the canceller is still adapting: barge-in should not be trusted yet."""
        ...

    def process(self, mic_16k: np.ndarray, reference_16k: np.ndarray) -> np.ndarray:
        """Feed equal-length (T,) float32 microphone and playback-reference samples at 16 kHz
        (reference[i] is what the speaker played at the instant mic[i] was captured);
        returns the cleaned microphone samples available so far (float32)."""
        ...

    def reset(self) -> None:
        """Forget all adaptation (new devices)."""
        ...


class WebRtcEchoCanceller:
    """WebRTC AEC3 on 10 ms frames, reference = what the speaker played.

    Args:
        sample_rate_hz: rate of both signals (16 kHz: the model's input rate).
        warmup_ms: playback (reference with signal) needed before `in_warmup` turns False;
            AEC3 converges within about a second of far-end speech.
        stream_delay_ms: hint of the echo path delay left after time alignment (AEC3 also
            estimates it).
        residual_gate_db: a 10 ms frame played over by the speaker whose output is this much
            quieter than its input held only our own voice: it is silenced. AEC3 takes a loud
            echo down by 15–25 dB, which leaves speech-like residue above the VAD's level
            floor; a user talking over the answer keeps the frame within a few dB of its
            input (unless they are this much quieter than our echo). None: no gate.
        echo_tail_ms: the echo goes on this long after the reference falls silent (the
            echo path's delay is known to AEC3, not to us), so the gate covers it too.
        near_end_margin_db: a played-over frame this far above the loudest echo the learned
            coupling allows is the user's alone and passes as the microphone heard it (AEC3
            attenuates a user over a weak or absent echo); None: always AEC3's output.

    Raises:
        AecUnavailableError: pywebrtc-audio is not installed.
    """

    def __init__(self, sample_rate_hz: int = MODEL_INPUT_RATE_HZ, warmup_ms: int = 1000,
                 stream_delay_ms: int = 0, residual_gate_db: float | None = 6.0,
                 echo_tail_ms: int = 300, near_end_margin_db: float | None = 20.0) -> None:
        try:
            import pywebrtc_audio
        except ImportError as err:
            raise AecUnavailableError(
                f"echo cancellation needs pywebrtc-audio ({AEC_INSTALL_HINT}); "
                "or turn AEC off to fall back to half duplex") from err
        self.sample_rate_hz = sample_rate_hz
        self.frame_samples = samples_for_ms(sample_rate_hz, AEC_FRAME_MS)  # 160 at 16 kHz
        self.warmup_frames = -(-warmup_ms // AEC_FRAME_MS)
        self.residual_gate = None if residual_gate_db is None else 10.0 ** (-residual_gate_db / 10.0)
        self.echo_tail_frames = -(-echo_tail_ms // AEC_FRAME_MS)
        self.output_delay_samples = samples_for_ms(sample_rate_hz, AEC3_OUTPUT_DELAY_MS)
        self.near_end = None if near_end_margin_db is None else NearEndDetector(near_end_margin_db)
        self._aec = pywebrtc_audio.EchoCanceller(
            sample_rate=sample_rate_hz, num_channels=1, stream_delay_ms=stream_delay_ms)
        self.reset()

    def reset(self) -> None:
        self._aec.reset()
        self._mic_rest = np.zeros(0, dtype=np.float32)
        self._ref_rest = np.zeros(0, dtype=np.float32)
        self._mic_tail = np.zeros(self.output_delay_samples, dtype=np.float32)  # raw mic, AEC3-aligned
        if self.near_end is not None:
            self.near_end.reset()
        self.active_reference_frames = 0
        self.gated_frames = 0
        self._frames_since_played = self.echo_tail_frames + 1
        self.echo_power_in = 0.0  # microphone power summed over played-over frames
        self.echo_power_out = 0.0  # the same after cancellation (and the gate)

    @property
    def in_warmup(self) -> bool:
        return self.active_reference_frames < self.warmup_frames

    def process(self, mic_16k: np.ndarray, reference_16k: np.ndarray) -> np.ndarray:
        mic, ref = _as_pair(mic_16k, reference_16k)
        mic = np.concatenate([self._mic_rest, mic])
        ref = np.concatenate([self._ref_rest, ref])
        whole = len(mic) // self.frame_samples * self.frame_samples
        self._mic_rest, self._ref_rest = mic[whole:], ref[whole:]
        if whole == 0:
            return np.zeros(0, dtype=np.float32)
        frames = ref[:whole].reshape(-1, self.frame_samples)  # (F, 160)
        played_over = np.abs(frames).max(axis=1) > ACTIVITY_THRESHOLD  # (F,)
        self.active_reference_frames += int(np.count_nonzero(played_over))
        # whole frames only: pywebrtc-audio zero-pads a partial last frame, which would
        # insert silence into a stream
        out = self._aec.process(np.ascontiguousarray(mic[:whole]), np.ascontiguousarray(ref[:whole]))
        out = np.asarray(out, dtype=np.float32).reshape(-1, self.frame_samples)  # (F, 160), frame-aligned
        out = self._pass_the_user(mic[:whole], frames, out)
        echo_may_be_heard = self._within_echo_tail(played_over)
        return self._gate_residual(mic[:whole].reshape(-1, self.frame_samples), out,
                                   echo_may_be_heard).reshape(-1)

    def _pass_the_user(self, mic: np.ndarray, reference: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Replace AEC3's output by the raw microphone (delayed as AEC3 delays it) on frames
        that hold the user far above any echo."""
        if self.near_end is None:
            return out
        delayed = np.concatenate([self._mic_tail, mic])
        self._mic_tail = delayed[len(mic):]
        user_only = self.near_end.push(mic.reshape(-1, self.frame_samples), reference)  # (F,)
        raw = delayed[:len(mic)].reshape(-1, self.frame_samples)
        out[user_only] = raw[user_only]
        return out

    def _within_echo_tail(self, played_over: np.ndarray) -> np.ndarray:
        """(F,) bool: the frame or one up to `echo_tail_ms` before it was played over."""
        positions = np.arange(len(played_over))
        last_played = np.maximum.accumulate(np.where(played_over, positions, -1))
        since = np.where(last_played >= 0, positions - last_played, self._frames_since_played + positions + 1)
        self._frames_since_played = int(since[-1])
        return since <= self.echo_tail_frames

    def _gate_residual(self, mic: np.ndarray, out: np.ndarray, played_over: np.ndarray) -> np.ndarray:
        """Silence (F, 160) output frames that hold nothing but what is left of our echo."""
        power_in = np.mean(np.square(mic, dtype=np.float64), axis=1)  # (F,)
        power_out = np.mean(np.square(out, dtype=np.float64), axis=1)
        echo_only = played_over & (power_out < power_in * self.residual_gate) if self.residual_gate else \
            np.zeros_like(played_over)
        self.gated_frames += int(np.count_nonzero(echo_only))
        out[echo_only] = 0.0
        self.echo_power_in += float(power_in[played_over].sum())
        self.echo_power_out += float(np.mean(np.square(out[played_over], dtype=np.float64), axis=1).sum())
        return out

    @property
    def echo_return_loss_enhancement_db(self) -> float | None:
        """Microphone power over output power while the speaker played (a user talking over
        the answer counts too, so this is a lower bound); None before any playback."""
        if self.echo_power_in <= 0.0:
            return None
        return 10.0 * float(np.log10(self.echo_power_in / max(self.echo_power_out, 1e-20)))


class HalfDuplexGate:
    """Mutes the microphone while the reference carries audio and `tail_ms` after it.

    Sample-exact: returns as many samples as it is given.

    Args:
        tail_ms: the room's reverberation and the output latency's jitter, still heard after
            the last played sample.
        sample_rate_hz: rate of both signals.
    """

    def __init__(self, tail_ms: int = 300, sample_rate_hz: int = MODEL_INPUT_RATE_HZ) -> None:
        self.tail_samples = tail_ms * sample_rate_hz // MS_PER_S
        self.reset()

    def reset(self) -> None:
        self._since_active = self.tail_samples + 1  # samples since the reference was last active
        self.muted_samples = 0

    @property
    def in_warmup(self) -> bool:
        return False

    @property
    def muting(self) -> bool:
        """True if the last processed sample was muted."""
        return self._since_active <= self.tail_samples

    def process(self, mic_16k: np.ndarray, reference_16k: np.ndarray) -> np.ndarray:
        mic, ref = _as_pair(mic_16k, reference_16k)
        positions = np.arange(len(mic))
        active_at = np.where(np.abs(ref) > ACTIVITY_THRESHOLD, positions, -1)
        last_active = np.maximum.accumulate(active_at) if len(mic) else active_at  # (T,)
        since = np.where(last_active >= 0, positions - last_active, self._since_active + positions + 1)
        muted = since <= self.tail_samples
        if len(mic):
            self._since_active = int(since[-1])
        self.muted_samples += int(np.count_nonzero(muted))
        return np.where(muted, 0.0, mic).astype(np.float32)


def _as_pair(mic: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mic = np.asarray(mic, dtype=np.float32).reshape(-1)
    ref = np.asarray(ref, dtype=np.float32).reshape(-1)
    if len(mic) != len(ref):
        raise ValueError(f"microphone and reference lengths differ: {len(mic)} vs {len(ref)}")
    return mic, ref


def erle_db(mic: np.ndarray, cleaned: np.ndarray) -> float:
    """Echo return loss enhancement: power of the echo-only microphone signal over the
    power left after cancellation, in dB (aligned, equal-length float arrays)."""
    residual = float(np.mean(np.square(cleaned, dtype=np.float64)))
    return 10.0 * float(np.log10(float(np.mean(np.square(mic, dtype=np.float64))) / max(residual, 1e-20)))
