"""The session server over a real Unix socket with the tiny official model."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from assistant.engine import Engine, EngineOptions
from assistant.server import ServerSettings
from assistant.wire import WireConnection
from tests.server_harness import engine, question  # noqa: F401  (module-scoped fixtures)
from tests.server_harness import (
    AUDIO_IN, ask, ask_in_threads, running_server, start_session,
)

N_SESSIONS = 8


@pytest.fixture
def sock_path(tmp_path):
    return tmp_path / "fo.sock"


def test_describe_answers_info_with_audio_formats(engine, sock_path):
    with running_server(engine, sock_path, max_sessions=3):
        conn = WireConnection.connect(sock_path)
        conn.send("describe")
        info = conn.recv()
        assert info.type == "info"
        assert info.data["audio_in"] == AUDIO_IN
        assert info.data["audio_out"] == {"rate": 24_000, "width": 2, "channels": 1}
        assert info.data["sessions"] == {"active": 0, "max": 3}
        conn.send("ping")
        assert conn.recv().type == "pong"


def test_eight_socket_sessions_each_get_exactly_their_lone_answer(engine, sock_path, question):
    seeds = [10 + i for i in range(N_SESSIONS)]
    with running_server(engine, sock_path, max_sessions=N_SESSIONS) as server:
        alone = []
        for seed in seeds:
            conn = start_session(sock_path, seed=seed)
            alone.append(ask(conn, question))
            conn.close()
        together = ask_in_threads(sock_path, question, seeds)
        assert server.scheduler.stats.failures == 0
    assert len({tuple(a.tokens) for a in alone}) > 1, "different seeds, different answers"
    for i, (a, b) in enumerate(zip(alone, together)):
        assert b.tokens == a.tokens, f"session {i} text tokens"
        assert b.codec_tokens == a.codec_tokens and a.codec_tokens, f"session {i} codec tokens"
        assert b.pcm == a.pcm, f"session {i} audio"
        assert b.events.index("user-turn-ended") < b.events.index("speaking") < b.events.index("audio-chunk")


def test_a_session_beyond_capacity_is_refused_and_the_others_go_on(engine, sock_path, question):
    with running_server(engine, sock_path, max_sessions=1) as server:
        first = start_session(sock_path, seed=1)
        second = WireConnection.connect(sock_path)
        second.send("session-start", {"turn_end": "client"})
        refusal = second.recv()
        assert refusal.type == "error" and refusal.data["code"] == "full"
        assert "all 1 sessions are in use" in refusal.data["message"]
        assert second.recv() is None, "the refused connection is closed"
        assert ask(first, question).codec_tokens
        first.close()
        _wait(lambda: server.scheduler.session_count == 0)
        third = start_session(sock_path, seed=1)  # room again once the first has left
        third.close()
        assert server.scheduler.stats.refused == 1


def test_a_silent_client_is_dropped_after_the_keepalive_timeout_and_pings_keep_one_alive(engine, sock_path):
    with running_server(engine, sock_path, keepalive_timeout_s=0.6) as server:
        silent, pinging = start_session(sock_path), start_session(sock_path)
        start = time.monotonic()
        for _ in range(8):  # 1.6 s of pings every 0.2 s
            pinging.send("ping")
            time.sleep(0.2)
        frame, _ = silent.recv_until("error", 5)
        assert frame.data["code"] == "timeout" and time.monotonic() - start < 3
        assert silent.recv() is None
        pinging.send("ping")
        assert pinging.recv_until("pong", 5)[0] is not None
        assert server.stats.ended.get("timeout") == 1


class _SlowEngine(Engine):
    """Every text and speech step takes 50 ms, as on a loaded machine (CI, where a client waiting in
    silence was once dropped mid-answer): a segment's speech is silent on the wire for longer than
    the keepalive."""

    def next_token(self, state):
        time.sleep(0.05)
        return super().next_token(state)

    def speech_step(self, state):
        time.sleep(0.05)
        return super().speech_step(state)


def test_a_client_waiting_in_silence_for_a_slow_answer_is_not_timed_out(engine, sock_path, question):
    slow = _SlowEngine(engine.models, EngineOptions(max_new_tokens=12, max_speech_tokens=40))
    keepalive_s = 0.5
    with running_server(slow, sock_path, keepalive_timeout_s=keepalive_s) as server:
        conn = start_session(sock_path, seed=3)
        start = time.monotonic()
        answer = ask(conn, question)  # sends nothing after turn-end, not even ping
        waited_s = time.monotonic() - start
        frame, _ = conn.recv_until("error", 5)  # then idle: now it times out
        conn.close()
        assert frame.data["code"] == "timeout"
        assert _wait(lambda: server.stats.ended == {"timeout": 1}), server.stats.ended
    assert waited_s > 4 * keepalive_s, f"the answer took only {waited_s:.2f} s: this test shows nothing"
    assert answer.tokens and answer.codec_tokens


def test_reconnect_after_an_abrupt_disconnect_mid_answer(engine, sock_path, question):
    with running_server(engine, sock_path, max_sessions=1) as server:
        conn = start_session(sock_path, seed=5)
        for pcm in question:
            conn.send("audio-chunk", AUDIO_IN, pcm)
        conn.send("turn-end")
        assert conn.recv_until("speaking", 30)[0] is not None
        conn.sock.shutdown(socket.SHUT_RDWR)  # vanish mid-answer
        conn.close()
        assert _wait(lambda: server.scheduler.session_count == 0), "the session was released"
        again = start_session(sock_path, seed=5)
        answer = ask(again, question)
        again.close()
        fresh = _fresh_answer(engine, sock_path, question, seed=5)
    assert answer.tokens == fresh.tokens and answer.codec_tokens == fresh.codec_tokens
    assert server.stats.ended.get("disconnected", 0) >= 1


def _fresh_answer(engine, sock_path, question, seed):
    sock_path = sock_path.with_name("fresh.sock")
    with running_server(engine, sock_path):
        conn = start_session(sock_path, seed=seed)
        try:
            return ask(conn, question)
        finally:
            conn.close()


def test_tcp_off_localhost_needs_a_token(engine, tmp_path, question):
    with pytest.raises(ValueError, match="set server.token"):
        ServerSettings(tcp_enabled=True, tcp_host="0.0.0.0")
    ServerSettings(tcp_enabled=True, tcp_host="127.0.0.1")  # local: no token needed
    with running_server(engine, tmp_path / "t.sock", tcp_enabled=True, tcp_host="0.0.0.0", tcp_port=0,
                        token="s3cret") as server:
        address = f"127.0.0.1:{server.tcp_port}"
        bad = WireConnection.connect(address)
        bad.send("session-start", {"token": "guess"})
        assert bad.recv().data["code"] == "unauthorized"
        good = start_session(address, seed=3, token="s3cret")
        assert ask(good, question).tokens
        good.close()
        local = start_session(tmp_path / "t.sock")  # the Unix socket needs no token
        local.close()


def _wait(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_barge_in_cuts_the_answer_and_answers_the_interruption(engine, sock_path, question):
    from assistant.engine import Engine, EngineOptions

    long_answers = Engine(engine.models, EngineOptions(max_new_tokens=24, max_speech_tokens=120))
    with running_server(long_answers, sock_path, max_lead_s=0.5):  # generation paced by playback
        conn = start_session(sock_path, seed=5)
        for pcm in question:
            conn.send("audio-chunk", AUDIO_IN, pcm)
        conn.send("turn-end")
        first, before = conn.recv_until("audio-chunk", 30)
        assert first is not None and "speaking" in [f.type for f in before]
        time.sleep(0.3)
        for pcm in question:  # the user talks over the answer, then ends the turn
            conn.send("audio-chunk", AUDIO_IN, pcm)
        conn.send("turn-end")
        cut, frames = conn.recv_until("interrupted", 30)
        assert cut is not None, [f.type for f in frames]
        received = (len(first.payload) + sum(len(f.payload) for f in frames if f.type == "audio-chunk")) // 2
        assert 0 < cut.data["played_samples"] <= received
        assert "answer-done" not in [f.type for f in frames], "the answer was still going"
        turn, _ = conn.recv_until("user-turn-ended", 10)
        assert turn.data == {"decision": "respond", "by": "barge-in"}
        assert conn.recv_until("speaking", 30)[0] is not None, "the interruption is answered"
        conn.close()


def test_an_idle_session_is_closed_with_a_reason(engine, sock_path):
    from assistant.conversation import Conversation
    from assistant.scheduler import Scheduler, SchedulerSettings
    from assistant.server import ServerThread, SessionServer

    sched = Scheduler(SchedulerSettings(max_sessions=2, session_idle_timeout_s=0.5, idle_poll_s=0.005))
    sched_reap_every_s = 1.0  # the executors look for idle sessions once a second
    server = SessionServer(ServerSettings(socket_path=str(sock_path)), sched,
                           lambda seed: Conversation(engine, seed))
    thread = ServerThread(server)
    sched.start()
    thread.start()
    try:
        conn = start_session(sock_path)
        start = time.monotonic()
        for _ in range(3):
            conn.send("ping")  # keeps the connection, not the session
            time.sleep(0.1)
        end, _ = conn.recv_until("error", 10)
        assert end.data["code"] == "idle" and time.monotonic() - start < 0.5 + sched_reap_every_s + 1
        assert _wait(lambda: sched.session_count == 0)
    finally:
        thread.stop()
        sched.stop()


def test_stopping_while_clients_keep_connecting_finishes_every_connection(engine, sock_path):
    stop_connecting = threading.Event()
    opened = []

    def connect_in_a_loop() -> None:
        while not stop_connecting.is_set():
            try:
                conn = WireConnection.connect(sock_path)
                conn.send("session-start", {"turn_end": "client"})
                opened.append(conn)
            except OSError:  # the server has stopped listening
                time.sleep(0.001)

    with running_server(engine, sock_path, max_sessions=64) as server:
        threads = [threading.Thread(target=connect_in_a_loop) for _ in range(3)]
        for t in threads:
            t.start()
        assert _wait(lambda: len(opened) >= 30)
    stop_connecting.set()  # only after the server stopped: connections arrive while it closes
    for t in threads:
        t.join()
    for conn in opened:
        conn.close()
    assert not server._handlers
    assert sum(server.stats.ended.values()) == server.stats.connections, server.stats
    assert server.scheduler.session_count == 0

