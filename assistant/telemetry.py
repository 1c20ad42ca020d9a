"""What the running daemon reports: metrics, session and turn ids in logs, debug recordings.

`InstrumentedEngine` is the engine with each model step timed and reported; the daemon loop
itself is not touched. `Telemetry` turns those reports and the daemon's counters and turn
records into Prometheus metrics (`assistant.observability`) and debug recordings.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import time
from typing import Any, Iterable, Sequence

import numpy as np

from assistant.debug_recording import DebugRecorder
from assistant.engine import Engine, EngineOptions
from assistant.observability import LATENCY_BUCKETS_S, STEP_BUCKETS_S, LogContext, Metrics, Sample

logger = logging.getLogger(__name__)

PREFIX = "freeze_omni"


class Telemetry:
    """Receives engine steps and daemon turn records; exposes them as metrics.

    Args:
        metrics: the registry /metrics renders.
        recorder: debug recorder, or None.
    """

    def __init__(self, metrics: Metrics, recorder: DebugRecorder | None = None) -> None:
        self.metrics = metrics
        self.recorder = recorder
        self.turn_latency = metrics.histogram(f"{PREFIX}_turn_latency_seconds",
                                              "Latency of each stage of an answered turn", LATENCY_BUCKETS_S,
                                              label="stage")
        self.step_time = metrics.histogram(f"{PREFIX}_model_step_seconds", "Time of one model step",
                                           STEP_BUCKETS_S, label="step")
        self.sessions_started = 0
        self.turns_started = 0
        self.session_id = "-"
        self._turn_in_session = 0
        self._records_seen = 0
        self.last_listen_s = 0.0

    # -- engine reports ----------------------------------------------------------------
    def session_started(self) -> None:
        if self.recorder is not None:
            self.recorder.flush()
        self.sessions_started += 1
        self.session_id = secrets.token_hex(3)
        self._turn_in_session = 0
        LogContext.session, LogContext.turn = self.session_id, "-"

    def turn_started(self) -> None:
        self.turns_started += 1
        self._turn_in_session += 1
        LogContext.turn = str(self._turn_in_session)
        if self.recorder is not None:
            self.recorder.turn_started(f"{self.session_id}-{self._turn_in_session:04d}")

    def listened(self, chunk: np.ndarray, probs: tuple[float, float, float], decision: str) -> None:
        self.last_listen_s = time.monotonic()
        if self.recorder is not None:
            self.recorder.listened(chunk, probs, decision)

    def answer_started(self) -> None:
        if self.recorder is not None:
            self.recorder.answer_started()

    def spoke(self, pieces: list[np.ndarray]) -> None:
        if self.recorder is not None:
            for pcm in pieces:
                self.recorder.spoke(pcm)

    def step(self, name: str, seconds: float) -> None:
        self.step_time.observe(seconds, name)

    # -- daemon reports ----------------------------------------------------------------
    def collect_turn_records(self, turn_log: Sequence[dict], turns_logged: int) -> None:
        """Observe the daemon's turn records that are new since the last call (loop thread).

        `turn_log` keeps only the latest records; `turns_logged` counts every one ever appended.
        """
        new = min(turns_logged - self._records_seen, len(turn_log))
        self._records_seen = turns_logged
        if new <= 0:  # the usual case: called on every daemon tick
            return
        for record in itertools.islice(reversed(turn_log), new):  # newest first: no walk over the rest
            for key, value in record.items():
                if key.endswith("_ms") and value is not None:
                    self.turn_latency.observe(value / 1000.0, key.removesuffix("_ms"))

    def flush_if_idle(self, idle: bool) -> None:
        """Write the debug recordings once nothing is heard or played for a second."""
        if self.recorder is not None and idle and time.monotonic() - self.last_listen_s > 1.0:
            self.recorder.flush()

    def daemon_collector(self, daemon: Any, audio: Any) -> None:
        """Register the daemon's and the audio stream's counters, read when /metrics is scraped."""
        self.metrics.collectors.append(lambda: self._daemon_samples(daemon, audio))

    def _daemon_samples(self, daemon: Any, audio: Any) -> Iterable[Sample]:
        for f in dataclasses.fields(daemon.counters):
            yield Sample(f"{PREFIX}_{f.name}_total", "counter", f"Daemon counter {f.name}",
                         getattr(daemon.counters, f.name))
        counters = getattr(audio, "counters", None)
        for name, value in (counters() if callable(counters) else {}).items():
            yield Sample(f"{PREFIX}_audio_{name}_total", "counter", f"Audio stream counter {name}", value)
        canceller = getattr(audio, "echo_canceller", None)
        erle = getattr(canceller, "echo_return_loss_enhancement_db", None)
        if erle is not None:
            yield Sample(f"{PREFIX}_aec_echo_return_loss_enhancement_db", "gauge",
                         "Microphone power over cancelled power while the speaker played (dB)", erle)
        yield Sample(f"{PREFIX}_sessions_started_total", "counter", "Dialogue sessions started",
                     self.sessions_started)
        yield Sample(f"{PREFIX}_sessions_active", "gauge", "Dialogue sessions held", 1)
        yield Sample(f"{PREFIX}_turns_started_total", "counter", "User turns heard by the model",
                     self.turns_started)


class InstrumentedEngine(Engine):
    """`Engine` whose steps are timed and reported to a `Telemetry` (same results)."""

    def __init__(self, models: Any, options: EngineOptions, telemetry: Telemetry) -> None:
        super().__init__(models, options)
        self.telemetry = telemetry

    def new_session(self, seed: int | None = None):
        self.telemetry.session_started()
        return super().new_session(seed)

    def listen_chunk(self, state, samples, follow_decision: bool = True):
        if state.turn_chunks == 0:
            self.telemetry.turn_started()
        start = time.perf_counter()
        result, state = super().listen_chunk(state, samples, follow_decision)
        self.telemetry.step("listen", time.perf_counter() - start)
        self.telemetry.listened(samples.numpy(), result.probs, result.decision.value)
        return result, state

    def start_speaking(self, state):
        self.telemetry.answer_started()
        return self._timed("start_speaking", super().start_speaking, state)

    def next_token(self, state):
        return self._timed("text_token", super().next_token, state)

    def start_segment(self, state, segment):
        return self._timed("segment_start", super().start_segment, state, segment)

    def speech_step(self, state):
        pieces, state = self._timed("speech_token", super().speech_step, state)
        if self.telemetry.recorder is not None:
            self.telemetry.spoke([p.float().cpu().numpy() for p in pieces])
        return pieces, state

    def _timed(self, name: str, step: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = step(*args)
        self.telemetry.step(name, time.perf_counter() - start)
        return out
