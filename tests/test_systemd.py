"""systemd integration: the unit files verify, sd_notify is spoken, and the real daemon behaves as a service.

The process test starts `freeze-omni run` on the virtual PulseAudio card with a fake
`NOTIFY_SOCKET` (a unix datagram socket the test binds), the HTTP endpoint on a free port
and a 0.4 s watchdog, then checks READY=1, WATCHDOG=1 pings, /metrics after a spoken turn,
RELOADING=1 on SIGHUP, /health while the microphone is unplugged and back, STOPPING=1 with
exit 0 on SIGTERM, and the debug recording of the turn.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from assistant.sd_notify import Notifier
from tests.conftest import REPO_ROOT
from tests.pulse_harness import INPUT_DEVICE, OUTPUT_DEVICE, PulseHarness, missing_requirement, wait_until

UNITS = REPO_ROOT / "systemd"
SYSTEM_UNIT = UNITS / "freeze-omni-kiosk.service"
USER_UNIT = UNITS / "freeze-omni.service"
HOST_UNIT_DIR = Path("/usr/lib/systemd/system")
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing "
                                   "(apt-get install systemd)")


# ---- unit files -------------------------------------------------------------------------

def _exec_path(unit: Path) -> str:
    return re.search(r"^ExecStart=(\S+)", unit.read_text(), re.M).group(1)


def _stub(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)


@needs_analyze
def test_system_unit_verifies(tmp_path):
    # a fake root: the host's stock units (targets to order against), the unit, and a stub
    # executable where ExecStart points, so nothing has to be installed on this machine
    root = tmp_path / "root"
    if HOST_UNIT_DIR.is_dir():
        shutil.copytree(HOST_UNIT_DIR, root / HOST_UNIT_DIR.relative_to("/"), symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(SYSTEM_UNIT, root / "etc/systemd/system" / SYSTEM_UNIT.name)
    _stub(root / _exec_path(SYSTEM_UNIT).lstrip("/"))
    _stub(root / "bin/kill")
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}",
                          f"/etc/systemd/system/{SYSTEM_UNIT.name}"], capture_output=True, text=True)
    # verify exits 0 even for unknown keys; any message at all is a finding
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


@needs_analyze
def test_user_unit_verifies(tmp_path):
    # --user cannot take --root; a fake HOME holds the stub %h/.local/bin/freeze-omni instead
    home = tmp_path / "home"
    _stub(home / _exec_path(USER_UNIT).replace("%h/", ""))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime),
           "XDG_CONFIG_HOME": str(home / ".config")}
    out = subprocess.run(["systemd-analyze", "--user", "verify", "--man=no", str(USER_UNIT)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(path)
    return parser


@pytest.mark.parametrize("path", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_units_are_watched_notify_services(path):
    service = _unit(path)["Service"]
    assert service["Type"] == "notify" and service["Restart"] == "on-failure" and service["RestartSec"] == "1"
    assert int(service["WatchdogSec"]) > 0
    assert 1 < int(_unit(path)["Unit"]["StartLimitBurst"]) <= 10


def test_system_unit_is_hardened_but_reaches_audio_and_gpu():
    service = _unit(SYSTEM_UNIT)["Service"]
    assert service["User"] != "root"
    assert {"audio", "video", "render"} <= set(service["SupplementaryGroups"].split())
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "read-only" and service["PrivateTmp"] == "yes"
    assert service["StateDirectory"] and service["CacheDirectory"]
    assert "PrivateDevices" not in service and "DevicePolicy" not in service, \
        "would hide /dev/snd and the GPU"


# ---- sd_notify ----------------------------------------------------------------------------

class NotifyListener:
    """A unix datagram socket standing in for systemd; records (time, message) pairs."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")  # socket paths are limited to 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, line: str) -> list[float]:
        return [t for t, m in list(self.messages) if line in m.split("\n")]

    def lines(self, prefix: str) -> list[str]:
        return [ln for _, m in list(self.messages) for ln in m.split("\n") if ln.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture()
def listener():
    sink = NotifyListener()
    yield sink
    sink.close()


def test_notifier_sends_datagrams_and_halves_the_watchdog(listener):
    notifier = Notifier({"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "2000000",
                         "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval_s == 1.0
    notifier.ready("listening")
    notifier.status("listening")  # unchanged: not sent again
    notifier.watchdog()
    notifier.stopping()
    assert wait_until(lambda: len(listener.messages) == 3, 2.0)
    assert [m for _, m in listener.messages] == ["READY=1\nSTATUS=listening", "WATCHDOG=1", "STOPPING=1"]


def test_notifier_is_silent_without_systemd_and_ignores_another_pids_watchdog():
    assert not Notifier({}).enabled and Notifier({}).ready() is False
    other = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify", "WATCHDOG_USEC": "1000000",
                      "WATCHDOG_PID": "1"})
    assert not other.watchdog_enabled
    assert other.ready() is False, "a socket that is gone is reported, not raised"


# ---- the real daemon as a service ----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


def _metric(text: str, name: str, labels: str) -> float | None:
    match = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


@pytest.mark.skipif(missing_requirement() is not None, reason=str(missing_requirement()))
def test_daemon_as_a_notify_service(tmp_path, tiny_dir, listener):
    import soundfile

    port = _free_port()
    env = {**os.environ, "NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "400000", "INVOCATION_ID": "test",
           "FREEZE_OMNI_SERVER__HTTP_ENABLED": "true", "FREEZE_OMNI_SERVER__HTTP_PORT": str(port),
           "FREEZE_OMNI_SERVER__DRAIN_TIMEOUT_S": "2",
           # the tiny model's random text has no punctuation: its first phrase ends with the answer
           "FREEZE_OMNI_DIALOGUE__MAX_ANSWER_TOKENS": "24",
           "FREEZE_OMNI_OBSERVABILITY__DEBUG_RECORDING_DIR": str(tmp_path / "debug")}
    with PulseHarness(tmp_path / "pulse") as pulse:
        env.update(pulse.env)
        log = open(tmp_path / "daemon.log", "wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "assistant.cli", "run", "--model-dir", str(tiny_dir / "checkpoints"),
             "--llm-dir", str(tiny_dir / "llm"), "--input-device", INPUT_DEVICE,
             "--output-device", OUTPUT_DEVICE, "--turn-end", "vad", "--no-aec", "--device", "cpu",
             "--dtype", "float32", "--seed", "0"],
            env=env, stdout=log, stderr=log, cwd=REPO_ROOT)
        try:
            _exercise_service(daemon, listener, pulse, port, tiny_dir, soundfile)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(10)
            log.close()
    text = (tmp_path / "daemon.log").read_text()
    turn = sorted((tmp_path / "debug").iterdir())[0]
    assert {"input.wav", "output.wav", "states.json", "states.png"} <= {f.name for f in turn.iterdir()}, \
        "debug recording of the answered turn"
    assert re.search(r"^<6>INFO assistant\.run_daemon \[session=\w+ turn=", text, re.M), \
        "journald format: priority prefix, no timestamp, session and turn ids"


def _exercise_service(daemon, listener, pulse, port, tiny_dir, soundfile) -> None:
    def log_tail() -> str:
        return f"exit {daemon.poll()}; notifications {listener.messages[-5:]}"

    assert wait_until(lambda: listener.times("READY=1") or daemon.poll() is not None, 180.0), log_tail()
    assert listener.times("READY=1"), log_tail()
    assert any("loading models" in s for s in listener.lines("STATUS=")), "STATUS= while starting"
    assert _get(port, "/health")[0] == 200
    ready_at = listener.times("READY=1")[0]
    assert wait_until(lambda: len([t for t in listener.times("WATCHDOG=1") if t > ready_at]) >= 3, 5.0), \
        "periodic WATCHDOG=1 after READY=1"

    question, rate = soundfile.read(tiny_dir / "inputs/question.wav", dtype="float32")
    pulse.play_into(question, rate).wait()
    played = 'stage="decision_to_first_played"'
    assert wait_until(lambda: _metric(_get(port, "/metrics")[1], "freeze_omni_turn_latency_seconds_count",
                                      played) == 1.0, 90.0), log_tail()
    metrics = _get(port, "/metrics")[1]
    assert _metric(metrics, "freeze_omni_turn_latency_seconds_sum", played) > 0
    assert _metric(metrics, "freeze_omni_model_step_seconds_count", 'step="listen"') > 0
    assert "freeze_omni_turns_answered_total 1" in metrics.splitlines()

    daemon.send_signal(signal.SIGHUP)
    assert wait_until(lambda: listener.times("RELOADING=1"), 5.0), "SIGHUP reloads"
    assert wait_until(lambda: len(listener.times("READY=1")) == 2, 5.0), "READY=1 after the reload"

    pulse.unload_sink("mic")  # unplug the microphone
    assert wait_until(lambda: _get(port, "/health")[0] == 503, 10.0)
    status, body = _get(port, "/health")
    assert json.loads(body)["status"] == "degraded" and "audio device" in json.loads(body)["reason"]
    pulse.load_sink("mic")
    assert wait_until(lambda: _get(port, "/health")[0] == 200, 20.0), "ready again once the device is back"

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=20) == 0
    assert listener.times("STOPPING=1"), log_tail()
