"""Scheduler policy on a fake clock with scripted sessions: priorities, fairness, capacity, idle."""
from __future__ import annotations

import threading
import time

import pytest

from assistant.scheduler import Pending, Scheduler, SchedulerFull, SchedulerSettings, WorkKind
from tests.fakes import FakeClock


class ScriptedSession:
    """Listens to queued chunks, then generates `steps` answer steps; each step records itself."""

    def __init__(self, sid: str, clock: FakeClock, log: list, steps: int = 0, lead_per_step_s: float = 0.0):
        self.session_id, self.clock, self.log = sid, clock, log
        self.chunks: list[float] = []
        self.steps_left = steps
        self.lead_s = 0.0
        self.lead_per_step_s = lead_per_step_s
        self.activity = clock.monotonic()
        self.closed: str | None = None
        self.fail_next = False

    def push_chunk(self) -> None:
        self.chunks.append(self.clock.monotonic())
        self.activity = self.clock.monotonic()

    def pending(self, now_s: float) -> Pending | None:
        if self.chunks:
            return Pending(WorkKind.LISTEN, since_s=self.chunks[0])
        if self.steps_left:
            return Pending(WorkKind.GENERATE, lead_s=self.lead_s)
        return None

    def run_step(self, kind: WorkKind) -> None:
        if self.fail_next:
            raise RuntimeError("boom")
        if kind is WorkKind.LISTEN:
            self.chunks.pop(0)
        else:
            self.steps_left -= 1
            self.lead_s += self.lead_per_step_s
        self.log.append((self.session_id, kind))
        self.activity = self.clock.monotonic()

    def last_activity_s(self) -> float:
        return self.activity

    def close(self, reason: str) -> None:
        self.closed = reason


def _scheduler(clock, **kw) -> Scheduler:
    return Scheduler(SchedulerSettings(**kw), clock=clock)


def test_listen_of_any_session_goes_before_every_generation_step():
    clock, log = FakeClock(), []
    sched = _scheduler(clock, max_sessions=4)
    speakers = [ScriptedSession(f"s{i}", clock, log, steps=100) for i in range(3)]
    listener = ScriptedSession("listener", clock, log)
    for s in speakers + [listener]:
        sched.add(s)
    for _ in range(5):
        sched.run_one()
    listener.push_chunk()
    clock.now += 0.01
    sched.run_one()
    assert log[-1] == ("listener", WorkKind.LISTEN)
    assert all(kind is WorkKind.GENERATE for _, kind in log[:-1])


def test_oldest_chunk_is_heard_first():
    clock, log = FakeClock(), []
    sched = _scheduler(clock, max_sessions=3)
    a, b = ScriptedSession("a", clock, log), ScriptedSession("b", clock, log)
    sched.add(a), sched.add(b)
    b.push_chunk()
    clock.now += 0.05
    a.push_chunk()
    sched.run_one(), sched.run_one()
    assert [sid for sid, _ in log] == ["b", "a"]
    assert sched.stats.listen_wait_max_s == pytest.approx(0.05)


def test_speaking_sessions_share_executors_fairly():
    clock, log = FakeClock(), []
    sched = _scheduler(clock, max_sessions=3)
    sessions = [ScriptedSession(f"s{i}", clock, log, steps=30) for i in range(3)]
    for s in sessions:
        sched.add(s)
    for _ in range(30):
        sched.run_one()
    counts = {s.session_id: sum(1 for sid, _ in log if sid == s.session_id) for s in sessions}
    assert counts == {"s0": 10, "s1": 10, "s2": 10}


def test_the_session_with_least_audio_ahead_is_served_first():
    clock, log = FakeClock(), []
    sched = _scheduler(clock, max_sessions=2)
    ahead = ScriptedSession("ahead", clock, log, steps=10)
    ahead.lead_s = 1.0
    starving = ScriptedSession("starving", clock, log, steps=10, lead_per_step_s=0.3)
    sched.add(ahead), sched.add(starving)
    for _ in range(5):
        sched.run_one()
    # starving runs until its lead passes ahead's (0.3, 0.6, 0.9, 1.2), then they alternate
    assert [sid for sid, _ in log] == ["starving"] * 4 + ["ahead"]


def test_refuses_a_session_beyond_max_sessions_and_admits_after_one_leaves():
    clock = FakeClock()
    sched = _scheduler(clock, max_sessions=2)
    sched.add(ScriptedSession("a", clock, [])), sched.add(ScriptedSession("b", clock, []))
    with pytest.raises(SchedulerFull, match="all 2 sessions are in use"):
        sched.add(ScriptedSession("c", clock, []))
    assert sched.stats.refused == 1
    sched.remove("a")
    sched.add(ScriptedSession("c", clock, []))
    assert sched.session_count == 2


def test_idle_sessions_are_closed_after_the_timeout_and_active_ones_kept():
    clock = FakeClock()
    sched = _scheduler(clock, max_sessions=2, session_idle_timeout_s=10.0)
    idle, active = ScriptedSession("idle", clock, []), ScriptedSession("active", clock, [])
    sched.add(idle), sched.add(active)
    clock.now = 9.0
    active.push_chunk()
    assert sched.reap_idle() == []
    clock.now = 10.5
    assert sched.reap_idle() == ["idle"]
    assert idle.closed == "idle timeout" and active.closed is None
    assert sched.session_count == 1


def test_a_failing_step_closes_only_its_session():
    clock, log = FakeClock(), []
    sched = _scheduler(clock, max_sessions=2)
    bad, good = ScriptedSession("bad", clock, log, steps=3), ScriptedSession("good", clock, log, steps=3)
    sched.add(bad), sched.add(good)
    bad.fail_next = True
    while sched.run_one():
        pass
    assert bad.closed is not None and "boom" in bad.closed
    assert good.steps_left == 0 and good.closed is None
    assert sched.stats.failures == 1


class SlowSession(ScriptedSession):
    """Steps take real time; counts concurrent steps of itself (must never exceed one)."""

    def __init__(self, *a, step_s: float = 0.005, **kw):
        super().__init__(*a, **kw)
        self.step_s, self.inflight, self.max_inflight = step_s, 0, 0
        self.lock = threading.Lock()

    def run_step(self, kind):
        with self.lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        time.sleep(self.step_s)
        with self.lock:
            self.inflight -= 1
        super().run_step(kind)


def test_executor_threads_never_run_two_steps_of_one_session_at_once():
    sched = Scheduler(SchedulerSettings(executors=4, max_sessions=3, idle_poll_s=0.005))
    clock = sched.clock
    sessions = [SlowSession(f"s{i}", clock, [], steps=20) for i in range(3)]
    for s in sessions:
        sched.add(s)
    sched.start()
    try:
        deadline = time.monotonic() + 10
        while any(s.steps_left for s in sessions) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sched.stop()
    assert all(s.steps_left == 0 for s in sessions)
    assert max(s.max_inflight for s in sessions) == 1
    assert sched.stats.steps["GENERATE"] == 60


def test_one_executor_stays_free_for_listen_steps_while_another_generates():
    clock, log = FakeClock(), []
    sched = _scheduler(clock, executors=2, max_sessions=3)
    a, b = ScriptedSession("a", clock, log, steps=5), ScriptedSession("b", clock, log, steps=5)
    listener = ScriptedSession("listener", clock, log)
    for s in (a, b, listener):
        sched.add(s)
    first = sched.pick()  # a generation step now in flight on one executor
    assert first is not None and first.kind is WorkKind.GENERATE
    assert sched.pick() is None, "the second executor is kept for listening"
    listener.push_chunk()
    second = sched.pick()
    assert second is not None and second.session is listener and second.kind is WorkKind.LISTEN
    sched.run_item(first)
    assert sched.pick().kind is WorkKind.GENERATE


def test_drained_once_nothing_is_pending_or_in_flight():
    clock = FakeClock()
    sched = _scheduler(clock, max_sessions=1)
    s = ScriptedSession("s", clock, [], steps=1)
    sched.add(s)
    assert not sched.drained()
    item = sched.pick()
    assert not sched.drained(), "its last step is still in flight"
    sched.run_item(item)
    assert sched.drained()


def test_voice_session_keeps_the_newest_audio_when_a_client_sends_too_fast():
    import numpy as np

    from assistant.voice_session import VoiceSession, VoiceSessionSettings

    clock = FakeClock()
    session = VoiceSession("v", None, lambda *a: None, VoiceSessionSettings(inbox_chunks=4), clock=clock)
    for i in range(6):
        clock.now = float(i)
        session.push_audio(np.zeros(2560, dtype=np.float32))
    assert session.dropped_chunks == 2
    pending = session.pending(clock.now)
    assert pending.kind is WorkKind.LISTEN and pending.since_s == 2.0, "the two oldest were dropped"


def test_playback_estimate_gives_lead_and_counts_underruns():
    from assistant.voice_session import _Playback

    pb = _Playback()
    assert pb.lead_s(0.0) == 0.0
    pb.on_sent(24_000, now_s=10.0)  # 1 s of audio at t=10
    assert pb.lead_s(10.25) == pytest.approx(0.75) and pb.played(10.25) == 6_000
    pb.on_sent(24_000, now_s=10.5)  # in time: no underrun
    assert pb.underruns == 0 and pb.lead_s(10.5) == pytest.approx(1.5)
    pb.on_sent(4_800, now_s=12.5)  # 0.5 s late: the client ran dry
    assert pb.underruns == 1 and pb.lead_s(12.5) == pytest.approx(0.2)
    pb.reported_samples = 30_000
    assert pb.played(12.5) == 30_000, "the client's own report wins"


def test_executors_on_cpu_need_no_stream():
    import contextlib

    import torch

    from assistant.voice_session import device_stream_context

    assert device_stream_context(torch.device("cpu")) is contextlib.nullcontext
