"""Bad clients never hurt others: thousands of malformed frames, slow readers, vanishing clients."""
from __future__ import annotations

import json
import random
import socket
import threading
import time

import pytest

from assistant.engine import Engine, EngineOptions
from assistant.wire import WireConnection
from tests.server_harness import engine, question  # noqa: F401  (module-scoped fixtures)
from tests.server_harness import AUDIO_IN, ask, running_server, start_session

FUZZ_SECONDS = 12.0
MAX_PAYLOAD = 8192


def _header(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _bad_frames(rng: random.Random) -> list[bytes]:
    """One connection's worth of input: maybe some valid events, then something wrong."""
    start = _header({"type": "session-start", "data": {"turn_end": "client"}})
    audio = {"type": "audio-chunk", "data": AUDIO_IN, "payload_length": 320}
    choices = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))) + b"\n",
        lambda: rng.choice([b"[1,2]\n", b'"x"\n', b"3\n", b"null\n", b"{\n", b"\n", b"{}\n"]),
        lambda: _header({"type": rng.choice([1, None, "", ["x"], {"a": 1}])}),
        lambda: _header({"type": "ping", "data": rng.choice([[1], "x", 5])}),
        lambda: _header({"type": "ping", "payload_length": rng.choice([-1, 1.5, True, "9", 10 ** 12])}),
        lambda: _header({"type": "ping", "data_length": 5}) + b"notjs",
        lambda: _header({"type": f"no-such-{rng.randint(0, 9)}"}),
        lambda: _header({"type": "audio-chunk", "data": AUDIO_IN, "payload_length": 2}) + b"\0\0",
        lambda: start + _header({**audio, "data": {"rate": rng.choice([8000, 44100, None]), "width": 2,
                                                     "channels": 1}}) + b"\0" * 320,
        lambda: start + _header({**audio, "data": {**AUDIO_IN, "width": 3}}) + b"\0" * 320,
        lambda: start + _header({**audio, "payload_length": 321}) + b"\0" * 321,
        lambda: start + _header({"type": "ping", "payload_length": MAX_PAYLOAD + 1}),
        lambda: start + _header({"type": "played", "data": {"samples": rng.choice([-5, "x", None])}}),
        lambda: start + _header({"type": "session-start", "data": {"turn_end": "nope"}}),
        lambda: _header({"type": "session-start", "data": {"seed": "abc"}}),
        lambda: start + _header(audio) + b"\0" * 100,  # truncated, then the client vanishes
        lambda: b"x" * 70_000,  # a header line with no end
        lambda: start + _header(audio) + b"\0" * 320 + _header({"type": "turn-end"}),  # then vanish
        lambda: b"",
    ]
    prefix = b"".join(_header({"type": "ping"}) for _ in range(rng.randint(0, 3)))
    return [prefix + rng.choice(choices)()]


def _throw(address, stop_at: float, seed: int, counts: dict, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        payload = _bad_frames(rng)[0]
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(3)
            sock.connect(str(address))
            sock.sendall(payload)
            if rng.random() < 0.3:  # vanish without reading a reply
                sock.close()
            else:  # end of input: the server has all it will get, and must answer or close
                sock.shutdown(socket.SHUT_WR)
                try:
                    while sock.recv(65536):
                        pass
                except (socket.timeout, ConnectionResetError):
                    pass
                sock.close()
        except (BrokenPipeError, ConnectionResetError):
            pass
        with lock:
            counts["frames"] += 1 + payload.count(b"\n")


def test_thousands_of_malformed_frames_leave_the_server_and_a_healthy_session_unharmed(engine, tmp_path,
                                                                                        question):
    path = tmp_path / "fz.sock"
    with running_server(engine, path, max_sessions=64, max_payload_bytes=MAX_PAYLOAD,
                        keepalive_timeout_s=3.0) as server:
        healthy = start_session(path, seed=7)
        reference = ask(healthy, question)
        counts, lock = {"frames": 0}, threading.Lock()
        stop_at = time.monotonic() + FUZZ_SECONDS
        throwers = [threading.Thread(target=_throw, args=(path, stop_at, i, counts, lock)) for i in range(3)]
        for t in throwers:
            t.start()
        during = [ask(healthy, question) for _ in range(2)]  # the healthy session goes on meanwhile
        give_up = time.monotonic() + FUZZ_SECONDS + 30
        while any(t.is_alive() for t in throwers) and time.monotonic() < give_up:
            healthy.send("ping")  # a keepalive-conscious client
            assert healthy.recv_until("pong", 5)[0] is not None
            time.sleep(0.5)
        assert not any(t.is_alive() for t in throwers), "the server stopped answering bad clients"
        healthy.send("ping")
        assert healthy.recv_until("pong", 5)[0] is not None
        healthy.close()
        assert _wait(lambda: server.scheduler.session_count == 0), "every bad session was released"
        after = start_session(path, seed=7)
        again = ask(after, question)
        after.close()
        ended = dict(server.stats.ended)
    assert counts["frames"] >= 2000, counts
    assert all(d.tokens and d.codec_tokens for d in during)
    assert again.tokens == reference.tokens and again.codec_tokens == reference.codec_tokens
    assert again.pcm == reference.pcm
    for code in ("bad-frame", "unknown-event", "bad-audio-format", "payload-too-large", "header-too-large",
                 "no-session", "disconnected"):
        assert ended.get(code, 0) > 0, (code, ended)
    assert server.scheduler.stats.failures == 0


def test_a_slow_reader_loses_audio_and_is_disconnected_while_others_are_served(engine, tmp_path, question):
    long_answers = Engine(engine.models, EngineOptions(max_new_tokens=24, max_speech_tokens=120))
    path = tmp_path / "slow.sock"
    with running_server(long_answers, path, max_sessions=2, send_queue_events=8,
                        max_dropped_events=8) as server:
        slow = WireConnection.connect(path)
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.send("session-start", {"turn_end": "client", "seed": 1})
        for pcm in question:
            slow.send("audio-chunk", AUDIO_IN, pcm)
        slow.send("turn-end")  # ... and never reads
        other = start_session(path, seed=2)
        answer = ask(other, question)
        assert _wait(lambda: server.stats.ended.get("slow-reader") == 1, 30), server.stats
        other.close()
        slow.close()
        assert server.stats.dropped_events >= 8
    assert answer.tokens and answer.codec_tokens


def _wait(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
