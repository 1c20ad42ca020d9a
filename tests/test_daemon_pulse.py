"""`freeze-omni run`'s loop end to end through real PortAudio streams on a virtual PulseAudio card.

The test plays a spoken question into the null sink `mic`; the daemon records `mic.monitor`,
answers (official tiny model, VAD turn end: its state head is random), and plays into `spk`,
whose monitor the test records. A second question played during the answer must cut it.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import soundfile
import torch

from tests.pulse_harness import (
    wait_until,
    INPUT_DEVICE,
    MONITOR_RATE_HZ,
    OUTPUT_DEVICE,
    PulseHarness,
    missing_requirement,
)

pytestmark = pytest.mark.skipif(missing_requirement() is not None, reason=str(missing_requirement()))

ANSWER_LEVEL = 1e-3  # mean |x| of 100 ms of speaker audio that counts as "the assistant speaks"


def _loud_windows(recording: np.ndarray) -> np.ndarray:
    window = MONITOR_RATE_HZ // 10
    n = len(recording) // window
    return np.abs(recording[: n * window]).reshape(n, window).mean(axis=1) > ANSWER_LEVEL  # (n,)



@pytest.fixture()
def pulse(tmp_path):
    with PulseHarness(tmp_path / "pulse") as harness:
        yield harness


def test_daemon_answers_and_is_interrupted_through_real_audio(pulse, tiny_dir):
    from assistant.conversation import Conversation
    from assistant.daemon import Daemon
    from assistant.daemon_config import AudioSettings, DaemonSettings, DialogueSettings, EchoSettings, TurnEnd
    from assistant.engine import Engine, EngineOptions
    from assistant.run_daemon import DeviceEchoPolicy, build_vad
    from audio_io.duplex import DuplexStream
    from quantized_models.model_dir import load_models
    from quantized_models.sampling import TextSamplingConfig

    settings = DaemonSettings(
        audio=AudioSettings(input_device=INPUT_DEVICE, output_device=OUTPUT_DEVICE),
        echo=EchoSettings(aec_enabled=False),
        dialogue=DialogueSettings(turn_end=TurnEnd.VAD),
    )
    models = load_models(tiny_dir / "checkpoints", tiny_dir / "llm", torch.device("cpu"), torch.float32)
    engine = Engine(models, EngineOptions(text_sampling=TextSamplingConfig(1.0, 1, 0.0), speech_top_k=1,
                                          max_new_tokens=24, max_speech_tokens=120))
    audio = DuplexStream(INPUT_DEVICE, OUTPUT_DEVICE)  # no echo path in this card: no AEC needed
    daemon = Daemon(Conversation(engine, seed=0), audio, build_vad(settings),
                    DeviceEchoPolicy(audio, aec_enabled=True), settings)
    stop = threading.Event()
    loop = threading.Thread(target=daemon.run, args=(stop.is_set,), daemon=True)
    loop.start()
    question, rate = soundfile.read(tiny_dir / "inputs/question.wav", dtype="float32")
    try:
        mark = pulse.recorded_bytes("spk")
        pulse.play_into(question, rate).wait()
        assert wait_until(lambda: _loud_windows(pulse.recording("spk", mark)).any(), 15.0), \
            "the answer never reached spk.monitor"
        assert daemon.counters.turns_answered == 1
        time.sleep(0.5)  # the answer is playing
        pulse.play_into(question, rate).wait()
        assert wait_until(lambda: daemon.counters.barge_ins == 1, 10.0), "the second question did not cut in"
        assert wait_until(lambda: daemon.counters.turns_answered == 2, 5.0)
    finally:
        stop.set()
        loop.join(timeout=10)
        audio.close()
    assert not loop.is_alive()
    record = daemon.turn_log[0]
    assert record["decision_to_first_played_ms"] is not None
