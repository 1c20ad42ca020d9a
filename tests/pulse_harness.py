"""A private PulseAudio daemon as a virtual sound card for tests through real PortAudio streams.

Layout (one daemon, everything under a temp dir, every process stopped by PID):

    test ──pacat──▶ sink `mic` ──monitor──▶ ALSA pcm `virtual_mic`     ──▶ PortAudio input
    PortAudio output ──▶ ALSA pcm `virtual_speaker` ──▶ sink `spk` ──monitor──▶ pacat ──▶ test

How PortAudio reaches PulseAudio here: Debian's PortAudio 19.6 has no PulseAudio host API,
so it goes through ALSA's `pulse` plugin (package libasound2-plugins). The harness writes
`$XDG_CONFIG_HOME/alsa/asoundrc` (alsa.conf includes it) defining two PCMs of `type pulse`
bound to the daemon's socket, and PortAudio lists them by name. alsa-lib re-reads its
configuration when PortAudio is re-initialised, so setting the environment inside the test
process is enough.

Two PulseAudio behaviours the harness works around:
  * a null sink renders in 2 s blocks unless a client asks for low latency, so a
    `pacat --latency-msec=10` reader stays attached to each monitor (they also record);
  * by default PulseAudio moves ("rescues") the streams of a removed device to another
    device, so an application never sees the loss; the daemon runs with
    `rescue-streams = no` so unloading a sink behaves like unplugging a USB device.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INPUT_DEVICE = "virtual_mic"  # ALSA pcm reading the `mic` sink's monitor
OUTPUT_DEVICE = "virtual_speaker"  # ALSA pcm playing into the `spk` sink
SINK_RATE_HZ = 48_000
MONITOR_RATE_HZ = 48_000  # what the readers record at
READY_TIMEOUT_S = 10.0
REQUIRED_TOOLS = ("pulseaudio", "pacat", "pactl")
ALSA_PULSE_PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu/alsa-lib", "/usr/lib/aarch64-linux-gnu/alsa-lib",
                          "/usr/lib64/alsa-lib", "/usr/lib/alsa-lib")


def missing_requirement() -> str | None:
    """Why the harness cannot run here, or None."""
    absent = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if absent:
        return f"PulseAudio tools missing: {', '.join(absent)} (apt-get install pulseaudio pulseaudio-utils)"
    if not any(Path(d, "libasound_module_pcm_pulse.so").is_file() for d in ALSA_PULSE_PLUGIN_DIRS):
        return "ALSA pulse plugin missing (apt-get install libasound2-plugins)"
    try:
        import pyaudio  # noqa: F401
    except ImportError:
        return "PyAudio missing (apt-get install portaudio19-dev && pip install pyaudio)"
    return None


@dataclass
class _Reader:
    """A low-latency `pacat --record` on a monitor, writing raw s16le mono to a file."""

    process: subprocess.Popen
    path: Path


class PulseHarness:
    """Starts a private PulseAudio daemon with null sinks `mic` and `spk`.

    Args:
        root: an empty temp directory (runtime dir, config, recordings, logs).
        sink_rate_hz: the null sinks' rate.
    """

    def __init__(self, root: Path, sink_rate_hz: int = SINK_RATE_HZ) -> None:
        self.root = Path(root)
        self.sink_rate_hz = sink_rate_hz
        self.runtime_dir = self.root / "run"
        self.config_dir = self.root / "config"
        self.socket = self.runtime_dir / "native"
        self.env = {"XDG_RUNTIME_DIR": str(self.runtime_dir), "XDG_CONFIG_HOME": str(self.config_dir),
                    "PULSE_SERVER": f"unix:{self.socket}"}
        self.daemon: subprocess.Popen | None = None
        self.readers: dict[str, _Reader] = {}
        self.modules: dict[str, str] = {}  # sink name → module index
        self._players: list[subprocess.Popen] = []
        self._saved_env: dict[str, str | None] = {}

    # ---- lifecycle ----

    def start(self) -> "PulseHarness":
        self.runtime_dir.mkdir(parents=True, mode=0o700)
        (self.config_dir / "pulse").mkdir(parents=True)
        (self.config_dir / "alsa").mkdir(parents=True)
        (self.config_dir / "pulse" / "daemon.conf").write_text(
            "rescue-streams = no\nexit-idle-time = -1\nuse-pid-file = no\n"
            "high-priority = no\nrealtime-scheduling = no\n")
        script = self.root / "harness.pa"
        script.write_text(f"load-module module-native-protocol-unix auth-anonymous=1 socket={self.socket}\n")
        (self.config_dir / "alsa" / "asoundrc").write_text(self._asoundrc())
        for key, value in self.env.items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        log = open(self.root / "pulseaudio.log", "wb")
        self.daemon = subprocess.Popen(
            ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "-F", str(script),
             "--log-target=stderr"],
            env={**os.environ, "PULSE_CONFIG": str(self.config_dir / "pulse" / "daemon.conf")},
            stdout=log, stderr=log)
        log.close()
        self._wait_ready()
        # PulseAudio moves streams that "follow the default device" when the default goes
        # away, rescue or not: a default that never goes away keeps unplugging honest
        self.pactl("load-module", "module-null-sink", "sink_name=fallback", "rate=48000", "channels=1")
        self.pactl("set-default-sink", "fallback")
        self.pactl("set-default-source", "fallback.monitor")
        for sink in ("mic", "spk"):
            self.load_sink(sink, wait_flowing=False)
        for sink in ("mic", "spk"):
            self.wait_flowing(sink)
        return self

    def stop(self) -> None:
        """Stop every process this harness started, by PID, and restore the environment."""
        for player in self._players:
            _terminate(player)
        for reader in self.readers.values():
            _terminate(reader.process)
        self.readers.clear()
        if self.daemon is not None:
            _terminate(self.daemon)
            self.daemon = None
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def __enter__(self) -> "PulseHarness":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _asoundrc(self) -> str:
        server = f"unix:{self.socket}"
        return (f'pcm.{INPUT_DEVICE} {{ type pulse; server "{server}"; device "mic.monitor"; '
                f'hint {{ show on; description "harness microphone" }} }}\n'
                f'pcm.{OUTPUT_DEVICE} {{ type pulse; server "{server}"; device "spk"; '
                f'hint {{ show on; description "harness speaker" }} }}\n')

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"pulseaudio exited: {(self.root / 'pulseaudio.log').read_text()[-2000:]}")
            if self.pactl("info", check=False).returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError("pulseaudio did not come up within 10 s")

    def pactl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["pactl", *args], capture_output=True, text=True, check=check,
                              env=os.environ.copy())

    # ---- devices (hot-plug) ----

    def load_sink(self, name: str, wait_flowing: bool = True) -> None:
        """Load null sink `name` and attach the low-latency recorder to its monitor.

        Args:
            wait_flowing: return only once the monitor delivers audio (a freshly loaded null
                sink renders its first 2 s block before the reader's latency applies).
        """
        out = self.pactl("load-module", "module-null-sink", f"sink_name={name}",
                         f"rate={self.sink_rate_hz}", "channels=1").stdout
        self.modules[name] = out.strip()
        self._attach_reader(name)
        if wait_flowing:
            self.wait_flowing(name)

    def unload_sink(self, name: str) -> None:
        """Unplug: remove the sink (its monitor's streams are killed, not moved)."""
        reader = self.readers.pop(name, None)
        if reader is not None:
            _terminate(reader.process)
        self.pactl("unload-module", self.modules.pop(name))

    def _attach_reader(self, name: str) -> None:
        path = self.root / f"{name}-monitor-{time.monotonic_ns()}.raw"
        with open(path, "wb") as sink_file:
            process = subprocess.Popen(
                ["pacat", "--record", "--latency-msec=10", "-d", f"{name}.monitor", "--raw",
                 f"--rate={MONITOR_RATE_HZ}", "--channels=1", "--format=s16le"],
                stdout=sink_file, stderr=subprocess.DEVNULL, env=os.environ.copy())
        self.readers[name] = _Reader(process, path)

    def wait_flowing(self, name: str, timeout_s: float = 15.0) -> None:
        """Wait until the monitor reader of `name` receives audio.

        A fresh null sink's first block takes about 2 s; 15 s because a CI machine busy with other
        jobs once starved PulseAudio past 5 s. This waits for the test rig, it measures nothing."""
        path = self.readers[name].path
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if path.stat().st_size > 0:
                return
            time.sleep(0.01)
        raise RuntimeError(f"{name}.monitor delivered nothing within {timeout_s} s")

    # ---- signals ----

    def recorded_bytes(self, name: str = "spk") -> int:
        """A mark: how much the monitor of `name` has recorded so far."""
        return self.readers[name].path.stat().st_size

    def recording(self, name: str = "spk", since_bytes: int = 0) -> np.ndarray:
        """(T,) float32 at MONITOR_RATE_HZ recorded from `name`.monitor since the mark."""
        data = self.readers[name].path.read_bytes()[since_bytes:]
        data = data[: len(data) // 2 * 2]
        return np.frombuffer(data, dtype=np.int16).astype(np.float32) / 32768.0

    def play_into(self, samples: np.ndarray, rate_hz: int, sink: str = "mic") -> subprocess.Popen:
        """Start playing float samples into `sink` (returns the pacat process; `.wait()` it)."""
        pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32768.0), -32768, 32767).astype("<i2")
        path = self.root / f"play-{time.monotonic_ns()}.raw"
        path.write_bytes(pcm.tobytes())
        player = subprocess.Popen(
            ["pacat", "--playback", "-d", sink, "--raw", f"--rate={rate_hz}", "--channels=1",
             "--format=s16le", "--latency-msec=20", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
        self._players.append(player)
        return player

    def add_echo_path(self, delay_ms: int, volume_percent: int) -> str:
        """Leak the speaker back into the microphone (spk.monitor → mic) with a delay and
        attenuation, like a loudspeaker heard by the room's microphone; returns the module."""
        module = self.pactl("load-module", "module-loopback", "source=spk.monitor", "sink=mic",
                            f"latency_msec={delay_ms}", "source_dont_move=true", "sink_dont_move=true",
                            "remix=false").stdout.strip()
        sink_input = None
        for line in self.pactl("list", "sink-inputs").stdout.splitlines():
            line = line.strip()
            if line.startswith("Sink Input #"):
                sink_input = line.removeprefix("Sink Input #")
            elif line == f"Owner Module: {module}" and sink_input is not None:
                self.pactl("set-sink-input-volume", sink_input, f"{volume_percent}%")
                return module
        raise RuntimeError(f"module-loopback {module} has no sink input")


def wait_until(predicate, timeout_s: float) -> bool:
    """Poll `predicate` every 50 ms; True as soon as it holds, False after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _terminate(process: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, one process by its PID."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)


def settle(stream, timeout_s: float = 4.0) -> None:
    """Wait for a `DuplexStream`'s first microphone chunk, then drop what is queued."""
    deadline = time.monotonic() + timeout_s
    while stream.read_model_chunk(0.05) is None:
        assert time.monotonic() < deadline, "no microphone audio"
    while stream.read_model_chunk(0.0) is not None:
        pass


def run_hotplug_cycles(scenario: str, root: Path, cycles: int = 10, timeout_s: float = 300.0) -> dict:
    """Run `tests/hotplug_cycles.py` SCENARIO in a child process with its own PulseAudio daemon;
    its measurements (per-cycle sizes, re-open times, loss warnings) as a dict."""
    import json
    import sys

    out = root / "result.json"
    child = subprocess.run(
        [sys.executable, "-m", "tests.hotplug_cycles", scenario, str(root / "pulse"), str(out),
         "--cycles", str(cycles)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=timeout_s)
    noise = ("Expression '", "ALSA lib ")  # PortAudio's and alsa-lib's prints of every lost poll
    stderr = "\n".join(line for line in child.stderr.splitlines() if not line.startswith(noise))
    assert child.returncode == 0, f"{scenario} cycles failed (exit {child.returncode}):\n{stderr[-4000:]}"
    return json.loads(out.read_text())
