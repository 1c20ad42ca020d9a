"""Frames where the microphone holds (almost) nothing but the user, while the speaker plays.

AEC3's suppressor cannot tell a weak echo path from none: with no echo at all (a headset, a
speaker across the room) it still takes over 6 dB off most voiced frames of a user talking
over the answer, so barge-in fails exactly where echo is no problem. This detector learns how
strongly the speaker couples into the microphone and marks the frames whose power is far above
any echo that coupling allows; the canceller passes those frames as the microphone heard them.

Coupling is the microphone's 400 ms power envelope over the reference's, taken while the
speaker has played for a while (the first envelope after a pause would count the echo path's
delay as a weak coupling) and summarised by a low percentile over the last 5 s of playback: the
user's speech only raises envelopes, so the low percentile is the echo's share. A frame is the
user's when its power exceeds that coupling times the loudest reference frame of the last
400 ms by `margin_db`: the echo in it is at least that far below the user.
"""
from __future__ import annotations

from collections import deque

import numpy as np

ENVELOPE_FRAMES = 40  # 400 ms of 10 ms frames: spans the echo path's delay and reverberation
HISTORY_FRAMES = 500  # 5 s of playback envelopes
MIN_HISTORY_FRAMES = 50  # 0.5 s of playback envelopes before the coupling is trusted
SETTLE_FRAMES = 10  # the echo path's delay: its first 100 ms of playback are not heard yet
COUPLING_PERCENTILE = 20.0
ACTIVE_POWER = 1e-8  # mean square of a reference frame above −80 dBFS: the speaker plays
MIN_USER_POWER = 1e-6  # −60 dBFS: quieter frames are never taken for the user


class NearEndDetector:
    """Per-10 ms-frame decision: the microphone's content is the user's, not our echo.

    Args:
        margin_db: how far above the loudest echo the coupling allows a frame must be.
    """

    def __init__(self, margin_db: float = 20.0) -> None:
        self.margin = 10.0 ** (margin_db / 10.0)
        self.reset()

    def reset(self) -> None:
        self._mic_powers: deque[float] = deque(maxlen=ENVELOPE_FRAMES)
        self._ref_powers: deque[float] = deque(maxlen=ENVELOPE_FRAMES)
        self._couplings: deque[float] = deque(maxlen=HISTORY_FRAMES)
        self._playing_frames = 0  # reference frames since the speaker last fell silent for 400 ms
        self._silent_frames = ENVELOPE_FRAMES
        self.near_end_frames = 0

    @property
    def coupling(self) -> float | None:
        """Echo power over reference power (a low estimate), or None while not yet learned."""
        if len(self._couplings) < MIN_HISTORY_FRAMES:
            return None
        return float(np.percentile(np.fromiter(self._couplings, dtype=np.float64), COUPLING_PERCENTILE))

    def push(self, mic: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """(F, N) microphone and reference frames → (F,) bool: the frame is the user's alone."""
        mic_power = np.mean(np.square(mic, dtype=np.float64), axis=1)  # (F,)
        ref_power = np.mean(np.square(reference, dtype=np.float64), axis=1)
        near_end = np.zeros(len(mic_power), dtype=bool)
        coupling = self.coupling  # as learned up to this call: it moves over seconds, not frames
        for i, (mic_p, ref_p) in enumerate(zip(mic_power, ref_power)):
            self._learn(float(mic_p), float(ref_p))
            if coupling is not None and ref_p > ACTIVE_POWER and mic_p > MIN_USER_POWER:
                near_end[i] = mic_p > self.margin * coupling * max(self._ref_powers)
        self.near_end_frames += int(np.count_nonzero(near_end))
        return near_end

    def _learn(self, mic_power: float, ref_power: float) -> None:
        self._mic_powers.append(mic_power)
        self._ref_powers.append(ref_power)
        if ref_power > ACTIVE_POWER:
            self._silent_frames = 0
            self._playing_frames += 1
        else:
            self._silent_frames += 1
            if self._silent_frames >= ENVELOPE_FRAMES:
                self._playing_frames = 0
        if self._playing_frames >= ENVELOPE_FRAMES + SETTLE_FRAMES:  # the envelopes hold only playback
            ref_envelope = sum(self._ref_powers)
            if ref_envelope > ACTIVE_POWER * ENVELOPE_FRAMES:
                self._couplings.append(sum(self._mic_powers) / ref_envelope)
