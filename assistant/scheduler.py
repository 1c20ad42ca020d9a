"""Model as a server: a fixed pool of executors serving the next step of any session.

The models are loaded once and shared; every session keeps its own caches (a `SessionState`
inside its `Conversation`), so whichever executor is free serves whichever session needs work.
Sessions are *pulled*: when an executor is free it asks every session what it could do now
(`Schedulable.pending`) and runs one step of the most urgent one:

1. real-time work first: a listen step (a 160 ms microphone chunk) of any session, oldest
   chunk first, is always taken before any generation step, so a listen step waits at most for
   one step already running, never behind a whole answer;
2. generation steps (text token, speech-decoder step, segment start) go to the speaking session
   with the least audio queued ahead of its listener (earliest deadline first); ties go to the
   session served longest ago, so speaking sessions share the executors fairly.

One session never has two steps in flight, because its state is not shared between steps.
Sessions beyond `max_sessions` are refused with `SchedulerFull`; a session without activity for
`session_idle_timeout_s` is closed. `pick` + `run_item` are public so tests can drive the
scheduler on a fake clock, without threads.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, ContextManager, Protocol

logger = logging.getLogger(__name__)


class WorkKind(IntEnum):
    """Priority classes: a lower value is always served first."""

    LISTEN = 0
    GENERATE = 1


@dataclass(frozen=True)
class Pending:
    """What a session could do now."""

    kind: WorkKind
    since_s: float = 0.0
    """LISTEN: arrival time of the oldest unheard chunk (monotonic seconds)."""
    lead_s: float = 0.0
    """GENERATE: audio already queued ahead of the listener (seconds); less is more urgent."""


class Schedulable(Protocol):
    """One session as the scheduler sees it (`assistant.voice_session.VoiceSession`)."""

    session_id: str

    def pending(self, now_s: float) -> Pending | None:
        """The most urgent step this session could run now, or None."""
        ...

    def run_step(self, kind: WorkKind) -> None:
        """Run one step of that kind (on an executor thread)."""
        ...

    def last_activity_s(self) -> float:
        """Monotonic time of the last input or output of the session."""
        ...

    def close(self, reason: str) -> None:
        """The session is over (idle, failed, refused later): release it; idempotent."""
        ...


class Clock(Protocol):
    def monotonic(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()


class SchedulerFull(RuntimeError):
    """No room for another session."""

    def __init__(self, max_sessions: int) -> None:
        super().__init__(f"all {max_sessions} sessions are in use; try again later")
        self.max_sessions = max_sessions


@dataclass(frozen=True)
class SchedulerSettings:
    executors: int = 1
    """Executor threads sharing the models, 1..64."""
    max_sessions: int = 8
    """Concurrent sessions at most; one more is refused."""
    session_idle_timeout_s: float = 300.0
    """A session with no input or output for this long is closed."""
    reserved_listen_executors: int = 1
    """Executors kept free of generation for listen steps (at most executors - 1; 0 with one executor)."""
    idle_poll_s: float = 0.02
    """How often an idle executor looks again for work that has become due (timers, lead caps)."""

    def __post_init__(self) -> None:
        if not 1 <= self.executors <= 64:
            raise ValueError(f"executors must be 1..64, got {self.executors}")
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {self.max_sessions}")
        if self.reserved_listen_executors < 0:
            raise ValueError("reserved_listen_executors must be 0 or more")
        if self.session_idle_timeout_s <= 0 or self.idle_poll_s <= 0:
            raise ValueError("session_idle_timeout_s and idle_poll_s must be positive")


@dataclass
class SchedulerStats:
    steps: dict[str, int] = field(default_factory=lambda: {k.name: 0 for k in WorkKind})
    listen_wait_max_s: float = 0.0
    """Longest time a listen chunk waited between its arrival and the start of its step."""
    listen_waits_s: list[float] = field(default_factory=list)
    """Recent listen waits (the last 10 000), for percentiles."""
    failures: int = 0
    refused: int = 0
    idle_closed: int = 0


@dataclass
class _Entry:
    session: Schedulable
    busy: bool = False
    served_seq: int = 0
    """Pick counter value when this session was last served (fairness tie-break)."""


@dataclass(frozen=True)
class WorkItem:
    session: Schedulable
    kind: WorkKind
    since_s: float


class Scheduler:
    """Executors over shared models; sessions are `Schedulable`s holding their own state."""

    def __init__(self, settings: SchedulerSettings, clock: Clock | None = None,
                 executor_context: Callable[[], ContextManager] | None = None) -> None:
        """
        Args:
            executor_context: entered once by each executor thread around its loop (e.g. its own
                CUDA stream, see `voice_session.device_stream_context`).
        """
        self.settings = settings
        self.clock = clock or SystemClock()
        self.stats = SchedulerStats()
        self._executor_context = executor_context or contextlib.nullcontext
        self._entries: dict[str, _Entry] = {}
        self._cond = threading.Condition()
        self._seq = 0
        self._generating = 0
        self._threads: list[threading.Thread] = []
        self._stopping = False

    # -- sessions -------------------------------------------------------------------
    def add(self, session: Schedulable) -> None:
        """Admit a session; raises `SchedulerFull` when `max_sessions` are open."""
        with self._cond:
            if session.session_id in self._entries:
                raise ValueError(f"session {session.session_id} is already scheduled")
            if len(self._entries) >= self.settings.max_sessions:
                self.stats.refused += 1
                raise SchedulerFull(self.settings.max_sessions)
            self._entries[session.session_id] = _Entry(session, served_seq=self._seq)
            self._cond.notify_all()
        logger.info("session %s admitted (%d/%d)", session.session_id, len(self._entries),
                    self.settings.max_sessions)

    def remove(self, session_id: str) -> None:
        with self._cond:
            self._entries.pop(session_id, None)
            self._cond.notify_all()

    @property
    def generate_slots(self) -> int:
        """How many generation steps may run at once (the other executors wait for listen work)."""
        s = self.settings
        return max(1, s.executors - min(s.reserved_listen_executors, s.executors - 1))

    @property
    def session_count(self) -> int:
        with self._cond:
            return len(self._entries)

    def drained(self) -> bool:
        """No step in flight and no session with anything to do now."""
        now = self.clock.monotonic()
        with self._cond:
            return all(not e.busy and e.session.pending(now) is None for e in self._entries.values())

    def notify(self) -> None:
        """A session has new input: wake an idle executor."""
        with self._cond:
            self._cond.notify()

    # -- choosing work ----------------------------------------------------------------
    def pick(self) -> WorkItem | None:
        """Choose the most urgent step of a session that has none in flight, and mark it busy."""
        with self._cond:
            return self._pick_locked()

    def _pick_locked(self) -> WorkItem | None:
        now = self.clock.monotonic()
        best: tuple | None = None
        chosen: tuple[_Entry, Pending] | None = None
        may_generate = self._generating < self.generate_slots
        for entry in self._entries.values():
            if entry.busy:
                continue
            pending = entry.session.pending(now)
            if pending is None or (pending.kind is not WorkKind.LISTEN and not may_generate):
                continue
            if pending.kind is WorkKind.LISTEN:
                key = (int(WorkKind.LISTEN), pending.since_s, entry.served_seq)
            else:
                key = (int(pending.kind), pending.lead_s, entry.served_seq)
            if best is None or key < best:
                best, chosen = key, (entry, pending)
        if chosen is None:
            return None
        entry, pending = chosen
        entry.busy = True
        self._seq += 1
        entry.served_seq = self._seq
        if pending.kind is WorkKind.LISTEN:
            self._record_listen_wait(now - pending.since_s)
        else:
            self._generating += 1
        return WorkItem(entry.session, pending.kind, pending.since_s)

    def _record_listen_wait(self, wait_s: float) -> None:
        stats = self.stats
        stats.listen_wait_max_s = max(stats.listen_wait_max_s, wait_s)
        stats.listen_waits_s.append(wait_s)
        if len(stats.listen_waits_s) > 10_000:
            del stats.listen_waits_s[:5_000]

    def run_item(self, item: WorkItem) -> None:
        """Run one picked step; a failing step closes its session only."""
        try:
            item.session.run_step(item.kind)
        except Exception as err:  # noqa: BLE001 - one session's failure must not stop the others
            logger.exception("session %s: %s step failed", item.session.session_id, item.kind.name)
            with self._cond:
                self.stats.failures += 1
            self._close(item.session, f"internal error in a {item.kind.name.lower()} step: {err}")
        finally:
            with self._cond:
                self.stats.steps[item.kind.name] += 1
                if item.kind is not WorkKind.LISTEN:
                    self._generating -= 1
                entry = self._entries.get(item.session.session_id)
                if entry is not None:
                    entry.busy = False
                self._cond.notify()

    def run_one(self) -> bool:
        """Pick and run one step inline (tests, single-threaded use); False when nothing is due."""
        self.reap_idle()
        item = self.pick()
        if item is None:
            return False
        self.run_item(item)
        return True

    def reap_idle(self) -> list[str]:
        """Close the sessions idle for longer than the timeout; returns their ids."""
        now = self.clock.monotonic()
        with self._cond:
            limit_s = self.settings.session_idle_timeout_s
            idle = [e.session for e in self._entries.values()
                    if not e.busy and now - e.session.last_activity_s() > limit_s]
            for session in idle:
                self._entries.pop(session.session_id, None)
                self.stats.idle_closed += 1
        for session in idle:
            logger.info("session %s idle for more than %.0f s: closing", session.session_id,
                        self.settings.session_idle_timeout_s)
            session.close("idle timeout")
        return [s.session_id for s in idle]

    def _close(self, session: Schedulable, reason: str) -> None:
        self.remove(session.session_id)
        session.close(reason)

    # -- executors --------------------------------------------------------------------
    def start(self) -> None:
        """Start the executor threads."""
        with self._cond:
            self._stopping = False
        for i in range(self.settings.executors):
            thread = threading.Thread(target=self._executor_loop, name=f"executor-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info("scheduler started with %d executors", self.settings.executors)

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads = []

    def _executor_loop(self) -> None:
        with self._executor_context():
            last_reap = self.clock.monotonic()
            while True:
                with self._cond:
                    if self._stopping:
                        return
                    item = self._pick_locked()
                    if item is None:
                        self._cond.wait(self.settings.idle_poll_s)
                if item is not None:
                    self.run_item(item)
                if self.clock.monotonic() - last_reap >= 1.0:
                    last_reap = self.clock.monotonic()
                    self.reap_idle()
