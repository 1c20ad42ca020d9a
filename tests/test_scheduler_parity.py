"""Sessions scheduled concurrently on the tiny official model answer exactly as when alone."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import soundfile
import torch

from assistant.conversation import Conversation
from assistant.engine import Engine, EngineOptions
from assistant.respond import split_chunks
from assistant.scheduler import Scheduler, SchedulerSettings
from assistant.voice_session import TurnEndMode, VoiceSession, VoiceSessionSettings
from quantized_models.model_dir import load_models
from quantized_models.sampling import TextSamplingConfig
from tests.fakes import FakeClock

N_SESSIONS = 8
CHUNK_PERIOD_S = 0.16
# The state head has random weights: the client ends each turn; answers are kept short.
SETTINGS = VoiceSessionSettings(turn_end=TurnEndMode.CLIENT, max_lead_s=1e9)


@pytest.fixture(scope="module")
def engine(tiny_dir) -> Engine:
    models = load_models(tiny_dir / "checkpoints", tiny_dir / "llm", torch.device("cpu"), torch.float32)
    return Engine(models, EngineOptions(text_sampling=TextSamplingConfig(0.8, 20, 0.8), speech_top_k=2,
                                        max_new_tokens=6, max_speech_tokens=30))


@pytest.fixture(scope="module")
def question(tiny_dir) -> list[np.ndarray]:
    samples, _ = soundfile.read(tiny_dir / "inputs/question.wav", dtype="float32")
    return [c.numpy() for c in split_chunks(samples)][:6]


class Outbox:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, kind: str, data: dict, payload: bytes) -> None:
        with self.lock:
            self.events.append((kind, data, payload))

    def done(self) -> dict | None:
        with self.lock:
            return next((d for k, d, _ in self.events if k == "answer-done"), None)

    def pcm(self) -> bytes:
        with self.lock:
            return b"".join(p for k, _, p in self.events if k == "audio-chunk")


def _session(engine, i: int, sched: Scheduler) -> tuple[VoiceSession, Outbox]:
    out = Outbox()
    session = VoiceSession(f"s{i}", Conversation(engine, seed=100 + i), out, SETTINGS, wake=sched.notify)
    sched.add(session)
    return session, out


def _ask(session: VoiceSession, question) -> None:
    for chunk in question:
        session.push_audio(chunk)
    session.push_turn_end()


def _alone(engine, question, i: int) -> tuple[dict, bytes]:
    sched = Scheduler(SchedulerSettings(max_sessions=1))
    session, out = _session(engine, i, sched)
    _ask(session, question)
    while sched.run_one():
        pass
    assert out.done() is not None, f"session {i} alone did not finish: {out.events[-3:]}"
    return out.done(), out.pcm()


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_eight_concurrent_sessions_get_exactly_their_lone_answers(engine, question):
    alone = [_alone(engine, question, i) for i in range(N_SESSIONS)]
    assert len({tuple(done["tokens"]) for done, _ in alone}) > 1, "seeds give different answers"
    sched = Scheduler(SchedulerSettings(executors=2, max_sessions=N_SESSIONS, idle_poll_s=0.005))
    pairs = [_session(engine, i, sched) for i in range(N_SESSIONS)]
    sched.start()
    try:
        for session, _ in pairs:
            _ask(session, question)
        assert _wait(lambda: all(out.done() for _, out in pairs), 120), "not all sessions answered"
    finally:
        sched.stop()
    for i, (_, out) in enumerate(pairs):
        done, pcm = out.done(), out.pcm()
        assert done["tokens"] == alone[i][0]["tokens"], f"session {i} text tokens"
        assert done["codec_tokens"] == alone[i][0]["codec_tokens"], f"session {i} codec tokens"
        assert done["codec_tokens"], f"session {i} spoke"
        assert pcm == alone[i][1], f"session {i} audio"
    assert sched.stats.failures == 0


def test_listen_step_is_served_within_one_chunk_period_while_others_generate(engine, question):
    engine = Engine(engine.models, EngineOptions(max_new_tokens=24, max_speech_tokens=120))  # long answers
    sched = Scheduler(SchedulerSettings(executors=2, max_sessions=N_SESSIONS, idle_poll_s=0.005))
    speakers = [_session(engine, i, sched) for i in range(N_SESSIONS - 1)]
    listener, _ = _session(engine, 99, sched)
    sched.start()
    try:
        for session, _ in speakers:
            _ask(session, question)
        assert _wait(lambda: all(s._answering for s, _ in speakers), 30), "speakers did not start"
        generated_before = sched.stats.steps["GENERATE"]
        sched.stats.listen_waits_s.clear()
        for chunk in question + question:  # a live microphone: one chunk per period
            listener.push_audio(chunk)
            time.sleep(CHUNK_PERIOD_S)
        still_speaking = sum(1 for s, _ in speakers if s._answering)
        waits = list(sched.stats.listen_waits_s)
    finally:
        sched.stop()
    assert sched.stats.steps["GENERATE"] > generated_before + 20, "others were generating meanwhile"
    assert still_speaking > 0, "the listener was measured while answers were being generated"
    assert len(waits) >= 2 * len(question)
    assert max(waits) < CHUNK_PERIOD_S, f"listen waits {sorted(waits)[-3:]}"


def _model_mode_run(engine, streams: list[list[np.ndarray]], seeds: list[int], executors: int) -> list[list]:
    """Sessions whose state head ends turns; every chunk is queued before the executors start,
    so each session hears all its audio in order before its own generation steps (listen first)."""
    # What a client has played decides where a barge-in cuts the answer: a clock that stands still
    # makes it an input (nothing played) instead of a race with the wall clock.
    still = FakeClock()
    sched = Scheduler(SchedulerSettings(executors=executors, max_sessions=len(streams), idle_poll_s=0.005),
                      clock=still)
    settings = VoiceSessionSettings(turn_end=TurnEndMode.MODEL, max_lead_s=1e9)
    outs = [Outbox() for _ in streams]
    sessions = [VoiceSession(f"m{i}", Conversation(engine, seed=seeds[i]), outs[i], settings, clock=still,
                             wake=sched.notify) for i in range(len(streams))]
    for session, stream in zip(sessions, streams):
        sched.add(session)
        for chunk in stream:
            session.push_audio(chunk)
    if executors == 1:
        while sched.run_one():
            pass
    else:
        sched.start()
        try:
            assert _wait(sched.drained, 60)
        finally:
            sched.stop()
    assert sched.stats.failures == 0, [s.closed_reason for s in sessions]
    return [[(k, d.get("decision"), d.get("tokens"), d.get("codec_tokens")) for k, d, _ in out.events
             if k != "audio-chunk"] for out in outs]


def test_model_turn_ends_and_barge_in_forks_are_the_same_concurrently(engine, question):
    # Loud noise then the question: the random state head decides somewhere; whatever it decides,
    # each session's events must not depend on the other sessions.
    gen = np.random.default_rng(1)
    streams = [[(0.2 * gen.standard_normal(2560)).astype(np.float32) for _ in range(3 + i)] + question * 2
               for i in range(4)]
    seeds = [200 + i for i in range(len(streams))]
    alone = [_model_mode_run(engine, [s], [seed], executors=1)[0] for s, seed in zip(streams, seeds)]
    together = _model_mode_run(engine, streams, seeds, executors=2)
    assert together == alone
    kinds = [k for events in alone for k, *_ in events]
    assert {"user-turn-ended", "speaking", "interrupted", "answer-done"} <= set(kinds), kinds
