"""One remote dialogue as scheduled work: audio in, answer steps out, events to the client.

A `VoiceSession` owns a `Conversation` (and with it the session's `SessionState`) and an inbox
of client input. It never runs a model step on its own: the `Scheduler` asks `pending()` what
could run now and calls `run_step()` on an executor. Output (state changes, text, 24 kHz PCM)
goes to `send`, a thread-safe callable supplied by the server (a bounded queue per client).

Turn ends: `model` (the state head decides) or `client` (the client says `turn-end`, e.g. from
its own VAD). Audio heard while the assistant speaks is a barge-in candidate: it is listened to
on a fork of the session; an answer decision (or a client `turn-end`) cuts the answer at what
the client has played and answers the interruption.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, ContextManager

import numpy as np

from assistant.conversation import Conversation
from assistant.dialogue import Decision
from assistant.scheduler import Clock, Pending, SystemClock, WorkKind

logger = logging.getLogger(__name__)

OUTPUT_RATE_HZ = 24_000
OUT_FRAME_SAMPLES = 4_800
"""Largest PCM payload sent in one audio event (200 ms at 24 kHz)."""

ANSWERS_KEPT = 8
"""Records of the last answers a session keeps (an always-on session must not grow)."""
UNDERRUN_GAP_S = 0.02
"""A pause in the answer audio longer than this (the client had nothing to play) is an underrun."""

Send = Callable[[str, dict, bytes], None]


class TurnEndMode(Enum):
    MODEL = "model"
    """The state head ends the user turn (released checkpoints)."""
    CLIENT = "client"
    """The client ends it with a `turn-end` event (its own VAD or push-to-talk)."""


@dataclass(frozen=True)
class VoiceSessionSettings:
    turn_end: TurnEndMode = TurnEndMode.MODEL
    max_lead_s: float = 2.0
    """Generation runs ahead of the client's playback by at most this much audio (seconds)."""
    inbox_chunks: int = 64
    """Unheard 160 ms chunks buffered at most (10 s); more is a client sending too fast."""
    min_barge_in_chunks: int = 3
    """`turn_end: model`: an interruption answered after fewer chunks than this is ignored (480 ms)."""
    seed: int | None = None
    role: str | None = None


_TURN_END = object()  # inbox marker: the client ended the user turn here


@dataclass
class _Playback:
    """Where the client's playback of the current answer stands (estimated from what was sent)."""

    sent_samples: int = 0
    started_at_s: float | None = None
    underruns: int = 0
    """Times the client's buffer ran dry for more than `UNDERRUN_GAP_S` before more audio came."""
    reported_samples: int | None = None
    """Samples the client says it has played (its `played` events), when it reports them."""

    def lead_s(self, now_s: float) -> float:
        if self.started_at_s is None:
            return 0.0
        return max(0.0, self.sent_samples / OUTPUT_RATE_HZ - (now_s - self.started_at_s))

    def on_sent(self, samples: int, now_s: float) -> None:
        if self.started_at_s is not None:
            starved_s = (now_s - self.started_at_s) - self.sent_samples / OUTPUT_RATE_HZ
            self.underruns += int(starved_s > UNDERRUN_GAP_S)
        if self.started_at_s is None or self.lead_s(now_s) <= 0.0:
            # nothing queued at the client: its playback (re)starts with this audio
            self.started_at_s = now_s - self.sent_samples / OUTPUT_RATE_HZ
        self.sent_samples += samples

    def played(self, now_s: float) -> int:
        if self.reported_samples is not None:
            return min(self.reported_samples, self.sent_samples)
        if self.started_at_s is None:
            return 0
        return min(self.sent_samples, int((now_s - self.started_at_s) * OUTPUT_RATE_HZ))


@dataclass
class AnswerRecord:
    """What one answer was: the parity tests compare these between concurrent and lone runs."""

    tokens: list[int] = field(default_factory=list)
    codec_tokens: list[int] = field(default_factory=list)
    text: str = ""
    reason: str = ""


class VoiceSession:
    """A `Schedulable` dialogue fed by a network client."""

    def __init__(self, session_id: str, conversation: Conversation, send: Send,
                 settings: VoiceSessionSettings, clock: Clock | None = None,
                 on_close: Callable[[str], None] | None = None,
                 wake: Callable[[], None] | None = None) -> None:
        self.session_id = session_id
        self.conv = conversation
        self.settings = settings
        self.clock = clock or SystemClock()
        self._send, self._on_close, self._wake = send, on_close, wake or (lambda: None)
        self._lock = threading.Lock()
        self._inbox: deque[tuple[object, float]] = deque()
        self._answer_requested = False
        self._answering = False
        self._forked = False
        self._fork_chunks = 0
        self._playback = _Playback()
        self._record = AnswerRecord()
        self._speech_seen: tuple[int, int] = (0, 0)
        self._last_activity = self.clock.monotonic()
        self.closed_reason: str | None = None
        self.answers: deque[AnswerRecord] = deque(maxlen=ANSWERS_KEPT)
        self.dropped_chunks = 0

    @property
    def underruns(self) -> int:
        """Underruns of the current (or last) answer, as the client would have heard them."""
        return self._playback.underruns

    @property
    def working_for_client(self) -> bool:
        """Input not yet heard, or an answer requested or under way: the client may rightly wait
        for us in silence, so its connection is not idle (a bool read, safe from any thread)."""
        return bool(self._inbox) or self._answer_requested or self._answering

    # -- client input (any thread) ------------------------------------------------------
    def push_audio(self, chunk: np.ndarray) -> None:
        """One 160 ms chunk of 16 kHz float audio."""
        with self._lock:
            self._touch()
            if len(self._inbox) >= self.settings.inbox_chunks:
                self._inbox.popleft()
                self.dropped_chunks += 1
                if self.dropped_chunks == 1:  # once: a client sending faster than real time
                    logger.warning("session %s: audio arrives faster than it is heard; dropping the oldest",
                                   self.session_id)
            self._inbox.append((chunk, self.clock.monotonic()))
        self._wake()

    def push_turn_end(self) -> None:
        with self._lock:
            self._touch()
            self._inbox.append((_TURN_END, self.clock.monotonic()))
        self._wake()

    def report_played(self, samples: int) -> None:
        with self._lock:
            self._touch()
            self._playback.reported_samples = max(0, int(samples))

    def _touch(self) -> None:
        self._last_activity = self.clock.monotonic()

    # -- Schedulable ----------------------------------------------------------------------
    def last_activity_s(self) -> float:
        return self._last_activity

    def pending(self, now_s: float) -> Pending | None:
        with self._lock:
            if self.closed_reason is not None:
                return None
            if self._answer_requested:
                # the answer starts before this session hears more: later audio is a barge-in
                # candidate against that answer (a fork needs an answer to cut)
                return Pending(WorkKind.GENERATE, lead_s=0.0)
            if self._inbox:
                return Pending(WorkKind.LISTEN, since_s=self._inbox[0][1])
            if self._answering:
                lead = self._playback.lead_s(now_s)
                if lead < self.settings.max_lead_s:
                    return Pending(WorkKind.GENERATE, lead_s=lead)
            return None

    def run_step(self, kind: WorkKind) -> None:
        if kind is WorkKind.LISTEN:
            with self._lock:
                item, _ = self._inbox.popleft()
            self._listen(item)
        else:
            self._generate()

    def close(self, reason: str) -> None:
        with self._lock:
            if self.closed_reason is not None:
                return
            self.closed_reason = reason
            self._inbox.clear()
        logger.info("session %s ended: %s", self.session_id, reason)
        if self._on_close is not None:
            self._on_close(reason)

    # -- steps ------------------------------------------------------------------------------
    def _listen(self, item: object) -> None:
        speaking = self._answering or self._answer_requested or self._forked
        if item is _TURN_END:
            if speaking:
                if self._forked:
                    self._barge_in()
            elif self.conv.state.turn_chunks > 0:
                self._end_user_turn("client")
            else:
                logger.debug("session %s: turn-end without audio ignored", self.session_id)
            return
        follow = self.settings.turn_end is TurnEndMode.MODEL
        if speaking:
            if not self._forked:
                self.conv.begin_barge_in()
                self._forked, self._fork_chunks = True, 0
            decision = self.conv.barge_in_listen(item, follow)
            self._fork_chunks += 1
            long_enough = self._fork_chunks >= self.settings.min_barge_in_chunks
            if follow and decision is Decision.RESPOND and long_enough:
                self._barge_in()
            elif follow and decision is not Decision.CONTINUE:
                # ignored, or too short to be an interruption (a cough, a burst of echo): keep its
                # words for the context, as the daemon does, and let the answer go on
                self.conv.drop_barge_in()
                self._forked = False
            return
        decision = self.conv.listen(item, follow)
        if follow and decision is Decision.RESPOND:
            self._end_user_turn("model")
        elif follow and decision is Decision.IGNORE:
            self._emit("user-turn-ended", {"decision": "ignore"})
            self._emit("listening", {})

    def _end_user_turn(self, by: str) -> None:
        self._emit("user-turn-ended", {"decision": "respond", "by": by})
        self._answer_requested = True

    def _barge_in(self) -> None:
        played = self._playback.played(self.clock.monotonic())
        self.conv.commit_barge_in(played)
        self._forked = False
        if self._answering:
            self._finish_record("interrupted")
        self._answering = False
        self._emit("interrupted", {"played_samples": played})
        self._end_user_turn("barge-in")

    def _generate(self) -> None:
        if self._answer_requested:
            self._answer_requested = False
            self._answering = True
            self._playback = _Playback()
            self._record = AnswerRecord()
            self._speech_seen = (0, 0)
            self.conv.start_answer()
            self._emit("speaking", {})
            self._after_text_step()
            return
        if not self._answering:
            return
        work = self.conv.answer_step()
        if work.new_text_token:
            self._after_text_step()
        if work.new_speech_token:
            self._collect_codec_tokens()
        for pcm in work.pcm:
            self._send_pcm(pcm)
        if work.done:
            self._answering = False
            answer = self.conv.state.answer
            self._finish_record(answer.end_reason if answer is not None else "")
            self._emit("answer-done", {
                "text": self._record.text, "tokens": self._record.tokens,
                "codec_tokens": self._record.codec_tokens, "reason": self._record.reason,
                "audio_samples": self._playback.sent_samples,
            })
            self._emit("listening", {})

    def _after_text_step(self) -> None:
        answer = self.conv.state.answer
        if answer is None:
            return
        if len(answer.tokens) > len(self._record.tokens):
            self._record.tokens = list(answer.tokens)
            self._emit("text", {"text": answer.detokenizer.text, "token": answer.tokens[-1]})

    def _collect_codec_tokens(self) -> None:
        speech = self.conv.state.speech
        if speech is None:
            return
        ident, seen = self._speech_seen
        if ident != id(speech):
            seen = 0
        self._record.codec_tokens.extend(speech.codec_tokens[seen:])
        self._speech_seen = (id(speech), len(speech.codec_tokens))

    def _finish_record(self, reason: str) -> None:
        answer = self.conv.state.answer
        self._record.reason = reason
        if answer is not None:
            self._record.text = answer.detokenizer.text
        self.answers.append(self._record)

    def _send_pcm(self, pcm: np.ndarray) -> None:
        ints = (np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2")
        for start in range(0, len(ints), OUT_FRAME_SAMPLES):
            part = ints[start:start + OUT_FRAME_SAMPLES]
            self._playback.on_sent(len(part), self.clock.monotonic())
            self._emit("audio-chunk", {"rate": OUTPUT_RATE_HZ, "width": 2, "channels": 1}, part.tobytes())

    def _emit(self, kind: str, data: dict, payload: bytes = b"") -> None:
        with self._lock:
            self._touch()
        self._send(kind, data, payload)


def device_stream_context(device) -> Callable[[], ContextManager]:
    """Executor context: on CUDA each executor thread issues its work on its own stream."""
    import torch

    if getattr(device, "type", "cpu") == "cpu" or not torch.cuda.is_available():
        return contextlib.nullcontext

    def context() -> ContextManager:
        return torch.cuda.stream(torch.cuda.Stream(device))

    return context
