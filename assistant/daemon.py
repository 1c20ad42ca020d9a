"""The full-duplex main loop: listen, decide, answer, barge in.

Single-threaded and cooperative: every tick first reads the microphone and runs the listen
step (real-time work first), handles decisions — a barge-in is a priority control message
that flushes every queued audio block at once — and only then spends a bounded number of
work units on the answer, keeping at most `playback_lead_s` of audio queued ahead of the
speaker. Echo control runs in the audio port; the PyAudio callbacks live in `audio_io` and
only copy into queues.
"""
from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

import numpy as np

from assistant.conversation import ConversationLike
from assistant.daemon_config import DaemonSettings, TurnEnd
from assistant.dialogue import Decision
from quantized_models.llm import ContextFullError

logger = logging.getLogger(__name__)

MODEL_CHUNK_S = 0.16
"""Audio per listened chunk (the engine's 160 ms step)."""
OUTPUT_RATE_HZ = 24_000
TURN_LOG_KEEP = 1000
"""Latest turn records kept in memory (an always-on daemon must not grow without bound)."""


class AudioPort(Protocol):
    """What the daemon needs from the duplex audio stream (audio_io.duplex)."""

    healthy: bool

    def read_model_chunk(self, timeout_s: float) -> np.ndarray | None: ...
    def play(self, pcm_24k: np.ndarray) -> None: ...
    def flush_playback(self) -> int: ...
    def finish_playback(self) -> None: ...
    @property
    def played_samples_24k(self) -> int: ...
    @property
    def queued_samples_24k(self) -> int: ...
    @property
    def playing(self) -> bool:
        """Audio queued or still inside the device's output latency."""
        ...
    def reopen(self) -> bool: ...


class SpeechGate(Protocol):
    """Voice activity at model-chunk granularity: True while the user speaks."""

    def speech_started(self, chunk: np.ndarray) -> tuple[bool, bool]:
        """Feed one 160 ms chunk; returns (started, stopped) for this chunk."""
        ...

    @property
    def speech_ms(self) -> int:
        """Speech (not the gate's hangover) in the last chunk fed, in milliseconds."""
        ...


class BargeInPolicy(Protocol):
    """Whether the user may interrupt now. Echo control itself runs inside the audio port
    (before `read_model_chunk` returns), so the microphone signal needs nothing more here."""

    @property
    def allows_barge_in(self) -> bool: ...


class Clock(Protocol):
    def monotonic(self) -> float: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()


class Control(Enum):
    """Priority control messages: handled before any data work of the tick."""

    BARGE_IN = auto()


@dataclass
class TurnTimes:
    """Monotonic timestamps of one answered turn (seconds)."""

    user_end: float | None = None
    decision: float | None = None
    first_text_token: float | None = None
    first_speech_token: float | None = None
    first_pcm: float | None = None
    first_played: float | None = None
    barge_in: bool = False

    def latencies_ms(self) -> dict[str, float | None]:
        def gap(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round(1000.0 * (b - a), 1)

        return {
            "user_end_to_decision_ms": gap(self.user_end, self.decision),
            "decision_to_first_text_token_ms": gap(self.decision, self.first_text_token),
            "decision_to_first_speech_token_ms": gap(self.decision, self.first_speech_token),
            "decision_to_first_pcm_ms": gap(self.decision, self.first_pcm),
            "decision_to_first_played_ms": gap(self.decision, self.first_played),
        }


@dataclass
class DaemonCounters:
    turns_answered: int = 0
    turns_ignored: int = 0
    barge_ins: int = 0
    """Answers cut because the user was answered while they played."""
    interruptions_heard: int = 0
    """User turns that began while the assistant was speaking (or its echo could be heard)."""
    interruptions_answered: int = 0
    """Of those, turns the assistant answered (a barge-in decision, whether or not audio was left to cut)."""
    ignored_interruptions: int = 0
    device_losses: int = 0
    recoveries: int = 0
    """Dialogue steps that failed and were recovered from by starting afresh."""


@dataclass
class _Turn:
    """The user turn being listened to."""

    on_fork: bool
    """True: heard while the assistant speaks (barge-in candidate)."""
    stopped_at: float | None = None
    """VAD stop time, if the user has gone quiet."""
    speech_ms: int = 0
    """Chunks of this turn that held speech (the pre-roll and the VAD's hangover not counted)."""


class Daemon:
    """Drives one conversation from one duplex audio port."""

    def __init__(self, conversation: ConversationLike, audio: AudioPort, gate: SpeechGate,
                 barge_in: BargeInPolicy, settings: DaemonSettings, clock: Clock | None = None) -> None:
        self.conv, self.audio, self.gate, self.barge_in = conversation, audio, gate, barge_in
        self.settings = settings
        self.clock = clock or SystemClock()
        self.counters = DaemonCounters()
        preroll_chunks = -(-settings.vad.preroll_ms // int(MODEL_CHUNK_S * 1000))
        self._recent: deque[np.ndarray] = deque(maxlen=max(1, preroll_chunks))
        self._turn: _Turn | None = None
        self._held_start = False
        """The gate reported speech while barge-in was not allowed, and it has not stopped since."""
        self._controls: deque[Control] = deque()
        self._answer_times: TurnTimes | None = None
        self._answer_start_played = 0
        self._last_activity = self.clock.monotonic()
        self._last_reopen = 0.0
        self._audio_was_healthy = True
        self._playback_started_at: float | None = None
        self._last_playing_at: float | None = None
        self.turn_log: deque[dict] = deque(maxlen=TURN_LOG_KEEP)
        self.turns_logged = 0
        """Turn records ever appended (`turn_log` keeps only the latest)."""

    # -- main loop ------------------------------------------------------------------
    def run(self, should_stop) -> None:
        """Tick until `should_stop()` is true; a failing tick is logged and the dialogue restarted."""
        while not should_stop():
            try:
                self.tick()
            except ContextFullError as error:
                logger.warning("the LLM's context window is full (%s): starting a fresh dialogue", error)
                self._recover()
            except Exception:  # noqa: BLE001 - an always-on daemon must outlive one bad turn
                logger.exception("dialogue step failed; starting a fresh dialogue")
                self._recover()

    def _recover(self) -> None:
        self.counters.recoveries += 1
        self._turn, self._answer_times, self._held_start = None, None, False
        self._controls.clear()
        self.audio.flush_playback()
        self.conv.reset()

    def tick(self) -> None:
        if not self._audio_ok():
            return
        answering = self.conv.answering or self._speaker_busy()
        chunk = self.audio.read_model_chunk(timeout_s=0.0 if self.conv.answering else 0.05)
        if chunk is not None:
            self._on_mic_chunk(chunk, answering)
        self._handle_controls()
        self._check_silence_timeout()
        self._answer_work()
        self._mark_first_played()
        self._check_idle()

    # -- listening ------------------------------------------------------------------
    def _on_mic_chunk(self, chunk: np.ndarray, answering: bool) -> None:
        started, stopped = self.gate.speech_started(chunk)
        now = self.clock.monotonic()
        if self._turn is None and (started or (self._held_start and not stopped)):
            if answering and not self.barge_in.allows_barge_in:
                # Half duplex, or AEC not adapted yet: not a user turn yet. The gate reports a
                # start only once, so remember it: a user still talking when barge-in becomes
                # possible is heard then (with the pre-roll), not lost for the whole utterance.
                self._held_start, started = not stopped, False
            else:
                self._held_start = False
                self._open_turn(on_fork=answering)
        if stopped:
            self._held_start = False
        if self._turn is None:
            self._recent.append(chunk)
            return
        self._last_activity = now
        if started:  # the user went on after a pause: the same turn continues
            self._turn.stopped_at = None
        # The hangover before a VAD stop is not speech; nor is what is heard while AEC re-adapts
        # at the start of an answer (its residue comes in bursts of 100-300 ms).
        if not self._turn.on_fork or self._barge_in_allowed(now):
            self._turn.speech_ms += self.gate.speech_ms
        if stopped and self._turn.stopped_at is None:
            self._turn.stopped_at = now
            if self.settings.dialogue.turn_end is TurnEnd.VAD:
                self._feed(chunk, follow=False)
                self._respond(now)
                return
        follow = self.settings.dialogue.turn_end is TurnEnd.MODEL
        decision = self._feed(chunk, follow=follow)
        if follow:  # in `turn_end: vad` mode decisions are only reported
            self._decide(decision, now)

    def _open_turn(self, on_fork: bool) -> None:
        logger.info("user speech started%s", " while the assistant speaks" if on_fork else "")
        self._turn = _Turn(on_fork=on_fork)
        if on_fork:
            self.counters.interruptions_heard += 1
            self.conv.begin_barge_in()
        for old in self._recent:  # pre-roll: decisions ignored, as the official server does
            self._feed(old, follow=False)
        self._recent.clear()

    def _feed(self, chunk: np.ndarray, follow: bool) -> Decision:
        assert self._turn is not None
        if self._turn.on_fork:
            return self.conv.barge_in_listen(chunk, follow)
        return self.conv.listen(chunk, follow)

    def _decide(self, decision: Decision, now: float) -> None:
        if decision is Decision.RESPOND:
            self._respond(now)
        elif decision is Decision.IGNORE:
            self._ignore()

    def _speaker_busy(self) -> bool:
        """Our voice may still be in the room: audio queued, inside the device latency, or
        within the echo tail after it (capture and room delay)."""
        now = self.clock.monotonic()
        if self.audio.playing:
            self._last_playing_at = now
            return True
        tail_s = self.settings.echo.half_duplex_tail_ms / 1000.0
        return self._last_playing_at is not None and now - self._last_playing_at < tail_s

    def _barge_in_allowed(self, now: float) -> bool:
        """Echo control works and the current answer has played long enough for AEC to adapt."""
        if not self.barge_in.allows_barge_in:
            return False
        started = self._playback_started_at
        holdoff_s = self.settings.echo.aec_warmup_ms / 1000.0
        return started is None or now - started >= holdoff_s

    def _respond(self, now: float) -> None:
        assert self._turn is not None
        too_short = self._turn.speech_ms < self.settings.dialogue.min_barge_in_ms
        if self._turn.on_fork and (too_short or not self._barge_in_allowed(now)):
            # Residual echo comes in bursts of 20-100 ms, mostly while AEC re-adapts.
            logger.info("interruption too short or too early (%d ms of speech): ignored",
                        self._turn.speech_ms)
            self._ignore()
            return
        times = TurnTimes(user_end=self._turn.stopped_at or now, decision=now, barge_in=self._turn.on_fork)
        if self._turn.on_fork:
            if self.conv.answering or self.audio.playing:  # something to cut
                self._controls.appendleft(Control.BARGE_IN)
                self._handle_controls()
            self.conv.commit_barge_in(self._played_in_answer())
            self.counters.interruptions_answered += 1
        self._turn = None
        self.conv.start_answer()
        self._answer_times = times
        self._answer_start_played = self.audio.played_samples_24k + self.audio.queued_samples_24k
        self._playback_started_at = None
        self.counters.turns_answered += 1

    def _ignore(self) -> None:
        assert self._turn is not None
        if self._turn.on_fork:
            self.conv.drop_barge_in()
            self.counters.ignored_interruptions += 1
        self.counters.turns_ignored += 1
        self._turn = None

    def _check_silence_timeout(self) -> None:
        turn = self._turn
        if turn is None or turn.stopped_at is None:
            return
        if self.clock.monotonic() - turn.stopped_at < self.settings.dialogue.silence_end_s:
            return
        logger.info("user turn ended in silence without a decision; not answering")
        if turn.on_fork:
            self.conv.drop_barge_in()
        else:
            self.conv.close_ignored_turn()
        self.counters.turns_ignored += 1
        self._turn = None

    # -- control messages -------------------------------------------------------------
    def _handle_controls(self) -> None:
        while self._controls:
            control = self._controls.popleft()
            if control is Control.BARGE_IN:
                dropped = self.audio.flush_playback()
                self.counters.barge_ins += 1
                self._finish_turn_record()
                logger.info("barge-in: cut the answer, dropped %.2f s of queued audio",
                            dropped / OUTPUT_RATE_HZ)

    def _played_in_answer(self) -> int:
        return max(0, self.audio.played_samples_24k - self._answer_start_played)

    # -- answering --------------------------------------------------------------------
    def _answer_work(self) -> None:
        lead = int(self.settings.dialogue.playback_lead_s * OUTPUT_RATE_HZ)
        for _ in range(self.settings.dialogue.max_answer_steps_per_tick):
            if not self.conv.answering or self.audio.queued_samples_24k >= lead:
                return
            work = self.conv.answer_step()
            self._mark(work)
            for pcm in work.pcm:
                if pcm.size:
                    if self._playback_started_at is None:
                        self._playback_started_at = self.clock.monotonic()
                    self.audio.play(pcm)
            if work.done:
                self.audio.finish_playback()  # release the last partial block
                return

    def _mark(self, work) -> None:
        times, now = self._answer_times, self.clock.monotonic()
        if times is None:
            return
        if work.new_text_token and times.first_text_token is None:
            times.first_text_token = now
        if work.new_speech_token and times.first_speech_token is None:
            times.first_speech_token = now
        if any(p.size for p in work.pcm) and times.first_pcm is None:
            times.first_pcm = now

    def _mark_first_played(self) -> None:
        times = self._answer_times
        if times is None or times.first_played is not None:
            return
        if self._played_in_answer() > 0:
            times.first_played = self.clock.monotonic()
            self._finish_turn_record()

    def _finish_turn_record(self) -> None:
        times = self._answer_times
        if times is None:
            return
        record = {"barge_in": times.barge_in, **times.latencies_ms()}
        self.turn_log.append(record)
        self.turns_logged += 1
        logger.info("turn latencies: %s", record)
        if self.settings.events_path:
            with open(self.settings.events_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        self._answer_times = None

    def _on_device_lost(self) -> None:
        """A turn cannot go on without its audio: close it; an answer being played is cut."""
        if self._turn is not None:
            if self._turn.on_fork:
                self.conv.drop_barge_in()
            else:
                self.conv.close_ignored_turn()
            self._turn = None
        if self.conv.answering:
            self.conv.cut_answer(self._played_in_answer())
        self.audio.flush_playback()

    # -- housekeeping -------------------------------------------------------------------
    def _check_idle(self) -> None:
        idle_s = self.clock.monotonic() - self._last_activity
        if idle_s > self.settings.dialogue.idle_timeout_s and self._turn is None and not self.conv.answering:
            logger.info("no speech for %.0f s: starting a fresh dialogue", idle_s)
            self.conv.reset()
            self._last_activity = self.clock.monotonic()

    def _audio_ok(self) -> bool:
        if self.audio.healthy:
            self._audio_was_healthy = True
            return True
        if self._audio_was_healthy:  # report a loss once, not on every retry
            self._audio_was_healthy = False
            self.counters.device_losses += 1
            # the audio port has already warned, with the reason; one report per loss
            logger.info("audio device lost; looking for it every %.1f s",
                           self.settings.audio.reopen_interval_s)
            self._on_device_lost()
        now = self.clock.monotonic()
        if now - self._last_reopen >= self.settings.audio.reopen_interval_s:
            self._last_reopen = now
            if self.audio.reopen():
                logger.info("audio device is back")
                return True
        return False
