"""The near-end detector: the user's frames over a weak or absent echo, never our own echo."""
from __future__ import annotations

import numpy as np
import pytest

from audio_io.near_end import ENVELOPE_FRAMES, MIN_HISTORY_FRAMES, SETTLE_FRAMES, NearEndDetector
from tests.test_audio_io import fixture_speech


def frames(signal: np.ndarray) -> np.ndarray:
    return signal[: len(signal) // 160 * 160].reshape(-1, 160)


def answers_with_pauses(count: int = 4, pause_s: float = 1.0) -> np.ndarray:
    """What the speaker plays: answers with silence between them (each start re-opens the
    echo path's delay, when the microphone has not heard the echo yet)."""
    speech = np.tile(fixture_speech(), 2)
    pause = np.zeros(int(pause_s * 16_000), dtype=np.float32)
    return np.concatenate([np.concatenate([speech, pause]) for _ in range(count)])


def room(reference: np.ndarray, gain_db: float, delay_ms: int = 40, noise: float = 1e-4) -> np.ndarray:
    """The microphone: the reference delayed, with a short reverberant tail, plus noise."""
    rng = np.random.default_rng(0)
    tail = np.exp(-np.arange(800) / 200.0) * rng.normal(0, 0.2, 800)
    tail[0] = 1.0
    echo = np.convolve(reference, tail)[: len(reference)] * 10 ** (gain_db / 20)
    delay = delay_ms * 16
    mic = np.concatenate([np.zeros(delay), echo[:-delay]]) + rng.normal(0, noise, len(reference))
    return mic.astype(np.float32)


def run(detector: NearEndDetector, mic: np.ndarray, reference: np.ndarray) -> np.ndarray:
    marks = [detector.push(frames(mic[i:i + 2560]), frames(reference[i:i + 2560]))
             for i in range(0, len(mic) - 2560 + 1, 2560)]
    return np.concatenate(marks)


@pytest.mark.parametrize("gain_db", [6.0, 0.0, -10.0, -30.0])
def test_our_echo_is_never_taken_for_the_user(gain_db):
    reference = answers_with_pauses()
    detector = NearEndDetector()
    marks = run(detector, room(reference, gain_db), reference)
    assert detector.coupling is not None
    assert not marks.any(), np.flatnonzero(marks)[:10]


def test_the_user_over_no_echo_is_found_once_the_coupling_is_known():
    reference = answers_with_pauses(count=2)
    mic = room(reference, gain_db=-120.0)
    user = 0.1 * fixture_speech("question_noise_question.wav")[:32_000]
    early, late = 3_200, len(reference) // 2 + 8_000  # 0.2 s into the first answer, 0.5 s into the second
    for at in (early, late):
        mic[at:at + len(user)] += user
    marks = run(NearEndDetector(), mic, reference)
    playing = np.mean(frames(reference) ** 2, axis=1)[: len(marks)] > 1e-8
    voiced = (np.mean(frames(mic) ** 2, axis=1)[: len(marks)] > 1e-4) & playing  # the frames AEC3 judges
    learning = ENVELOPE_FRAMES + SETTLE_FRAMES + MIN_HISTORY_FRAMES  # the first second of playback ever
    assert not marks[:learning].any()  # nothing learned yet: AEC3 decides
    second = slice(late // 160, (late + len(user)) // 160)
    assert marks[second][voiced[second]].mean() > 0.8


def test_the_user_only_just_above_a_loud_echo_is_left_to_aec3():
    reference = answers_with_pauses(count=2)
    mic = room(reference, gain_db=-6.0)
    user = 0.3 * fixture_speech("question_noise_question.wav")[:32_000]
    at = len(reference) // 2 + 8_000
    mic[at:at + len(user)] += user
    assert not run(NearEndDetector(), mic, reference).any()
