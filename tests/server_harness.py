"""Shared pieces of the server tests: the tiny engine, a running server, a scripted wire client."""
from __future__ import annotations

import contextlib
import dataclasses
import threading

import numpy as np
import pytest
import soundfile
import torch

from assistant.conversation import Conversation
from assistant.engine import Engine, EngineOptions
from assistant.respond import split_chunks
from assistant.scheduler import Scheduler, SchedulerSettings
from assistant.server import ServerSettings, ServerThread, SessionServer
from assistant.wire import WireConnection
from quantized_models.model_dir import load_models
from quantized_models.sampling import TextSamplingConfig

AUDIO_IN = {"rate": 16_000, "width": 2, "channels": 1}


def tiny_engine(tiny_dir, max_new_tokens: int = 6, max_speech_tokens: int = 30) -> Engine:
    models = load_models(tiny_dir / "checkpoints", tiny_dir / "llm", torch.device("cpu"), torch.float32)
    return Engine(models, EngineOptions(text_sampling=TextSamplingConfig(0.8, 20, 0.8), speech_top_k=2,
                                        max_new_tokens=max_new_tokens, max_speech_tokens=max_speech_tokens))


def question_pcm(tiny_dir, chunks: int = 6) -> list[bytes]:
    """The fixture's question as 16-bit PCM, one 160 ms chunk per entry."""
    samples, _ = soundfile.read(tiny_dir / "inputs/question.wav", dtype="float32")
    out = []
    for chunk in split_chunks(samples)[:chunks]:
        out.append((np.clip(chunk.numpy(), -1, 1) * 32767).astype("<i2").tobytes())
    return out


@contextlib.contextmanager
def running_server(engine: Engine, socket_path, executors: int = 2, max_sessions: int = 8, **server_kw):
    sched = Scheduler(SchedulerSettings(executors=executors, max_sessions=max_sessions, idle_poll_s=0.005))
    settings = ServerSettings(socket_path=str(socket_path), **{"max_lead_s": 1e9, **server_kw})
    server = SessionServer(settings, sched, lambda seed: Conversation(engine, seed=seed))
    thread = ServerThread(server)
    sched.start()
    thread.start()
    try:
        yield server
    finally:
        thread.stop()
        sched.stop()


def start_session(address, seed: int | None = None, turn_end: str = "client", **extra) -> WireConnection:
    conn = WireConnection.connect(address)
    conn.send("session-start", {"turn_end": turn_end, "seed": seed, **extra})
    started = conn.recv(10)
    assert started is not None and started.type == "session-started", started
    return conn


@dataclasses.dataclass
class Answer:
    tokens: list[int]
    codec_tokens: list[int]
    pcm: bytes
    events: list[str]


def ask(conn: WireConnection, question: list[bytes], timeout_s: float = 60.0) -> Answer:
    """Send one question, end the turn, collect everything up to `answer-done`."""
    for pcm in question:
        conn.send("audio-chunk", AUDIO_IN, pcm)
    conn.send("turn-end")
    done, frames = conn.recv_until("answer-done", timeout_s)
    assert done is not None, f"no answer; got {[f.type for f in frames][-5:]}"
    pcm = b"".join(f.payload for f in frames if f.type == "audio-chunk")
    for f in frames:
        if f.type == "audio-chunk":
            assert (f.data["rate"], f.data["width"], f.data["channels"]) == (24_000, 2, 1)
    return Answer(done.data["tokens"], done.data["codec_tokens"], pcm, [f.type for f in frames])


def ask_in_threads(address, question, seeds: list[int]) -> list[Answer]:
    results: list = [None] * len(seeds)

    def one(i: int) -> None:
        conn = start_session(address, seed=seeds[i])
        try:
            results[i] = ask(conn, question)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            results[i] = err
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(seeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    errors = [r for r in results if not isinstance(r, Answer)]
    assert not errors, errors
    return results


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return tiny_engine(tiny_dir)


@pytest.fixture(scope="module")
def question(tiny_dir):
    return question_pcm(tiny_dir)
