"""The daemon driving the real engine (official tiny model) through a fake clocked device."""
from __future__ import annotations


import numpy as np
import pytest
import soundfile
import torch

from assistant.conversation import Conversation
from assistant.daemon import Daemon
from assistant.daemon_config import DaemonSettings, DialogueSettings, TurnEnd, VadSettings
from assistant.engine import Engine, EngineOptions
from assistant.respond import split_chunks
from quantized_models.model_dir import load_models
from quantized_models.sampling import TextSamplingConfig
from tests.fakes import FakeClock, FakeDuplex, LevelGate, BargeInAllowed, silence_chunks

# Random weights: the state head is meaningless, so turns end on VAD silence.
SETTINGS = DaemonSettings(vad=VadSettings(preroll_ms=320),
                          dialogue=DialogueSettings(turn_end=TurnEnd.VAD, playback_lead_s=0.4))


@pytest.fixture(scope="module")
def engine(tiny_dir) -> Engine:
    models = load_models(tiny_dir / "checkpoints", tiny_dir / "llm", torch.device("cpu"), torch.float32)
    return Engine(models, EngineOptions(text_sampling=TextSamplingConfig(1.0, 1, 0.0), speech_top_k=1,
                                        max_new_tokens=24, max_speech_tokens=120))


def _question(tiny_dir) -> list[np.ndarray]:
    samples, _ = soundfile.read(tiny_dir / "inputs/question.wav", dtype="float32")
    return [c.numpy() for c in split_chunks(samples)]


def test_answer_then_barge_in_keeps_history_to_what_was_played(engine, tiny_dir):
    question = _question(tiny_dir)
    mic = silence_chunks(2) + question + silence_chunks(4) + question + silence_chunks(60)
    clock = FakeClock()
    audio = FakeDuplex(clock, mic)
    conv = Conversation(engine, seed=0)
    daemon = Daemon(conv, audio, LevelGate(level=0.01, stop=3), BargeInAllowed(), SETTINGS, clock)
    answer_tokens = None
    for _ in range(len(mic)):
        daemon.tick()
        if daemon.counters.barge_ins == 0 and conv.state.answer is not None:
            answer_tokens = list(conv.state.answer.tokens)
    assert daemon.counters.turns_answered == 2 and daemon.counters.barge_ins == 1
    first_record = daemon.turn_log[0]
    assert first_record["decision_to_first_played_ms"] is not None
    # The second answer was generated on a context holding only the heard part of the first.
    history = conv.state.llm.history_ids
    assert answer_tokens, "the first answer produced tokens"
    eot = engine.models.llm.layout.end_of_turn_id
    suffix = list(engine.models.llm.layout.assistant_suffix_ids)
    starts = [i for i in range(len(history) - len(suffix) + 1) if history[i:i + len(suffix)] == suffix]
    assert len(starts) == 2, "two assistant turns in the context"
    first_answer = history[starts[0] + len(suffix):]
    first_answer = first_answer[:first_answer.index(eot)] if eot in first_answer else first_answer
    assert first_answer == answer_tokens[:len(first_answer)]
    assert len(first_answer) < len(answer_tokens), "unheard tokens were cropped"
