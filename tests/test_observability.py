"""Metrics, /health, SIGTERM drain, SIGHUP reload, watchdog gating, debug recordings and progress,
driven through the real daemon loop with the fake duplex device and a scripted dialogue."""
from __future__ import annotations

import json
import logging
import re
import struct
import types
import urllib.error
import urllib.request
import zlib
from dataclasses import replace

import numpy as np
import pytest
import soundfile

from assistant.config import AssistantConfig, ConfigError, Problem
from assistant.daemon import Daemon
from assistant.debug_recording import DebugRecorder, state_plot_png
from assistant.dialogue import Decision
from assistant.engine import EngineOptions
from assistant.observability import JOURNAL_FORMAT, Health, HttpEndpoint, LogContext, Metrics
from assistant.progress import Progress, wants_bar
from assistant.sd_notify import Notifier
from assistant.service import MAX_FAILURES_IN_WINDOW, ServiceLoop
from assistant.telemetry import Telemetry
from tests.fakes import (
    BargeInAllowed,
    FakeClock,
    FakeDuplex,
    LevelGate,
    ScriptedConversation,
    silence_chunks,
    speech_chunks,
)

CONFIG = AssistantConfig(vad=replace(AssistantConfig().vad, preroll_ms=320))


class RecordingNotifier(Notifier):
    """Notifier that records what it would send; watchdog every `interval_s`."""

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__({})
        self.watchdog_interval_s = interval_s
        self.sent: list[tuple[str, ...]] = []

    @property
    def enabled(self) -> bool:
        return True

    def send(self, *assignments: str) -> bool:
        self.sent.append(assignments)
        return True

    def count(self, line: str) -> int:
        return sum(line in s for s in self.sent)


class SegmentedConversation(ScriptedConversation):
    """Answers in segments of `segment_tokens` speech steps; `state.speech` is the current segment."""

    segment_tokens = 10

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state = types.SimpleNamespace(speech=None)
        self.engine = types.SimpleNamespace(options=EngineOptions())
        self._in_segment = 0

    def answer_step(self):
        work = super().answer_step()
        if work.new_speech_token:
            if self.state.speech is None or self.state.speech.done:
                self.state.speech, self._in_segment = types.SimpleNamespace(done=False), 0
            self._in_segment += 1
            self.state.speech.done = self._in_segment == self.segment_tokens or work.done
        return work


def _service(mic, script, speech_tokens=40, config=CONFIG, reload_config=None, interval_s=0.5):
    clock = FakeClock()
    audio = FakeDuplex(clock, mic)
    conv = SegmentedConversation(script=script, speech_tokens=speech_tokens)
    daemon = Daemon(conv, audio, LevelGate(), BargeInAllowed(), config.daemon_settings(), clock)
    telemetry = Telemetry(Metrics())
    telemetry.daemon_collector(daemon, audio)
    notifier, health = RecordingNotifier(interval_s), Health(clock.monotonic)
    service = ServiceLoop(daemon, config, notifier, health, telemetry, reload_config, clock=clock.monotonic)
    return service, daemon, audio, clock


def _ticks(service, n: int) -> int:
    """Run up to `n` ticks the way Daemon.run does; returns how many ran before should_stop said stop."""
    for i in range(n):
        if service.should_stop():
            return i
        service.daemon.tick()
    return n


def _scrape(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _sample(text: str, name: str, labels: str = "") -> float:
    series = rf"{re.escape(name)}{{{re.escape(labels)}}}" if labels else re.escape(name)
    pattern = rf"^{series} (\S+)$"
    match = re.search(pattern, text, re.M)
    assert match, f"{name}{{{labels}}} not in\n{text}"
    return float(match.group(1))


# ---- /metrics and /health --------------------------------------------------------------------

def test_metrics_show_the_turn_latencies_and_counters():
    mic = silence_chunks(4) + speech_chunks(6) + silence_chunks(40)
    service, daemon, audio, _ = _service(mic, [(Decision.RESPOND, 5)])
    endpoint = HttpEndpoint(service.telemetry.metrics, service.health, port=0).start()
    try:
        _ticks(service, 50)
        service.should_stop()  # the loop collects the last turn record before the next tick
        status, text = _scrape(endpoint.port, "/metrics")
    finally:
        endpoint.close()
    assert status == 200
    record = daemon.turn_log[0]
    for stage in ("decision_to_first_pcm", "decision_to_first_played"):
        labels = f'stage="{stage}"'
        assert _sample(text, "freeze_omni_turn_latency_seconds_count", labels) == 1
        assert _sample(text, "freeze_omni_turn_latency_seconds_sum", labels) == pytest.approx(
            record[f"{stage}_ms"] / 1000)
        assert _sample(text, "freeze_omni_turn_latency_seconds_bucket", labels + ',le="+Inf"') == 1
    assert _sample(text, "freeze_omni_turns_answered_total") == 1
    assert _sample(text, "freeze_omni_barge_ins_total") == 0
    assert "# TYPE freeze_omni_turn_latency_seconds histogram" in text


def test_histogram_buckets_are_cumulative():
    metrics = Metrics()
    hist = metrics.histogram("x_seconds", "test", (0.1, 1.0), label="stage")
    for value in (0.05, 0.5, 0.5, 5.0):
        hist.observe(value, "a")
    text = metrics.render()
    buckets = [_sample(text, "x_seconds_bucket", f'stage="a",le="{le}"') for le in ("0.1", "1", "+Inf")]
    assert buckets == [1, 3, 4]
    assert _sample(text, "x_seconds_sum", 'stage="a"') == pytest.approx(6.05)


def test_health_degrades_while_the_audio_device_is_gone():
    service, daemon, audio, clock = _service(silence_chunks(10), [])
    endpoint = HttpEndpoint(service.telemetry.metrics, service.health, port=0).start()
    try:
        assert _scrape(endpoint.port, "/health")[0] == 503, "starting: not ready yet"
        _ticks(service, 3)
        assert _scrape(endpoint.port, "/health")[0] == 200
        audio.healthy, audio.fail_reopen_until = False, clock.now + 1e9  # unplugged, stays away
        _ticks(service, 3)
        status, body = _scrape(endpoint.port, "/health")
        assert status == 503 and json.loads(body)["status"] == "degraded"
        assert "audio device" in json.loads(body)["reason"]
        assert any("no audio device" in line for sent in service.notifier.sent for line in sent)
        audio.fail_reopen_until = 0.0  # plugged back in
        clock.now += 1.0
        _ticks(service, 3)
        assert _scrape(endpoint.port, "/health")[0] == 200
    finally:
        endpoint.close()


# ---- systemd behaviour of the loop -------------------------------------------------------------

def test_watchdog_is_fed_only_while_dialogue_steps_succeed():
    service, daemon, _, clock = _service(silence_chunks(200), [], interval_s=0.5)
    _ticks(service, 20)  # 20 × 160 ms of fake time
    healthy_pings = service.notifier.count("WATCHDOG=1")
    assert healthy_pings >= 5
    daemon.counters.recoveries += MAX_FAILURES_IN_WINDOW  # steps failing in a row
    _ticks(service, 20)
    assert service.notifier.count("WATCHDOG=1") == healthy_pings, "no pings while failing"
    assert service.health.snapshot()["status"] == "degraded"
    clock.now += 60.0  # the failures age out of the window
    _ticks(service, 5)
    assert service.notifier.count("WATCHDOG=1") > healthy_pings


def test_sigterm_finishes_the_phrase_being_played_then_stops():
    mic = speech_chunks(3) + silence_chunks(200)
    service, daemon, audio, _ = _service(mic, [(Decision.RESPOND, 2)], speech_tokens=40)
    segment = None
    for _ in range(100):  # until the answer's first segment is being synthesised
        service.should_stop()
        daemon.tick()
        segment = daemon.conv.state.speech
        if segment is not None and not segment.done:
            break
    assert segment is not None and not segment.done
    service.request_stop()
    ticks = _ticks(service, 100)
    assert ticks < 100 and service.notifier.count("STOPPING=1") == 1
    assert segment.done, "the phrase being played was completed"
    assert daemon.conv.answering, "later phrases were not started"
    assert service.health.snapshot()["status"] == "stopping"


def test_sigterm_when_idle_stops_at_once():
    service, daemon, _, _ = _service(silence_chunks(10), [])
    _ticks(service, 2)
    service.request_stop()
    assert service.should_stop() is True


def test_sigterm_drain_is_bounded():
    mic = speech_chunks(3) + silence_chunks(400)
    config = replace(CONFIG, server=replace(CONFIG.server, drain_timeout_s=0.5))
    service, daemon, _, _ = _service(mic, [(Decision.RESPOND, 2)], speech_tokens=400, config=config)
    SegmentedConversation.segment_tokens = 10_000  # one endless phrase
    try:
        while daemon.conv.state.speech is None:
            service.should_stop()
            daemon.tick()
        service.request_stop()
        assert _ticks(service, 100) <= 5, "0.5 s of fake time is a few 160 ms ticks"
    finally:
        SegmentedConversation.segment_tokens = 10


class DrainingSpeaker:
    """Plays out after three polls of `playing`."""

    healthy = True

    def __init__(self) -> None:
        self.polls, self.finished = 0, False

    def finish_playback(self) -> None:
        self.finished = True

    @property
    def playing(self) -> bool:
        self.polls += 1
        return self.polls < 3


def test_finish_plays_out_what_is_queued_within_the_drain_time():
    service, *_ = _service(silence_chunks(1), [])
    service.audio = speaker = DrainingSpeaker()
    service._drain_deadline = float("inf")
    service.finish()
    assert speaker.finished and speaker.polls == 3
    assert service.notifier.count("STOPPING=1") == 1


def test_sighup_applies_live_keys_and_reports_the_others(caplog):
    new = replace(CONFIG, dialogue=replace(CONFIG.dialogue, respond_probability=0.8, min_barge_in_ms=900),
                  vad=replace(CONFIG.vad, aggressiveness=3))
    service, daemon, _, _ = _service(silence_chunks(10), [], reload_config=lambda: new)
    with caplog.at_level(logging.INFO):
        service.request_reload()
        _ticks(service, 1)
    assert daemon.settings.dialogue.min_barge_in_ms == 900
    assert daemon.conv.engine.options.thresholds.respond_probability == 0.8
    assert daemon.settings.vad.aggressiveness == CONFIG.vad.aggressiveness, "needs a restart"
    assert "vad.aggressiveness change only after a restart" in caplog.text
    assert service.notifier.count("RELOADING=1") == 1 and service.notifier.count("READY=1") == 1


def test_sighup_with_a_broken_config_keeps_the_running_one(caplog):
    def broken():
        raise ConfigError([Problem("/etc/freeze-omni/config.yaml", "vad.frame_ms",
                                   "25: webrtcvad takes 10, 20 or 30")])

    service, daemon, _, _ = _service(silence_chunks(10), [], reload_config=broken)
    before = daemon.settings
    service.request_reload()
    _ticks(service, 1)
    assert daemon.settings is before
    assert "reload refused" in caplog.text and "vad.frame_ms" in caplog.text


# ---- logs, debug recordings, progress ------------------------------------------------------------

def test_journal_log_lines_carry_priority_session_and_turn_but_no_time():
    record = logging.LogRecord("assistant.daemon", logging.WARNING, __file__, 1, "device lost", None, None)
    LogContext.session, LogContext.turn = "abc123", "4"
    try:
        LogContext().filter(record)
        line = logging.Formatter(JOURNAL_FORMAT).format(record)
    finally:
        LogContext.session = LogContext.turn = "-"
    assert line == "<4>WARNING assistant.daemon [session=abc123 turn=4] device lost"


def test_debug_recording_writes_each_turns_audio_and_state_plot(tmp_path):
    recorder = DebugRecorder(tmp_path, thresholds=(0.5, 0.5))
    recorder.turn_started("s1-0001")
    for i in range(5):
        recorder.listened(np.full(2560, 0.1, dtype=np.float32), (0.8 - 0.15 * i, 0.15 * i, 0.2), "continue")
    recorder.answer_started()
    recorder.spoke(np.full(2400, 0.2, dtype=np.float32))
    recorder.turn_started("s1-0002")  # an interruption: heard while the first answer still plays
    recorder.listened(np.zeros(2560, dtype=np.float32), (0.1, 0.1, 0.8), "ignore")
    recorder.spoke(np.full(2400, 0.2, dtype=np.float32))  # still the first turn's answer
    recorder.flush()
    first, second = tmp_path / "s1-0001", tmp_path / "s1-0002"
    assert soundfile.info(first / "input.wav").frames == 5 * 2560
    output = soundfile.info(first / "output.wav")
    assert output.frames == 2 * 2400 and output.samplerate == 24000
    assert not (second / "output.wav").exists() and soundfile.info(second / "input.wav").frames == 2560
    states = json.loads((first / "states.json").read_text())["chunks"]
    assert [round(s["p_respond"], 2) for s in states] == [0.0, 0.15, 0.3, 0.45, 0.6]
    assert (first / "states.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _decode_png(data: bytes) -> np.ndarray:
    width, height = struct.unpack(">II", data[16:24])
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * 3)
    assert not rows[:, 0].any(), "filter 0 on every row"
    return rows[:, 1:].reshape(height, width, 3)


def test_state_plot_draws_the_respond_probability_where_it_is():
    rising = [{"p_continue": 1 - p, "p_respond": p, "p_ignore": 0.0} for p in np.linspace(0, 1, 20)]
    image = _decode_png(state_plot_png(rising, (0.5, 0.5)))
    green = np.argwhere((image == (0, 150, 60)).all(axis=2))  # (N, 2) rows, cols
    left, right = green[green[:, 1] == green[:, 1].min()], green[green[:, 1] == green[:, 1].max()]
    assert left[:, 0].mean() > right[:, 0].mean(), "a rising probability goes up the image"


def test_progress_is_plain_log_lines_under_systemd(monkeypatch, caplog):
    monkeypatch.setenv("INVOCATION_ID", "x")
    assert not wants_bar()
    steps = []
    with caplog.at_level(logging.INFO, logger="assistant.progress"):
        with Progress(2, "starting", on_step=steps.append) as progress:
            progress.step("loading models")
            progress.advance()
            progress.step("warming up")
            progress.advance()
    assert steps == ["starting: loading models (1/2)", "starting: warming up (2/2)"]
    assert "starting: loading models (1/2)" in caplog.text and "done in" in caplog.text


def test_progress_draws_a_bar_on_a_terminal(monkeypatch):
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    terminal = types.SimpleNamespace(isatty=lambda: True)
    assert wants_bar(terminal) and not wants_bar(types.SimpleNamespace(isatty=lambda: False))
