"""The echo reference stays aligned with the microphone when timestamps misbehave.

Measured through PulseAudio's ALSA plugin: one direction's timestamps ramp away from its
sample count by up to 0.3 % and snap back by ~10 ms, and single blocks come up to 10.6 ms off,
while the echo keeps one lag behind the reference. Re-anchoring a stream on that moved the
reference by 10 ms and AEC3 lost the echo (ERLE 7-18 dB in `test_echo_cancelled_through_real_streams`).
A real gap (samples lost in an xrun) must still move the reference with the microphone.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from audio_io.resample import resample
from tests.test_audio_io import RecordingCanceller, make_buffers

RATE_HZ, FRAMES = 48_000, 960  # 20 ms blocks
BLOCK_S = FRAMES / RATE_HZ
OUT_LATENCY_S = 0.03
PA_INPUT_OVERFLOW = 0x2
WINDOW = 3_200  # 200 ms at 16 kHz
SEARCH = 2_400  # ±150 ms


def _no_error(block: int) -> float:
    return 0.0


def pulse_like_timestamp_error(block: int) -> float:
    """Seconds: a ramp of −0.3 % that snaps back every 4 s, and a block 10.6 ms late now and then."""
    ramp = -0.003 * BLOCK_S * (block % 200)  # down to −11.9 ms
    late = 0.0106 if block % 37 == 5 else 0.0
    return ramp + late


def reference_lags(mic_error: Callable[[int], float] = _no_error,
                   out_error: Callable[[int], float] = _no_error,
                   gap_block: int | None = None, gap_s: float = 0.0, flagged: bool = True,
                   blocks: int = 400) -> list[tuple[float, int]]:
    """Drive both callbacks for `blocks` blocks; the microphone loses `gap_s` of samples
    before `gap_block` (flagged as an input overflow or not). Returns (second, lag) per 200 ms
    window: where in what was played (16 kHz samples) the canceller's reference was taken from,
    relative to the microphone sample it was given with."""
    canceller = RecordingCanceller()
    buf, clock = make_buffers(in_hz=RATE_HZ, out_hz=RATE_HZ, echo_canceller=canceller)
    rng = np.random.default_rng(0)
    buf.play(rng.uniform(-0.5, 0.5, int(24_000 * BLOCK_S * (blocks + 10))).astype(np.float32))
    played, silence = [], np.zeros(FRAMES, np.int16).tobytes()
    for k in range(blocks):
        now = clock.now_s = k * BLOCK_S
        times = {"current_time": now, "output_buffer_dac_time": now + OUT_LATENCY_S + out_error(k)}
        data, _ = buf.output_callback(None, FRAMES, times, 0)
        played.append(np.frombuffer(data, dtype=np.int16) / 32768)
        lost_s = gap_s if gap_block is not None and k >= gap_block else 0.0
        status = PA_INPUT_OVERFLOW if flagged and k == gap_block else 0
        buf.input_callback(silence, FRAMES, {"input_buffer_adc_time": now + lost_s + mic_error(k)}, status)
        while buf.read_model_chunk(0.0) is not None:
            pass
    reference = np.concatenate(canceller.references)
    played16 = resample(np.concatenate(played).astype(np.float32), RATE_HZ, 16_000)
    lags = []
    for start in range(SEARCH + 1_600, min(len(reference), len(played16)) - WINDOW - SEARCH, WINDOW):
        piece = reference[start:start + WINDOW]
        assert np.abs(piece).max() > 0.1, start  # playing: there is something to align
        correlation = np.correlate(played16[start - SEARCH:start + WINDOW + SEARCH], piece, "valid")
        lags.append((start / 16_000, int(np.argmax(correlation)) - SEARCH))
    return lags


def test_reference_lag_holds_through_ramping_and_late_timestamps():
    """8 s with the microphone's timestamps ramping and snapping as PulseAudio's do: one lag."""
    steady = {lag for _, lag in reference_lags()}
    assert len(steady) == 1, steady
    for errors in ({"mic_error": pulse_like_timestamp_error}, {"out_error": pulse_like_timestamp_error}):
        lags = {lag for _, lag in reference_lags(**errors)}
        assert lags == steady, (errors, lags)


def test_reference_follows_a_flagged_microphone_gap():
    """The microphone loses 30 ms in an overflow: the reference skips 30 ms with it, within 0.4 s."""
    before = {lag for _, lag in reference_lags()}
    lags = reference_lags(gap_block=150, gap_s=0.03)
    gap_at_s = 150 * BLOCK_S
    assert {lag for t, lag in lags if t + WINDOW / 16_000 < gap_at_s} == before
    after = {lag for t, lag in lags if t > gap_at_s + 0.4}
    assert after == {next(iter(before)) + 480}, after


def test_reference_follows_a_long_unflagged_gap_but_not_a_short_one():
    """Without an xrun flag only a gap beyond any timestamp ramp (50 ms) moves the reference:
    100 ms does, 30 ms is left to AEC3's own delay tracking."""
    before = next(iter({lag for _, lag in reference_lags()}))
    gap_at_s = 150 * BLOCK_S
    long_gap = reference_lags(gap_block=150, gap_s=0.1, flagged=False)
    assert {lag for t, lag in long_gap if t > gap_at_s + 0.4} == {before + 1_600}
    short_gap = reference_lags(gap_block=150, gap_s=0.03, flagged=False)
    assert {lag for _, lag in short_gap} == {before}
