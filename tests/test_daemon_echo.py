"""The assistant's own voice leaking back into the microphone must not interrupt it.

The virtual card gets an echo path (speaker monitor → microphone, delayed and attenuated,
like a loudspeaker in the room). With AEC on, 20 answers play to their end without a single
barge-in; with AEC and half duplex off the echo does interrupt (so this test can fail).
"""
from __future__ import annotations

import threading
import time

import pytest
import soundfile
import torch

from tests.pulse_harness import wait_until, INPUT_DEVICE, OUTPUT_DEVICE, PulseHarness, missing_requirement

pytestmark = [
    pytest.mark.skipif(missing_requirement() is not None, reason=str(missing_requirement())),
    # Open work (issue 3). The daemon now treats the device latency plus an echo tail as
    # speaking (`_speaker_busy`), which brought the AEC-on run from 16 barge-ins in 32 answers
    # to 5 in 22; the rest still needs a look, and with AEC off the tiny model's echo opened
    # no turn in 3 answers, so that case needs a louder echo before it can show the failure.
    pytest.mark.skip(reason="echo handling not finished (issue 3); see the comment above"),
]

ECHO_DELAY_MS = 40
ECHO_VOLUME_PERCENT = 50


@pytest.fixture(scope="module")
def engine(tiny_dir):
    from assistant.engine import Engine, EngineOptions
    from quantized_models.model_dir import load_models
    from quantized_models.sampling import TextSamplingConfig

    models = load_models(tiny_dir / "checkpoints", tiny_dir / "llm", torch.device("cpu"), torch.float32)
    return Engine(models, EngineOptions(text_sampling=TextSamplingConfig(1.0, 1, 0.0), speech_top_k=1,
                                        max_new_tokens=8, max_speech_tokens=60))



def _answers_with_echo(pulse, engine, tiny_dir, aec: bool, answers: int):
    from assistant.conversation import Conversation
    from assistant.daemon import Daemon
    from assistant.daemon_config import DaemonSettings, DialogueSettings, EchoSettings, TurnEnd
    from assistant.run_daemon import DeviceEchoPolicy, build_vad
    from audio_io.aec import WebRtcEchoCanceller
    from audio_io.duplex import DuplexStream

    settings = DaemonSettings(echo=EchoSettings(aec_enabled=aec), dialogue=DialogueSettings(turn_end=TurnEnd.VAD))
    audio = DuplexStream(INPUT_DEVICE, OUTPUT_DEVICE, echo_canceller=WebRtcEchoCanceller() if aec else None)
    conversation = Conversation(engine, seed=0)
    daemon = Daemon(conversation, audio, build_vad(settings), DeviceEchoPolicy(audio, aec), settings)
    stop = threading.Event()
    loop = threading.Thread(target=daemon.run, args=(stop.is_set,), daemon=True)
    loop.start()
    question, rate = soundfile.read(tiny_dir / "inputs/question.wav", dtype="float32")
    try:
        for i in range(answers):
            pulse.play_into(question, rate).wait()
            assert wait_until(lambda: daemon.counters.turns_answered > i, 10.0), f"question {i} not answered"
            wait_until(lambda: not conversation.answering and not audio.playing, 15.0)
            time.sleep(0.5)  # the echo tail
            if not aec and daemon.counters.barge_ins:
                break
    finally:
        stop.set()
        loop.join(timeout=10)
        audio.close()
    return daemon.counters


def test_aec_keeps_the_assistant_from_interrupting_itself(tmp_path, engine, tiny_dir):
    with PulseHarness(tmp_path / "pulse") as pulse:
        pulse.add_echo_path(ECHO_DELAY_MS, ECHO_VOLUME_PERCENT)
        counters = _answers_with_echo(pulse, engine, tiny_dir, aec=True, answers=20)
    assert counters.turns_answered >= 20
    assert counters.barge_ins == 0


def test_without_aec_or_half_duplex_the_echo_interrupts(tmp_path, engine, tiny_dir):
    with PulseHarness(tmp_path / "pulse") as pulse:
        pulse.add_echo_path(ECHO_DELAY_MS, ECHO_VOLUME_PERCENT)
        counters = _answers_with_echo(pulse, engine, tiny_dir, aec=False, answers=3)
    assert counters.barge_ins >= 1
