"""audio_io without a sound card: resampling, callbacks, playback clock, VAD, echo control,
device lookup and device loss (through a fake PortAudio)."""
from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from audio_io import devices as devices_mod
from audio_io import duplex as duplex_mod
from audio_io.aec import HalfDuplexGate, erle_db
from audio_io.constants import MODEL_CHUNK_SAMPLES, VAD_FRAME_SAMPLES, exact_div
from audio_io.devices import DeviceInfo, NoAudioDeviceError, find_device, pick_by_name
from audio_io.duplex import DuplexStream, RescanPolicy
from audio_io.duplex_buffers import PA_CONTINUE, DuplexBuffers
from audio_io.resample import StreamingResampler, resample
from audio_io.vad import VadEventKind, VadGate
from audio_io.wav_file import read_mono

REPO = Path(__file__).resolve().parents[1]
FIXTURE_INPUTS = REPO.parent / "shared" / "fixtures" / "freeze-omni-tiny" / "inputs"


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def fixture_speech(name: str = "question.wav") -> np.ndarray:
    path = FIXTURE_INPUTS / name
    if not path.is_file():
        pytest.skip(f"shared fixture not found at {path}")
    return read_mono(path, 16_000)


# ---- constants and resampling ----

def test_constants_are_exact():
    assert MODEL_CHUNK_SAMPLES == 2560 and VAD_FRAME_SAMPLES == 480
    assert exact_div(44_100 * 20, 1000) == 882
    with pytest.raises(ValueError, match="not a multiple"):
        exact_div(44_100, 1000)


@pytest.mark.parametrize("from_hz,to_hz", [
    pytest.param(44_100, 16_000, id="44k1-to-16k"), pytest.param(48_000, 16_000, id="48k-to-16k"),
    pytest.param(24_000, 48_000, id="24k-to-48k"), pytest.param(24_000, 44_100, id="24k-to-44k1"),
    pytest.param(16_000, 16_000, id="same-rate")])
def test_streaming_resampler_equals_one_shot(from_hz, to_hz):
    rng = np.random.default_rng(0)
    signal = rng.normal(0.0, 0.3, from_hz).astype(np.float32)  # 1 s
    resampler, pieces, start = StreamingResampler(from_hz, to_hz), [], 0
    while start < len(signal):  # irregular blocks, like callbacks of changing size
        size = int(rng.integers(1, 1500))
        pieces.append(resampler.process(signal[start:start + size]))
        start += size
    streamed = np.concatenate(pieces)
    lag = resampler.pending_input_samples
    assert lag < 40, lag  # the stream holds back well under a millisecond
    one_shot = resample(signal, from_hz, to_hz)
    np.testing.assert_allclose(streamed, one_shot[: len(streamed)], atol=1e-6)
    np.testing.assert_allclose(np.concatenate([streamed, resampler.flush()]), one_shot, atol=1e-6)


# ---- callbacks and playback clock (fake buffers) ----

def make_buffers(in_hz=44_100, out_hz=48_000, **kwargs) -> tuple[DuplexBuffers, FakeClock]:
    clock = FakeClock()
    return DuplexBuffers(in_hz, out_hz, block_ms=20, clock=clock, **kwargs), clock


def run_output(buf: DuplexBuffers, blocks: int, latency_s: float = 0.0) -> np.ndarray:
    """Drive the output callback like PortAudio would; returns what it played (int16)."""
    frames, out = buf.output_block_frames, []
    for _ in range(blocks):
        now = buf.clock()
        times = {"current_time": now, "output_buffer_dac_time": now + latency_s}
        data, flag = buf.output_callback(None, frames, times, 0)
        assert flag == PA_CONTINUE and len(data) == frames * 2
        out.append(np.frombuffer(data, dtype=np.int16))
        buf.clock.now_s += frames / buf.output_rate_hz
    return np.concatenate(out)


def tone_24k(seconds: float) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * 440 * np.arange(int(24_000 * seconds)) / 24_000)).astype(np.float32)


def test_output_callback_zero_fills_and_counts_underruns_only_mid_utterance():
    buf, _ = make_buffers()
    assert not run_output(buf, 5).any() and buf.underruns == 0  # idle silence is no underrun
    buf.play(tone_24k(0.03))  # 1.5 blocks
    played = run_output(buf, 3)
    assert played[:960].any() and not played[-960:].any()
    assert buf.underruns == 1  # ran dry once, counted once
    buf.play(tone_24k(0.03))
    buf.finish_playback()  # a finished utterance running out is no underrun
    run_output(buf, 4)
    assert buf.underruns == 1


def test_playback_clock_counts_only_real_audio():
    buf, _ = make_buffers()
    buf.play(tone_24k(1.0))
    assert buf.queued_samples_24k > 23_900 and buf.played_samples_24k == 0
    run_output(buf, 25)  # 0.5 s
    assert buf.played_samples_24k == 12_000
    buf.finish_playback()
    run_output(buf, 40)  # past the end: zero-fill is not counted
    assert buf.played_samples_24k == 24_000 and buf.queued_samples_24k == 0


def test_playback_clock_subtracts_output_latency():
    buf, clock = make_buffers()
    buf.play(tone_24k(1.0))
    run_output(buf, 25, latency_s=0.1)
    assert abs(buf.played_samples_24k - (12_000 - 2_400)) <= 24  # 100 ms still inside the device
    clock.now_s += 0.2  # playback stopped: the device drains
    assert buf.played_samples_24k == 12_000


def test_flush_playback_drops_everything_at_once():
    buf, _ = make_buffers()
    buf.play(tone_24k(1.0))
    run_output(buf, 10)  # 200 ms played
    dropped = buf.flush_playback()
    assert dropped == pytest.approx(24_000 - 4_800, abs=20)
    assert buf.queued_samples_24k == 0
    assert not run_output(buf, 3).any()  # the very next block is silent
    assert buf.played_samples_24k == 4_800 and buf.underruns == 0


def test_input_queue_is_bounded_and_keeps_the_newest():
    buf, _ = make_buffers(in_hz=16_000, queue_blocks=10)
    block = 320  # 20 ms at 16 kHz
    for index in range(15):
        pcm = np.full(block, index * 100, dtype=np.int16).tobytes()
        assert buf.input_callback(pcm, block, {"input_buffer_adc_time": 0.0}, 0) == (None, PA_CONTINUE)
    assert buf.overruns == 5
    chunk = buf.read_model_chunk(timeout_s=0.0)
    assert chunk is not None and chunk.shape == (MODEL_CHUNK_SAMPLES,)
    assert chunk[0] == pytest.approx(500 / 32768)  # blocks 0-4 were dropped
    assert buf.read_model_chunk(timeout_s=0.0) is None  # 2 blocks left: not a chunk yet


def test_mic_path_resamples_native_blocks_to_model_chunks():
    buf, _ = make_buffers(in_hz=44_100)
    signal = (0.3 * np.sin(2 * np.pi * 300 * np.arange(44_100) / 44_100)).astype(np.float32)
    pcm = np.round(signal * 32768).astype(np.int16)
    for start in range(0, len(pcm), 882):
        block = pcm[start:start + 882].tobytes()
        buf.input_callback(block, 882, {"input_buffer_adc_time": start / 44_100}, 0)
    chunks = []
    while (chunk := buf.read_model_chunk(timeout_s=0.0)) is not None:
        chunks.append(chunk)
    assert len(chunks) == 6  # 1 s = 6.25 chunks
    expected = resample(pcm.astype(np.float32) / 32768, 44_100, 16_000)
    np.testing.assert_allclose(np.concatenate(chunks), expected[: 6 * MODEL_CHUNK_SAMPLES], atol=1e-5)


@pytest.mark.parametrize("args", [
    pytest.param((None, 882, None, 0), id="none"), pytest.param(("text", 882, {}, 0), id="str"),
    pytest.param((b"\x01", "x", None, "bad"), id="odd-bytes"), pytest.param((12, 882, [], None), id="int"),
    pytest.param((memoryview(b"\x00\x01" * 882), 882, {"input_buffer_adc_time": "x"}, 0), id="view")])
def test_callbacks_never_raise(args):
    buf, _ = make_buffers()
    assert buf.input_callback(*args) == (None, PA_CONTINUE)
    data, flag = buf.output_callback(*args)
    assert flag == PA_CONTINUE and isinstance(data, bytes)
    buf.read_model_chunk(timeout_s=0.0)  # the consumer copes with whatever was queued


def test_pa_continue_matches_pyaudio():
    pyaudio = pytest.importorskip("pyaudio")
    assert PA_CONTINUE == pyaudio.paContinue


# ---- VAD ----

def vad_verdicts(signal: np.ndarray, frame: int, aggressiveness: int) -> list[bool]:
    import webrtcvad

    from audio_io.wav_file import float_to_int16
    vad = webrtcvad.Vad(aggressiveness)
    return [vad.is_speech(float_to_int16(signal[i:i + frame]).tobytes(), 16_000)
            for i in range(0, len(signal) - frame + 1, frame)]


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_vad_gate_start_preroll_stop(frame_ms):
    pytest.importorskip("webrtcvad")
    speech = fixture_speech()
    rng = np.random.default_rng(0)
    signal = np.concatenate([np.zeros(16_000), speech, np.zeros(24_000)]).astype(np.float32)
    signal += rng.normal(0, 1e-3, len(signal)).astype(np.float32)
    gate = VadGate(frame_ms=frame_ms, aggressiveness=2, start_frames=3, stop_frames=10, preroll_ms=300,
                   min_level_dbfs=None)  # positions follow webrtcvad's verdicts alone
    events = [event for i in range(0, len(signal), MODEL_CHUNK_SAMPLES)
              for event in gate.push(signal[i:i + MODEL_CHUNK_SAMPLES])]
    kinds = [e.kind for e in events if e.kind is not VadEventKind.AUDIO]
    assert kinds == [VadEventKind.START, VadEventKind.STOP]
    # where START and STOP must fall, from webrtcvad's own verdicts
    frame = gate.frame_samples
    verdicts = vad_verdicts(signal, frame, 2)
    settle = gate.settle_frames
    onset = next(i for i in range(settle, len(verdicts)) if all(verdicts[i:i + 3]))
    stop = next(i for i in range(onset + 3, len(verdicts)) if not any(verdicts[i - 9:i + 1]))
    preroll = events[0].audio
    assert len(preroll) == 300 * 16  # exactly preroll_ms
    heard = np.concatenate([preroll] + [e.audio for e in events if e.kind is VadEventKind.AUDIO])
    start = onset * frame - len(preroll)
    np.testing.assert_array_equal(heard, signal[start:(stop + 1) * frame])  # contiguous, nothing lost


def test_vad_level_floor_ignores_faint_speech_that_webrtcvad_alone_hears():
    """Echo cancellation leaves our own voice 30 dB down, at −70 to −85 dBFS; webrtcvad judges spectral
    shape, so it hears speech there. The level floor keeps such residue from opening a turn."""
    pytest.importorskip("webrtcvad")
    speech = fixture_speech()
    speech = speech / np.sqrt(np.mean(np.square(speech)))  # 0 dBFS RMS
    signal = np.concatenate([np.zeros(16_000), speech, np.zeros(16_000)]).astype(np.float32)

    def starts(level_dbfs: float, floor_dbfs: float | None) -> int:
        gate = VadGate(aggressiveness=2, min_level_dbfs=floor_dbfs)
        scaled = signal * np.float32(10.0 ** (level_dbfs / 20.0))
        return sum(e.kind is VadEventKind.START for i in range(0, len(scaled), 2560)
                   for e in gate.push(scaled[i:i + 2560]))

    assert starts(-70.0, None) >= 1  # what the floor is for
    assert starts(-70.0, -60.0) == 0
    assert starts(-25.0, -60.0) == 1  # ordinary speech still opens the gate


def test_chunk_gate_measures_speech_by_frame_not_by_chunk():
    """A burst of 60 ms inside a 160 ms chunk counts 60 ms: echo residue comes in such bursts,
    and a barge-in needs `min_barge_in_ms` of speech, not that many chunks touched by it."""
    pytest.importorskip("webrtcvad")
    from audio_io.vad import VadChunkGate

    speech = fixture_speech()
    speech = (speech / np.sqrt(np.mean(np.square(speech))) * 0.1).astype(np.float32)  # −20 dBFS
    voiced = next(i for i in range(0, len(speech) - MODEL_CHUNK_SAMPLES, 160)
                  if all(vad_verdicts(speech[i:i + MODEL_CHUNK_SAMPLES], 320, 2)))
    whole = speech[voiced:voiced + MODEL_CHUNK_SAMPLES]
    burst = np.zeros(MODEL_CHUNK_SAMPLES, dtype=np.float32)
    burst[:960] = whole[:960]  # 60 ms: three 20 ms frames
    gate = VadChunkGate(VadGate(frame_ms=20, aggressiveness=2, min_level_dbfs=-60.0, settle_ms=0))
    gate.speech_started(whole)
    assert gate.speech_ms == 160
    gate.speech_started(burst)
    assert 0 < gate.speech_ms <= 60
    gate.speech_started(np.zeros(MODEL_CHUNK_SAMPLES, dtype=np.float32))
    assert gate.speech_ms == 0


def test_vad_gate_stays_closed_on_silence():
    pytest.importorskip("webrtcvad")
    noise = np.random.default_rng(1).normal(0, 3e-3, 5 * 16_000).astype(np.float32)
    gate = VadGate(aggressiveness=2)
    assert [e for i in range(0, len(noise), 2560) for e in gate.push(noise[i:i + 2560])] == []


# ---- echo control ----

def synthetic_echo(delay_ms: int = 40, gain: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(reference, microphone): speech played, heard delayed and attenuated with a little noise."""
    reference = np.tile(fixture_speech(), 3)  # ~6 s
    delay = delay_ms * 16
    mic = np.zeros_like(reference)
    mic[delay:] = gain * reference[:-delay]
    mic += np.random.default_rng(0).normal(0, 1e-3, len(mic)).astype(np.float32)
    return reference, mic


def run_aec(aec, mic: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, list[bool]]:
    out, warmup = [], []
    for i in range(0, len(mic), MODEL_CHUNK_SAMPLES):
        out.append(aec.process(mic[i:i + MODEL_CHUNK_SAMPLES], reference[i:i + MODEL_CHUNK_SAMPLES]))
        warmup.append(aec.in_warmup)
    return np.concatenate(out), warmup


AEC_DELAY_SAMPLES = 127  # WebRTC's AEC3 path delays its output by ~8 ms at 16 kHz


def test_webrtc_aec_removes_echo_after_warmup(record_property):
    pytest.importorskip("pywebrtc_audio")
    from audio_io.aec import WebRtcEchoCanceller

    reference, mic = synthetic_echo()
    out, warmup = run_aec(WebRtcEchoCanceller(warmup_ms=1000), mic, reference)
    assert warmup[:6] == [True] * 6 and not any(warmup[7:])  # 1 s of playback
    after = slice(2 * 16_000, len(out) - AEC_DELAY_SAMPLES)
    erle = erle_db(mic[after], out[after.start + AEC_DELAY_SAMPLES:after.stop + AEC_DELAY_SAMPLES])
    record_property("aec_erle_db", round(erle, 1))
    assert erle >= 20.0, erle


def test_webrtc_aec_keeps_the_user_during_double_talk():
    pytest.importorskip("pywebrtc_audio")
    from audio_io.aec import WebRtcEchoCanceller

    reference, mic = synthetic_echo()
    user = 0.5 * fixture_speech("question_noise_question.wav")[:32_000]
    at = 56_000
    mic[at:at + len(user)] += user
    out, _ = run_aec(WebRtcEchoCanceller(), mic, reference)
    kept = out[at + AEC_DELAY_SAMPLES:at + AEC_DELAY_SAMPLES + len(user)]
    correlation = float(np.dot(kept, user) / np.linalg.norm(kept) / np.linalg.norm(user))
    level_db = 10 * np.log10(np.mean(kept ** 2) / np.mean(user ** 2))
    assert correlation > 0.5 and level_db > -6.0, (correlation, level_db)


def test_webrtc_aec_keeps_the_user_when_the_room_has_no_echo():
    """A headset or a speaker across the room: AEC3 alone took over 6 dB off 48 of 70 voiced
    frames of this voice while the answer played; the near-end detector passes them."""
    pytest.importorskip("pywebrtc_audio")
    from audio_io.aec import WebRtcEchoCanceller

    reference, _ = synthetic_echo()
    user = 0.1 * fixture_speech("question_noise_question.wav")[:32_000]  # a normal voice, about -20 dBFS
    at = 56_000
    mic = np.random.default_rng(0).normal(0, 1e-4, len(reference)).astype(np.float32)  # no echo
    mic[at:at + len(user)] += user
    out, _ = run_aec(WebRtcEchoCanceller(), mic, reference)
    kept = out[at + AEC_DELAY_SAMPLES:at + AEC_DELAY_SAMPLES + len(user)]
    frames = len(kept) // 160 * 160
    kept_power = np.mean(kept[:frames].reshape(-1, 160) ** 2, axis=1)  # (10 ms frames,)
    user_power = np.mean(user[:frames].reshape(-1, 160) ** 2, axis=1)
    voiced = user_power > 1e-4
    lost = kept_power[voiced] < user_power[voiced] / 4  # more than 6 dB taken off the user
    assert lost.mean() < 0.2, f"{lost.sum()} of {voiced.sum()} voiced frames lost over 6 dB"


def test_half_duplex_gate_mutes_while_playing_plus_tail():
    gate = HalfDuplexGate(tail_ms=100)
    mic = np.ones(16_000, dtype=np.float32)
    reference = np.zeros(16_000, dtype=np.float32)
    reference[4_000:8_000] = 0.5  # playback from 250 to 500 ms
    out = np.concatenate([gate.process(mic[i:i + 700], reference[i:i + 700]) for i in range(0, 16_000, 700)])
    assert out.shape == mic.shape
    assert out[:4_000].all() and not out[4_000:8_000 + 1_600].any() and out[8_000 + 1_601:].all()
    assert not gate.in_warmup and not gate.muting


@pytest.mark.parametrize("timestamp_error_s", [
    pytest.param(0.0, id="exact-timestamps"), pytest.param(-0.03, id="mic-timestamps-30ms-early")])
def test_duplex_buffers_align_reference_for_the_echo_canceller(timestamp_error_s):
    """A simulated room: the microphone hears the speaker 20 ms after the DAC played it."""
    pytest.importorskip("pywebrtc_audio")
    from audio_io.aec import WebRtcEchoCanceller

    rate, frames = 48_000, 960
    buf, clock = make_buffers(in_hz=rate, out_hz=rate, echo_canceller=WebRtcEchoCanceller())
    room = np.zeros(rate * 8, dtype=np.float32)  # what the speaker emitted, by DAC sample
    speech = resample(np.tile(fixture_speech(), 3), 16_000, 24_000)
    buf.play(speech)
    out_latency, in_latency, acoustic = 0.03, 0.01, 0.02
    raw, cleaned = [], []
    for k in range(int(len(speech) / 24_000 / 0.02)):
        now = k * frames / rate
        clock.now_s = now
        times = {"current_time": now, "output_buffer_dac_time": now + out_latency}
        data, _ = buf.output_callback(None, frames, times, 0)
        start = int(round((now + out_latency) * rate))
        room[start:start + frames] = np.frombuffer(data, dtype=np.int16) / 32768
        adc = now - in_latency  # this block was captured in_latency ago
        first = int(round((adc - acoustic) * rate))
        heard = 0.5 * room[max(0, first):first + frames] if first >= 0 else np.zeros(frames)
        mic = np.round(heard * 32768).astype(np.int16)
        buf.input_callback(mic.tobytes(), frames, {"input_buffer_adc_time": adc + timestamp_error_s}, 0)
        raw.append(heard)
        while (chunk := buf.read_model_chunk(0.0)) is not None:
            cleaned.append(chunk)
    raw16 = resample(np.concatenate(raw).astype(np.float32), rate, 16_000)
    out = np.concatenate(cleaned)
    tail = slice(2 * 16_000, len(out))
    assert erle_db(raw16[tail], out[tail]) >= 20.0


class RecordingCanceller:
    """An echo canceller that passes the microphone and keeps every reference it was given."""

    in_warmup = False

    def __init__(self) -> None:
        self.references: list[np.ndarray] = []

    def process(self, mic_16k: np.ndarray, reference_16k: np.ndarray) -> np.ndarray:
        self.references.append(reference_16k.copy())
        return mic_16k

    def reset(self) -> None:
        self.references.clear()


def test_echo_reference_keeps_one_lead_whatever_order_the_callbacks_run_in():
    """The output and input callbacks run on their own threads, bursty: the reference must
    still reach the canceller at one fixed offset from the microphone (AEC3 re-adapts at
    every change of delay; reading only as far as the output had reached shifted it by an
    output block back and forth)."""
    rate, frames, out_latency_s = 48_000, 960, 0.03
    canceller = RecordingCanceller()
    buf, clock = make_buffers(in_hz=rate, out_hz=rate, echo_canceller=canceller)
    rng = np.random.default_rng(0)
    buf.play(rng.uniform(-0.5, 0.5, 24_000 * 3).astype(np.float32))  # white: one sharp peak
    played, n_out, n_in = [], 0, 0
    while n_in < 150:  # 3 s of microphone blocks
        run_output_next = n_out <= n_in + 2 and (n_out < n_in - 1 or rng.random() < 0.5)
        if run_output_next:
            now = clock.now_s = n_out * frames / rate
            times = {"current_time": now, "output_buffer_dac_time": now + out_latency_s}
            data, _ = buf.output_callback(None, frames, times, 0)
            played.append(np.frombuffer(data, dtype=np.int16) / 32768)
            n_out += 1
        else:
            clock.now_s = n_in * frames / rate
            buf.input_callback(np.zeros(frames, np.int16).tobytes(), frames,
                               {"input_buffer_adc_time": clock.now_s}, 0)
            n_in += 1
            while buf.read_model_chunk(0.0) is not None:
                pass
    reference = np.concatenate(canceller.references)
    played16 = resample(np.concatenate(played).astype(np.float32), rate, 16_000)
    window = 3_200  # 200 ms
    lags = set()
    for start in range(4_800, min(len(reference), len(played16)) - 2 * window, window):
        piece = reference[start:start + window]
        assert np.abs(piece).max() > 0.1, start  # playing: there is something to align
        correlation = np.correlate(played16[max(0, start - 1_600):start + window + 1_600], piece, "valid")
        lags.add(int(np.argmax(correlation)) + max(0, start - 1_600) - start)
    assert len(lags) == 1, lags


# ---- devices and device loss (fake PortAudio) ----

class FakeWorld:
    """The sound devices present, and how many PortAudio sessions are alive."""

    def __init__(self, devices: list[dict]) -> None:
        self.devices = devices
        self.sessions = 0
        self.streams: list[FakeStream] = []


class FakeStream:
    def __init__(self, **kwargs) -> None:
        self.kwargs, self.active, self.closed = kwargs, False, False

    def start_stream(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active

    def close(self) -> None:
        self.closed, self.active = True, False

    def get_output_latency(self) -> float:
        return 0.02


class FakePortAudio:
    paInt16 = 8

    def __init__(self, world: FakeWorld) -> None:
        self.world, self.devices = world, list(world.devices)  # enumerated once, like PortAudio
        world.sessions += 1

    def get_device_count(self) -> int:
        return len(self.devices)

    def get_device_info_by_index(self, index: int) -> dict:
        return {**self.devices[index], "index": index, "hostApi": 0}

    def get_host_api_info_by_index(self, index: int) -> dict:
        return {"name": "FAKE"}

    def get_default_input_device_info(self) -> dict:
        raise OSError("No Default Input Device Available")

    get_default_output_device_info = get_default_input_device_info

    def is_format_supported(self, rate, **kwargs) -> bool:
        index = kwargs.get("input_device", kwargs.get("output_device"))
        if self.devices[index] not in self.world.devices:
            raise ValueError("Device unavailable")
        if rate not in self.devices[index].get("rates", (self.devices[index]["defaultSampleRate"],)):
            raise ValueError("Invalid sample rate")
        return True

    def open(self, **kwargs) -> FakeStream:
        index = kwargs["input_device_index"] if kwargs["input"] else kwargs["output_device_index"]
        if self.devices[index] not in self.world.devices:  # unplugged since this session listed it
            raise OSError("[Errno -9996] Invalid input device (no default output device)")
        stream = FakeStream(**kwargs)
        self.world.streams.append(stream)
        return stream

    def terminate(self) -> None:
        self.world.sessions -= 1


def device(name: str, rate: int = 44_100, inputs: int = 1, outputs: int = 0, **extra) -> dict:
    return {"name": name, "maxInputChannels": inputs, "maxOutputChannels": outputs,
            "defaultSampleRate": float(rate), **extra}


@pytest.fixture
def world(monkeypatch) -> FakeWorld:
    world = FakeWorld([device("HDA Intel PCH: ALC (hw:0,0)", 48_000, 2, 2),
                       device("USB Mic (hw:1,0)", 44_100, 1, 0, rates=(44_100,)),
                       device("Speaker 48k", 48_000, 0, 2, rates=(48_000,))])
    session = lambda quiet=True: FakePortAudio(world)  # noqa: E731
    monkeypatch.setattr(devices_mod, "open_portaudio", session)
    monkeypatch.setattr(duplex_mod, "open_portaudio", session)
    monkeypatch.setattr(duplex_mod, "load_pyaudio", lambda: FakePortAudio)
    monkeypatch.setattr(devices_mod, "_portaudio_library", lambda: None)  # probe the fake, not libportaudio
    return world


def test_find_device_by_name_and_errors(world):
    assert find_device("usb mic", "input").name == "USB Mic (hw:1,0)"
    assert find_device("48K", "output").default_rate_hz == 48_000
    with pytest.raises(NoAudioDeviceError) as err:
        find_device("xyz", "input")
    assert str(err.value) == ("no audio input device found (looked for 'xyz'); available: "
                              "'HDA Intel PCH: ALC (hw:0,0)', 'USB Mic (hw:1,0)'")
    with pytest.raises(NoAudioDeviceError, match="looked for the system default"):
        find_device(None, "output")
    assert world.sessions == 0  # every lookup terminated its PortAudio session


def test_exact_name_wins_over_substring():
    infos = [DeviceInfo(0, "pulse monitor", 1, 0, 44_100, "ALSA"),
             DeviceInfo(1, "pulse", 1, 0, 44_100, "ALSA")]
    assert pick_by_name(infos, "PULSE").index == 1


def test_missing_pyaudio_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyaudio", None)
    with pytest.raises(NoAudioDeviceError, match="PyAudio/PortAudio is not installed"):
        devices_mod.load_pyaudio()


def test_duplex_stream_opens_native_rates(world):
    with DuplexStream("usb mic", "speaker", block_ms=20) as stream:
        assert (stream.input_rate_hz, stream.output_rate_hz) == (44_100, 48_000)
        opened = {s.kwargs["input"]: s.kwargs for s in world.streams if not s.closed}
        assert opened[True]["frames_per_buffer"] == 882 and opened[False]["frames_per_buffer"] == 960
        assert stream.healthy
    assert world.sessions == 0


def test_device_loss_reported_once_and_reopened_by_name(world, caplog):
    clock = FakeClock()
    cards = {"signature": 0}  # what /dev/snd would show
    rescan = RescanPolicy(clock, lambda: cards["signature"])
    stream = DuplexStream("usb", "speaker", clock=clock, rescan=rescan)
    caplog.set_level(logging.WARNING, logger="audio_io.duplex")
    for cycle in range(10):
        usb = world.devices[1]
        next(s for s in world.streams if s.kwargs["input"] and not s.closed).active = False  # unplugged
        world.devices.remove(usb)
        assert [stream.healthy for _ in range(3)] == [False] * 3
        assert [stream.reopen() for _ in range(3)] == [False] * 3
        assert world.sessions == 1 and all(s.closed for s in world.streams)  # no stream left open
        if cycle % 2:  # back under the same card number: the same PortAudio session opens it
            world.devices.insert(1, usb)
        else:  # back as another card: needs a fresh enumeration, triggered by /dev/snd changing
            world.devices.insert(1, {**usb, "name": f"USB Mic (hw:{cycle + 2},0)"})
            assert not stream.reopen()
            cards["signature"] += 1
        assert stream.reopen() and stream.healthy and world.sessions == 1
    assert sum("audio device lost" in r.message for r in caplog.records) == 10
    assert stream.device_losses == 10 and stream.reopens == 10
    assert stream.rescan.rescans == 5  # one PortAudio re-initialisation per card change, no more
    world.streams[:] = [s for s in world.streams if not s.closed]
    assert len(world.streams) == 2  # exactly one live input and one live output stream
    clock.now_s += 5.0  # no callback at all for 5 s: a stalled device is a lost device
    assert not stream.healthy
    stream.close()
    assert world.sessions == 0


def test_rescan_backs_off_while_nothing_changes():
    clock = FakeClock()
    policy = RescanPolicy(clock, lambda: "same", first_interval_s=2.0, max_interval_s=8.0)
    due_at = []
    for step in range(100):  # 50 s of retries every 0.5 s
        if policy.due():
            due_at.append(step / 2)
            policy.rescanned()
        clock.now_s += 0.5
    assert due_at == [2.0, 4.0, 8.0, 16.0, 24.0, 32.0, 40.0, 48.0]


def test_no_device_fails_with_one_line(world):
    world.devices.clear()
    one_line = r"^no audio input device found \(looked for 'mic'\); available: none$"
    with pytest.raises(NoAudioDeviceError, match=one_line):
        DuplexStream("mic", "speaker")
    assert world.sessions == 0


# ---- layering ----

def test_audio_io_never_loads_torch():
    code = ("import sys, audio_io.duplex, audio_io.vad, audio_io.aec, audio_io.devices, audio_io.wav_file; "
            "bad = sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'assistant', 'quantized_models')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_audio_io_imports_nothing_from_the_rest_of_the_project():
    for path in (REPO / "audio_io").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module.split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.module}
        assert not modules & {"torch", "assistant", "quantized_models"}, path
