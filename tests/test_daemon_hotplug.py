"""The daemon outlives its audio devices: unplugged mid-answer and plugged back, ten times.

Real PortAudio streams on the virtual PulseAudio card; "unplugging" unloads the null sink's
module (the microphone is `mic.monitor`, the speaker `spk`), "plugging" loads it again.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time

import pytest
import soundfile
import torch

from tests.pulse_harness import INPUT_DEVICE, OUTPUT_DEVICE, PulseHarness, missing_requirement, wait_until
from tests.test_pulse_audio import process_size

pytestmark = pytest.mark.skipif(missing_requirement() is not None, reason=str(missing_requirement()))

CYCLES = 10
BACK_WITHIN_S = 2.0


def test_daemon_survives_ten_unplugs_mid_answer(tmp_path, tiny_dir, caplog):
    from assistant.conversation import Conversation
    from assistant.daemon import Daemon
    from assistant.daemon_config import DaemonSettings, DialogueSettings, EchoSettings, TurnEnd
    from assistant.engine import Engine, EngineOptions
    from assistant.run_daemon import DeviceEchoPolicy, build_vad
    from audio_io.duplex import DuplexStream
    from quantized_models.model_dir import load_models
    from quantized_models.sampling import TextSamplingConfig

    caplog.set_level(logging.WARNING)
    models = load_models(tiny_dir / "checkpoints", tiny_dir / "llm", torch.device("cpu"), torch.float32)
    engine = Engine(models, EngineOptions(text_sampling=TextSamplingConfig(1.0, 1, 0.0), speech_top_k=1,
                                          max_new_tokens=24, max_speech_tokens=120))
    settings = DaemonSettings(echo=EchoSettings(aec_enabled=False), dialogue=DialogueSettings(turn_end=TurnEnd.VAD))
    question, rate = soundfile.read(tiny_dir / "inputs/question.wav", dtype="float32")
    with PulseHarness(tmp_path / "pulse") as pulse:
        audio = DuplexStream(INPUT_DEVICE, OUTPUT_DEVICE)
        daemon = Daemon(Conversation(engine, seed=0), audio, build_vad(settings),
                        DeviceEchoPolicy(audio, aec_enabled=True), settings)
        stop = threading.Event()
        loop = threading.Thread(target=daemon.run, args=(stop.is_set,), daemon=True)
        loop.start()
        sizes: list[tuple[int, int]] = []  # (threads, resident kB) after each cycle
        try:
            for cycle in range(CYCLES):
                answered = daemon.counters.turns_answered
                pulse.play_into(question, rate).wait()
                assert wait_until(lambda: daemon.counters.turns_answered > answered and audio.playing, 10.0), \
                    f"cycle {cycle}: no answer playing"
                sink = "spk" if cycle % 2 else "mic"
                pulse.unload_sink(sink)
                assert wait_until(lambda: daemon.counters.device_losses == cycle + 1, 3.0), (cycle, daemon.counters)
                time.sleep(0.5)
                assert loop.is_alive() and not audio.healthy
                pulse.load_sink(sink)
                back_at = time.monotonic()
                assert wait_until(lambda: audio.healthy, BACK_WITHIN_S), f"cycle {cycle}: not back within 2 s"
                assert time.monotonic() - back_at < BACK_WITHIN_S
                assert wait_until(lambda: not daemon.conv.answering and not audio.playing, 10.0)
                time.sleep(0.5)
                sizes.append(_settled_size())
            threads, rss_kb = sizes[-1]
        finally:
            stop.set()
            loop.join(timeout=10)
            audio.close()
    assert not loop.is_alive()
    assert daemon.counters.device_losses == CYCLES and daemon.counters.recoveries == 0
    assert sum("audio device lost" in r.message for r in caplog.records) == CYCLES  # one warning per loss
    assert {t for t, _ in sizes[1:]} == {threads}, sizes  # no thread per reopen
    # A leak grows every cycle; one-off allocations (the allocator keeping a longer answer's
    # buffers) do not: the second half of the cycles must be flat
    half = sizes[CYCLES // 2][1]
    assert rss_kb - half < 8_192, sizes


def _settled_size() -> tuple[int, int]:
    """Threads and resident kB after freed heap memory went back to the OS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return process_size()
