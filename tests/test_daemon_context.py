"""A long dialogue never fails for a full LLM context, and the daemon's own records stay bounded."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile
import torch

from assistant.conversation import ANSWER_FRAME_POSITIONS, Conversation
from assistant.daemon import TURN_LOG_KEEP, Daemon, TurnTimes
from assistant.daemon_config import DaemonSettings, DialogueSettings, TurnEnd, VadSettings
from assistant.dialogue import Decision
from assistant.engine import Engine, EngineOptions
from assistant.observability import Metrics
from assistant.respond import split_chunks
from assistant.scheduler import Scheduler, SchedulerSettings
from assistant.telemetry import Telemetry
from assistant.voice_session import TurnEndMode, VoiceSession, VoiceSessionSettings
from quantized_models.model_dir import load_models
from quantized_models.sampling import TextSamplingConfig
from tests.fakes import (
    BargeInAllowed,
    FakeClock,
    FakeDuplex,
    LevelGate,
    ScriptedConversation,
    silence_chunks,
    speech_chunks,
)

SETTINGS = DaemonSettings(vad=VadSettings(preroll_ms=320))


def _daemon(mic, conv, settings=SETTINGS):
    clock = FakeClock()
    return Daemon(conv, FakeDuplex(clock, mic), LevelGate(), BargeInAllowed(), settings, clock)


def test_a_full_context_mid_turn_is_reported_as_such_and_the_next_turn_is_answered(caplog):
    mic = speech_chunks(3) + silence_chunks(6) + speech_chunks(3) + silence_chunks(40)
    # The first utterance overflows on its second chunk, before any decision: the scripted decision
    # goes to the second utterance.
    conv = ScriptedConversation(script=[(Decision.RESPOND, 2)], speech_tokens=10, overflow_on_listen=1)
    daemon = _daemon(mic, conv)
    ticks = iter(range(len(mic)))
    daemon.run(lambda: next(ticks, None) is None)
    assert daemon.counters.recoveries == 1
    assert "context window is full" in caplog.text and "8192" in caplog.text
    names = conv.names()
    assert names.index("reset") < names.index("start_answer"), "the dialogue went on after the fresh start"


def test_the_turn_log_keeps_the_latest_records_and_telemetry_sees_every_one():
    daemon = _daemon([], ScriptedConversation(script=[]))
    telemetry = Telemetry(Metrics())
    observed: list[float] = []
    telemetry.turn_latency = _Recorder(observed)
    turns = TURN_LOG_KEEP + 300
    for i in range(turns):
        daemon._answer_times = TurnTimes(decision=0.0, first_pcm=i / 1000)
        daemon._finish_turn_record()
        if i % 400 == 399:  # scraped now and then, fewer times than turns
            telemetry.collect_turn_records(daemon.turn_log, daemon.turns_logged)
    telemetry.collect_turn_records(daemon.turn_log, daemon.turns_logged)
    assert len(daemon.turn_log) == TURN_LOG_KEEP and daemon.turns_logged == turns
    assert daemon.turn_log[-1]["decision_to_first_pcm_ms"] == pytest.approx(turns - 1)
    assert sorted(observed) == pytest.approx([i / 1000 for i in range(turns)]), "none twice, none lost"


class _Recorder:
    def __init__(self, seen: list[float]) -> None:
        self.seen = seen

    def observe(self, seconds: float, name: str) -> None:
        if name == "decision_to_first_pcm":
            self.seen.append(seconds)


# -- the real engine (official tiny model) with a small context window --------------------------------

@pytest.fixture()
def small_window_engine(tiny_dir) -> Engine:
    models = load_models(tiny_dir / "checkpoints", tiny_dir / "llm", torch.device("cpu"), torch.float32)
    return Engine(models, EngineOptions(text_sampling=TextSamplingConfig(1.0, 1, 0.0), speech_top_k=1,
                                        max_new_tokens=8, max_speech_tokens=40, max_user_turn_chunks=30))


def _question(tiny_dir) -> list[np.ndarray]:
    samples, _ = soundfile.read(tiny_dir / "inputs/question.wav", dtype="float32")
    return [c.numpy() for c in split_chunks(samples)]


@pytest.mark.parametrize("checked", [True, False], ids=["checked", "unchecked"])
def test_a_long_dialogue_on_a_small_window_starts_afresh_between_turns_and_never_overflows(
        small_window_engine, tiny_dir, caplog, checked):
    caplog.set_level(logging.INFO)
    engine = small_window_engine
    question = _question(tiny_dir)
    settings = DaemonSettings(vad=VadSettings(preroll_ms=320),
                              dialogue=DialogueSettings(turn_end=TurnEnd.VAD, playback_lead_s=0.4,
                                                        max_answer_tokens=8))
    first, per_chunk, per_turn = _positions_measured(engine, question)
    conv = Conversation(engine, seed=0)
    fresh = conv.state.llm.seq_length  # the system prompt
    reserve = first + 29 * per_chunk + 8 + ANSWER_FRAME_POSITIONS  # the longest turn and answer
    # Room for the reserve plus a little over two turns: six turns cannot fit without starting afresh.
    engine.models.llm.max_context_tokens = fresh + reserve + 2 * per_turn + per_turn // 2
    if not checked:  # the same dialogue without the check: shows the window is small enough
        conv.context_nearly_full = lambda: False
    mic = []
    for _ in range(6):
        mic += silence_chunks(2) + question + silence_chunks(40)
    clock = FakeClock()
    daemon = Daemon(conv, FakeDuplex(clock, mic), LevelGate(level=0.01, stop=3), BargeInAllowed(),
                    settings, clock)
    ticks = iter(range(len(mic)))
    daemon.run(lambda: next(ticks, None) is None)  # recovers from a step that fails, as in service
    if not checked:
        assert 1 <= daemon.counters.recoveries, "the window overflowed without the check"
        return
    assert daemon.counters.recoveries == 0, "the context never overflowed"
    assert daemon.counters.turns_answered == 6
    assert caplog.text.count("nearly fills the LLM's context window") >= 1


def _positions_measured(engine: Engine, question: list[np.ndarray]) -> tuple[int, int, int]:
    """Positions of a turn's first chunk, of a later chunk, and of a whole answered turn (a probe)."""
    conv = Conversation(engine, seed=0)
    start = conv.state.llm.seq_length
    for chunk in silence_chunks(2) + question + silence_chunks(3):
        conv.listen(chunk, follow_decision=False)
    conv.start_answer()
    while conv.answering:
        conv.answer_step()
    return conv._first_chunk_positions, conv._positions_per_chunk, conv.state.llm.seq_length - start


def test_a_network_session_starts_afresh_between_turns_instead_of_failing(small_window_engine, tiny_dir):
    engine = small_window_engine
    question = _question(tiny_dir)[:6]
    first, per_chunk, _ = _positions_measured(engine, question)
    sched = Scheduler(SchedulerSettings(max_sessions=1))
    events: list[str] = []
    session = VoiceSession("s0", Conversation(engine, seed=0), lambda kind, data, payload: events.append(kind),
                           VoiceSessionSettings(turn_end=TurnEndMode.CLIENT, max_lead_s=1e9), wake=sched.notify)
    sched.add(session)
    fresh = session.conv.state.llm.seq_length
    reserve = first + 29 * per_chunk + engine.options.max_new_tokens + ANSWER_FRAME_POSITIONS
    engine.models.llm.max_context_tokens = fresh + reserve + 40
    for turn in range(4):
        for chunk in question:
            session.push_audio(chunk)
        session.push_turn_end()
        while sched.run_one():
            pass
        assert session.closed_reason is None, f"turn {turn}: {session.closed_reason}"
        assert events.count("answer-done") == turn + 1
    assert sched.stats.failures == 0


def test_a_turn_opening_on_a_nearly_full_context_starts_a_fresh_dialogue_first(small_window_engine, tiny_dir,
                                                                                caplog):
    caplog.set_level(logging.INFO)
    engine = small_window_engine
    question = _question(tiny_dir)[:4]
    conv = Conversation(engine, seed=0)
    fresh = conv.state.llm.seq_length
    for chunk in question:
        conv.listen(chunk, follow_decision=False)
    conv.close_ignored_turn()
    assert not conv.context_nearly_full()
    engine.models.llm.max_context_tokens = conv.state.llm.seq_length + 30  # the next turn would not fit
    assert conv.context_nearly_full()
    conv.listen(question[0], follow_decision=False)
    assert conv.state.llm.seq_length == fresh + conv._first_chunk_positions, "forgotten before the chunk"
    assert "nearly fills the LLM's context window" in caplog.text
    before = conv.state.llm.seq_length
    conv.listen(question[1], follow_decision=False)  # within the turn: never forgotten
    assert conv.state.llm.seq_length > before


def test_an_interruption_is_never_cut_off_from_the_answer_it_interrupts(small_window_engine, tiny_dir):
    # Barging in forks the answer's context: forgetting it there would lose what the user reacts to.
    engine = small_window_engine
    question = _question(tiny_dir)
    conv = Conversation(engine, seed=0)
    for chunk in question:
        conv.listen(chunk, follow_decision=False)
    conv.start_answer()
    for _ in range(3):
        conv.answer_step()
    engine.models.llm.max_context_tokens = conv.state.llm.seq_length + 60  # room for a short one
    assert conv.context_nearly_full()
    conv.begin_barge_in()
    for chunk in question[:3]:
        conv.barge_in_listen(chunk, follow_decision=False)
    assert conv.fork is not None and conv.fork.llm.seq_length > conv.state.llm.seq_length, \
        "the interruption listens on top of the answer's context"
