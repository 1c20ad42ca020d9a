"""The daemon as a service: signals, systemd notifications, health, SIGTERM drain and SIGHUP reload.

`ServiceLoop.should_stop` is the callback `Daemon.run` calls before every tick, so all of
this runs in the loop's own thread: signal handlers only set flags, and the watchdog is
pinged only by a loop that is still turning (and not failing step after step).
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from assistant.config import LIVE_KEYS, AssistantConfig, ConfigError, changed_keys, with_live_values
from assistant.debug_recording import DebugRecorder
from assistant.dialogue import DecisionThresholds
from assistant.observability import Health
from assistant.sd_notify import Notifier
from assistant.telemetry import Telemetry

logger = logging.getLogger(__name__)

FAILURE_WINDOW_S = 10.0  # this many seconds ...
MAX_FAILURES_IN_WINDOW = 5  # ... with this many failed dialogue steps: stop feeding the watchdog
NO_DEVICE_PAUSE_S = 0.05  # the daemon's tick returns at once while the device is gone: don't spin
PLAYOUT_POLL_S = 0.02


class ServiceLoop:
    """Lifecycle around one `Daemon`.

    Args:
        daemon: the running `assistant.daemon.Daemon`.
        config: the configuration it was built from.
        notifier, health, telemetry: where state is reported.
        reload_config: re-reads every layer (SIGHUP); None disables reloading.
        debug_logging: `--debug` was given (a reloaded log level does not lower it).
    """

    def __init__(self, daemon: Any, config: AssistantConfig, notifier: Notifier, health: Health,
                 telemetry: Telemetry, reload_config: Callable[[], AssistantConfig] | None = None,
                 debug_logging: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.daemon, self.audio, self.config = daemon, daemon.audio, config
        self.notifier, self.health, self.telemetry = notifier, health, telemetry
        self.reload_config, self.debug_logging, self.clock = reload_config, debug_logging, clock
        self.stop_requested = False
        self._reload_requested = False
        self._drain_deadline: float | None = None
        self._drain_segment: Any = None
        self._failures: deque[float] = deque()
        self._recoveries_seen = daemon.counters.recoveries
        self._last_ping = float("-inf")
        self._last_status = float("-inf")
        self._status_word = ""

    # -- signals (handlers only set flags) -------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    def request_stop(self, signum: int = signal.SIGTERM, _frame: object = None) -> None:
        self.stop_requested = True

    def request_reload(self, signum: int = signal.SIGHUP, _frame: object = None) -> None:
        self._reload_requested = True

    # -- the per-tick callback ---------------------------------------------------------------
    def should_stop(self) -> bool:
        now = self.clock()
        if self._reload_requested:
            self._reload_requested = False
            self._reload()
        self.telemetry.collect_turn_records(self.daemon.turn_log, self.daemon.turns_logged)
        audio_ok = self.audio.healthy
        self.telemetry.flush_if_idle(not self._busy())
        loop_ok = self._loop_healthy(now)
        self._report(now, audio_ok, loop_ok)
        watchdog_due = self.notifier.watchdog_enabled and \
            now - self._last_ping >= self.notifier.watchdog_interval_s
        if loop_ok and watchdog_due:
            self.notifier.watchdog()
            self._last_ping = now
        if self.stop_requested:
            return self._drained(now)
        if not audio_ok:
            time.sleep(NO_DEVICE_PAUSE_S)
        return False

    def _busy(self) -> bool:
        return bool(self.daemon.conv.answering or self.audio.playing)

    def _loop_healthy(self, now: float) -> bool:
        """False while dialogue steps keep failing: a restart by the watchdog may help."""
        recoveries = self.daemon.counters.recoveries
        self._failures.extend([now] * (recoveries - self._recoveries_seen))
        self._recoveries_seen = recoveries
        while self._failures and now - self._failures[0] > FAILURE_WINDOW_S:
            self._failures.popleft()
        return len(self._failures) < MAX_FAILURES_IN_WINDOW

    def _report(self, now: float, audio_ok: bool, loop_ok: bool) -> None:
        if self.stop_requested:
            state, reason, word = "stopping", "SIGTERM: finishing the phrase being played", "stopping"
        elif not audio_ok:
            state, reason = "degraded", "no audio device (lost or unplugged); retrying"
            word = "no audio device; retrying"
        elif not loop_ok:
            state, reason, word = "degraded", "dialogue steps keep failing", "dialogue steps failing"
        else:
            state, reason, word = "ready", "", "answering" if self._busy() else "listening"
        if self.health.set(state, reason) and state == "degraded":
            logger.warning("health: degraded (%s)", reason)
        interval = self.config.observability.status_interval_s
        if word != self._status_word or now - self._last_status >= interval:
            counters = self.daemon.counters
            self.notifier.status(f"{word}; {counters.turns_answered} answered, "
                                 f"{counters.turns_ignored} ignored, {counters.barge_ins} barge-ins")
            self._status_word, self._last_status = word, now

    # -- SIGTERM: drain ----------------------------------------------------------------------
    def _drained(self, now: float) -> bool:
        """True once the loop may end: the phrase playing at SIGTERM is fully generated."""
        if self._drain_deadline is None:
            logger.info("stopping: finishing the phrase being played (at most %.1f s)",
                        self.config.server.drain_timeout_s)
            self.notifier.stopping("stopping")
            self._drain_deadline = now + self.config.server.drain_timeout_s
            self._drain_segment = self._current_segment()
            if self._drain_segment is None:  # nothing being synthesised: what is queued plays out
                return True
        segment = self._current_segment()
        finished = segment is not self._drain_segment or getattr(segment, "done", True)
        return finished or not self.daemon.conv.answering or now >= self._drain_deadline

    def _current_segment(self) -> Any:
        state = getattr(self.daemon.conv, "state", None)
        return getattr(state, "speech", None) if self.daemon.conv.answering else None

    def finish(self) -> None:
        """After the loop: let queued audio reach the speaker (bounded), write recordings."""
        deadline = self._drain_deadline if self._drain_deadline is not None else self.clock()
        if self.audio.healthy:
            self.audio.finish_playback()
            while self.audio.playing and self.clock() < deadline:
                time.sleep(PLAYOUT_POLL_S)
        if self.telemetry.recorder is not None:
            self.telemetry.recorder.flush()
        self.notifier.stopping("stopped")

    # -- SIGHUP: reload ----------------------------------------------------------------------
    def _reload(self) -> None:
        if self.reload_config is None:
            return
        self.notifier.reloading(time.monotonic_ns() // 1000)
        try:
            new = self.reload_config()
        except ConfigError as err:
            logger.error("reload refused, configuration unchanged: %s", err)
            self.notifier.ready("reload refused: configuration unchanged")
            return
        changed = changed_keys(self.config, new)
        later = [key for key in changed if key not in LIVE_KEYS]
        if later:
            logger.warning("reload: %s change only after a restart", ", ".join(later))
        self.apply(with_live_values(self.config, new))
        logger.info("reload: applied %s", ", ".join(k for k in changed if k in LIVE_KEYS) or "nothing new")
        self.notifier.ready("reloaded")

    def apply(self, config: AssistantConfig) -> None:
        """Make the live fields of `config` effective in the running daemon."""
        self.config = config
        self.daemon.settings = config.daemon_settings()
        engine = getattr(self.daemon.conv, "engine", None)
        dialogue = config.dialogue
        thresholds = DecisionThresholds(ignore_probability=dialogue.ignore_probability,
                                        respond_probability=dialogue.respond_probability)
        if engine is not None:
            engine.options = dataclasses.replace(engine.options, thresholds=thresholds)
        if not self.debug_logging:
            logging.getLogger().setLevel(config.observability.log_level.upper())
        wanted = config.observability.debug_recording_dir
        directory = None if wanted is None else Path(wanted).expanduser()
        recorder = self.telemetry.recorder
        if recorder is not None and recorder.directory != directory:
            recorder.flush()
            self.telemetry.recorder = None
        if directory is not None and self.telemetry.recorder is None:
            self.telemetry.recorder = DebugRecorder(directory, (thresholds.respond_probability,
                                                                thresholds.ignore_probability))
