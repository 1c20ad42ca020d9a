"""`freeze-omni serve` as a process, and the configuration keys it reads."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from assistant.cli import main
from assistant.config import all_keys, load_config
from assistant.wire import WireConnection
from tests.conftest import REPO_ROOT
from tests.server_harness import ask, question_pcm

EXAMPLE = REPO_ROOT / "systemd" / "config.example.yaml"
SERVE_KEYS = {"scheduler.executors", "scheduler.reserved_listen_executors", "scheduler.max_sessions",
              "scheduler.session_idle_timeout_s", "server.socket_path", "server.tcp_enabled",
              "server.tcp_host", "server.tcp_port", "server.token", "server.max_payload_bytes",
              "server.send_queue_events",
              "server.max_dropped_events", "server.keepalive_timeout_s", "server.client_lead_s"}


def test_serve_keys_are_configurable_and_documented_in_the_example():
    assert SERVE_KEYS <= set(all_keys())
    data = yaml.safe_load(EXAMPLE.read_text())
    written = {f"{section}.{name}" for section, body in data.items() for name in body}
    assert written == set(all_keys())
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  ") and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#"), f"{EXAMPLE.name}:{i + 1} has no comment"
    config = load_config(EXAMPLE, env={"FREEZE_OMNI_SERVER__TOKEN": "t0k"}, system_path=None,
                         user_path=Path("/nonexistent")).config
    assert config.server.token == "t0k" and config.scheduler.max_sessions == 8


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.read().decode()


def _serve_cmd(tiny_dir, *extra: str) -> list[str]:
    return [sys.executable, "-m", "assistant.cli", "serve", "--model-dir", str(tiny_dir / "checkpoints"),
            "--llm-dir", str(tiny_dir / "llm"), "--device", "cpu", "--set", "dialogue.max_answer_tokens=6",
            "--set", "dialogue.max_speech_tokens_per_segment=30", "--set", "scheduler.torch_threads=1",
            *extra]


def test_a_non_local_tcp_bind_without_a_token_is_refused_before_loading(tiny_dir, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    start = time.monotonic()
    assert main(_serve_cmd(tiny_dir, "--socket", str(tmp_path / "s.sock"), "--tcp", "0.0.0.0:0")[3:]) == 2
    assert "set server.token" in capsys.readouterr().err
    assert time.monotonic() - start < 5, "refused before the models load"


def test_serve_answers_a_client_on_its_socket_and_exits_cleanly_on_sigterm(tiny_dir, tmp_path):
    sock = tmp_path / "serve.sock"
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    http_port = _free_port()
    proc = subprocess.Popen(_serve_cmd(tiny_dir, "--socket", str(sock), "--executors", "2", "--set",
                                       "server.http_enabled=true", "--set", f"server.http_port={http_port}"),
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sock.exists(), proc.communicate(timeout=5)[0] if proc.poll() is not None else "no socket"
        conn = WireConnection.connect(sock)
        conn.send("describe")
        info = conn.recv(10)
        assert info.type == "info" and info.data["sessions"]["max"] == 8
        conn.send("session-start", {"turn_end": "client", "seed": 4})
        assert conn.recv(10).type == "session-started"
        answer = ask(conn, question_pcm(tiny_dir))
        assert answer.tokens and answer.codec_tokens and answer.pcm
        metrics = _get(f"http://127.0.0.1:{http_port}/metrics")
        assert "freeze_omni_server_sessions_active 1" in metrics
        assert 'freeze_omni_server_steps_total{kind="listen"}' in metrics
        assert _get(f"http://127.0.0.1:{http_port}/health")
        proc.send_signal(signal.SIGTERM)
        end, _ = conn.recv_until("session-ended", 10)
        assert end is not None and end.data["code"] == "server-stopping"
        conn.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_run_serves_network_sessions_beside_the_local_one_only_when_configured(tiny_dir, tmp_path):
    import dataclasses

    import torch

    from assistant.config import AssistantConfig
    from assistant.daemon_config import DialogueSettings
    from assistant.serve import start_background_server
    from quantized_models.model_dir import load_models

    models = load_models(tiny_dir / "checkpoints", tiny_dir / "llm", torch.device("cpu"), torch.float32)
    assert start_background_server(AssistantConfig(), models) is None, "off unless a socket or TCP is set"
    sock = tmp_path / "run.sock"
    config = AssistantConfig(server=dataclasses.replace(AssistantConfig().server, socket_path=str(sock)),
                             dialogue=DialogueSettings(max_answer_tokens=6, max_speech_tokens_per_segment=30))
    stop = start_background_server(config, models)
    try:
        conn = WireConnection.connect(sock)
        conn.send("session-start", {"turn_end": "client", "seed": 2})
        assert conn.recv(10).type == "session-started"
        assert ask(conn, question_pcm(tiny_dir)).codec_tokens
        conn.close()
    finally:
        stop()
    with pytest.raises(OSError):
        WireConnection.connect(sock)  # stopped: nobody listens any more
