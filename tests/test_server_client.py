"""`freeze-omni client` against the real server, on a fake (thread-safe) audio device."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from assistant.client import Backoff, Client, ClientSettings
from tests.server_harness import engine, question  # noqa: F401  (module-scoped fixtures)
from tests.server_harness import ask, running_server, start_session

CHUNK = 2560


class FakeAudio:
    """Microphone: silence until `arm()`, then the question once; speaker: plays instantly."""

    def __init__(self, question: list[bytes]) -> None:
        self.question = [np.frombuffer(q, dtype="<i2").astype(np.float32) / 32768.0 for q in question]
        self.pending: list[np.ndarray] = []
        self.lock = threading.Lock()
        self.played = 0
        self.flushes = 0

    def arm(self) -> None:
        with self.lock:
            self.pending = list(self.question)

    def read_model_chunk(self, timeout_s: float) -> np.ndarray:
        time.sleep(0.01)
        with self.lock:
            return self.pending.pop(0) if self.pending else np.zeros(CHUNK, dtype=np.float32)

    def play(self, pcm_24k: np.ndarray) -> None:
        with self.lock:
            self.played += len(pcm_24k)

    def flush_playback(self) -> int:
        self.flushes += 1
        return 0

    def finish_playback(self) -> None:
        pass

    @property
    def played_samples_24k(self) -> int:
        return self.played

    @property
    def queued_samples_24k(self) -> int:
        return 0


class ScriptedGate:
    """The question's chunks are speech: the turn starts at its first chunk and ends at its last."""

    def __init__(self, audio: FakeAudio) -> None:
        self.audio, self.index = audio, 0

    def speech_started(self, chunk: np.ndarray) -> tuple[bool, bool]:
        n = len(self.audio.question)
        speech = bool(np.any(chunk)) and self.index < n
        if not speech:
            return False, False
        self.index += 1
        return self.index == 1, self.index == n

    def rearm(self) -> None:
        self.index = 0


def _client(path, audio, seed, sleeps: list, answers: list) -> Client:
    def sleep(s: float) -> None:
        sleeps.append(s)
        time.sleep(0.05)

    settings = ClientSettings(address=f"unix:{path}", turn_end="client", seed=seed, reconnect_initial_s=0.5,
                              reconnect_max_s=4.0, ping_interval_s=0.5)
    return Client(settings, audio, ScriptedGate(audio), sleep=sleep, on_answer=answers.append)


def _wait(predicate, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_backoff_doubles_up_to_the_cap_and_resets():
    b = Backoff(0.5, 4.0)
    assert [b.delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.delay() == 0.5


def test_client_plays_the_answer_it_would_get_directly(engine, question, tmp_path):
    path = tmp_path / "c.sock"
    with running_server(engine, path) as server:
        direct = start_session(path, seed=4)
        reference = ask(direct, question)
        direct.close()
        audio, sleeps, answers, stop = FakeAudio(question), [], [], threading.Event()
        client = _client(path, audio, 4, sleeps, answers)
        thread = threading.Thread(target=client.run, args=(stop.is_set,))
        thread.start()
        try:
            assert _wait(lambda: client.counters.connects == 1)
            audio.arm()
            assert _wait(lambda: answers), "the client got no answer"
        finally:
            stop.set()
            thread.join(10)
        assert _wait(lambda: server.scheduler.session_count == 0), "the client ended its session"
    assert answers[0]["tokens"] == reference.tokens and answers[0]["codec_tokens"] == reference.codec_tokens
    assert audio.played == len(reference.pcm) // 2 == answers[0]["audio_samples"]
    assert sleeps == [] and not thread.is_alive()


def test_client_reconnects_with_backoff_when_the_server_goes_away(engine, question, tmp_path):
    path = tmp_path / "r.sock"
    audio, sleeps, answers, stop = FakeAudio(question), [], [], threading.Event()
    client = _client(path, audio, 4, sleeps, answers)
    thread = threading.Thread(target=client.run, args=(stop.is_set,))
    try:
        with running_server(engine, path):
            thread.start()
            assert _wait(lambda: client.counters.connects == 1)
        # the server is gone: the session ended ("server-stopping"), connects are refused
        assert _wait(lambda: len(sleeps) >= 4), sleeps
        with running_server(engine, path):
            assert _wait(lambda: client.counters.connects == 2), "reconnected"
            audio.arm()
            client.gate.rearm()
            assert _wait(lambda: answers), "answered after reconnecting"
            failures_before = len(sleeps)
        assert _wait(lambda: len(sleeps) > failures_before)
    finally:
        stop.set()
        thread.join(10)
    assert sleeps[:4] == [0.5, 1.0, 2.0, 4.0]
    assert sleeps[failures_before] == 0.5, "a successful session resets the backoff"
    assert answers[0]["tokens"] and not thread.is_alive()


def test_a_client_refused_as_full_backs_off_and_gets_in_when_a_place_frees(engine, question, tmp_path):
    path = tmp_path / "f.sock"
    audio, sleeps, answers, stop = FakeAudio(question), [], [], threading.Event()
    with running_server(engine, path, max_sessions=1) as server:
        occupant = start_session(path, seed=1)
        client = _client(path, audio, 4, sleeps, answers)
        thread = threading.Thread(target=client.run, args=(stop.is_set,))
        thread.start()
        try:
            assert _wait(lambda: len(sleeps) >= 3), "refused, and retrying with backoff"
            assert client.counters.refused_full >= 3
            occupant.close()
            assert _wait(lambda: (server.stats.sessions_started == 2
                                  and server.scheduler.session_count == 1)), \
                "the client got the freed place"
            audio.arm()
            assert _wait(lambda: answers), "and is answered"
        finally:
            stop.set()
            thread.join(10)
    assert sleeps[:3] == [0.5, 1.0, 2.0] and server.stats.refused >= 3
