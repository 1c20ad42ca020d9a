"""Fakes for daemon tests: a clocked duplex device, a level-based speech gate, a scripted dialogue."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from assistant.conversation import AnswerWork
from assistant.dialogue import Decision
from quantized_models.llm import ContextFullError

CHUNK_SAMPLES = 2560
OUTPUT_RATE_HZ = 24_000
BLOCK_SAMPLES_24K = 480  # 20 ms output blocks
SPEECH_LEVEL = 0.3


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def speech_chunks(n: int) -> list[np.ndarray]:
    return [np.full(CHUNK_SAMPLES, SPEECH_LEVEL, dtype=np.float32) for _ in range(n)]


def silence_chunks(n: int) -> list[np.ndarray]:
    return [np.zeros(CHUNK_SAMPLES, dtype=np.float32) for _ in range(n)]


class FakeDuplex:
    """Microphone chunks arrive every 160 ms of fake time; the speaker drains in 20 ms blocks.

    Each `read_model_chunk` advances the clock by one chunk and plays 160 ms of queued audio
    block by block; `flush_playback` drops every queued block except the one being played.
    """

    def __init__(self, clock: FakeClock, mic: list[np.ndarray]) -> None:
        self.clock, self.mic = clock, list(mic)
        self.healthy = True
        self.queue: list[np.ndarray] = []
        self.played = 0
        self.played_log: list[tuple[float, int]] = []
        self.flushes: list[float] = []
        self.reopen_calls = 0
        self.fail_reopen_until = 0.0

    @property
    def played_samples_24k(self) -> int:
        return self.played

    @property
    def queued_samples_24k(self) -> int:
        return sum(len(q) for q in self.queue)

    @property
    def playing(self) -> bool:
        return bool(self.queue)

    def read_model_chunk(self, timeout_s: float) -> np.ndarray | None:
        self.clock.now += CHUNK_SAMPLES / 16000
        self._drain(CHUNK_SAMPLES * OUTPUT_RATE_HZ // 16000)
        return self.mic.pop(0) if self.mic else np.zeros(CHUNK_SAMPLES, dtype=np.float32)

    def _drain(self, samples: int) -> None:
        while samples > 0 and self.queue:
            block = self.queue[0][:BLOCK_SAMPLES_24K]
            self.queue[0] = self.queue[0][BLOCK_SAMPLES_24K:]
            if not len(self.queue[0]):
                self.queue.pop(0)
            self.played += len(block)
            self.played_log.append((self.clock.now, len(block)))
            samples -= BLOCK_SAMPLES_24K

    def play(self, pcm_24k: np.ndarray) -> None:
        for start in range(0, len(pcm_24k), BLOCK_SAMPLES_24K):
            self.queue.append(pcm_24k[start:start + BLOCK_SAMPLES_24K])

    def flush_playback(self) -> int:
        dropped = self.queued_samples_24k
        self.queue.clear()
        self.flushes.append(self.clock.now)
        return dropped

    def finish_playback(self) -> None:
        """Blocks here are queued whole; nothing is held back."""

    def reopen(self) -> bool:
        self.reopen_calls += 1
        if self.clock.now >= self.fail_reopen_until:
            self.healthy = True
        return self.healthy


class LevelGate:
    """Speech = mean |x| above a level; start after `start` chunks, stop after `stop` quiet chunks."""

    def __init__(self, start: int = 1, stop: int = 3, level: float = SPEECH_LEVEL / 2) -> None:
        self.start, self.stop, self.level = start, stop, level
        self.active, self.loud, self.quiet = False, 0, 0
        self.speech_ms = 0

    def speech_started(self, chunk: np.ndarray) -> tuple[bool, bool]:
        loud = float(np.abs(chunk).mean()) > self.level
        self.speech_ms = 160 if loud else 0
        self.loud = self.loud + 1 if loud else 0
        self.quiet = self.quiet + 1 if not loud else 0
        if not self.active and self.loud >= self.start:
            self.active = True
            return True, False
        if self.active and self.quiet >= self.stop:
            self.active = False
            return False, True
        return False, False


class BargeInAllowed:
    allows_barge_in = True


@dataclass
class ScriptedConversation:
    """Decides each user turn after a scripted number of followed chunks; answers with tones.

    `script[i] = (decision, after_chunks)` for the i-th user turn (main or barge-in).
    An answer is `text_tokens` text steps then `speech_tokens` speech steps of 600 samples.
    """

    script: list[tuple[Decision, int]]
    text_tokens: int = 3
    speech_tokens: int = 80
    calls: list[tuple] = field(default_factory=list)
    turn: int = 0
    followed: int = 0
    fed: list[int] = field(default_factory=list)
    overflow_on_listen: int | None = None
    """The n-th `listen` call (0-based) raises `ContextFullError`, as a full LLM would."""
    _answer_left: list[str] = field(default_factory=list)
    _listens: int = 0

    def _step_turn(self, follow: bool) -> Decision:
        if self.turn >= len(self.script):
            return Decision.CONTINUE
        if follow:
            self.followed += 1
        decision, after = self.script[self.turn]
        if follow and self.followed >= after:
            self.turn += 1
            self.followed = 0
            return decision
        return Decision.CONTINUE

    def listen(self, chunk, follow_decision: bool) -> Decision:
        self._listens += 1
        if self._listens - 1 == self.overflow_on_listen:
            raise ContextFullError("dialogue needs 8193 positions but the LLM holds 8192")
        self.calls.append(("listen", follow_decision))
        return self._step_turn(follow_decision)

    def close_ignored_turn(self) -> None:
        self.calls.append(("close_ignored_turn",))
        self.turn += 1
        self.followed = 0

    def start_answer(self) -> None:
        self.calls.append(("start_answer",))
        self._answer_left = ["text"] * self.text_tokens + ["speech"] * self.speech_tokens

    @property
    def answering(self) -> bool:
        return bool(self._answer_left)

    def answer_step(self) -> AnswerWork:
        kind = self._answer_left.pop(0)
        work = AnswerWork(new_text_token=kind == "text", new_speech_token=kind == "speech")
        if kind == "speech":
            work.pcm = [np.full(600, 0.1, dtype=np.float32)]
        work.done = not self._answer_left
        return work

    def begin_barge_in(self) -> None:
        self.calls.append(("begin_barge_in",))

    def barge_in_listen(self, chunk, follow_decision: bool) -> Decision:
        self.calls.append(("barge_in_listen", follow_decision))
        return self._step_turn(follow_decision)

    def commit_barge_in(self, played_samples: int) -> None:
        self.calls.append(("commit_barge_in", played_samples))
        self._answer_left = []

    def drop_barge_in(self) -> None:
        self.calls.append(("drop_barge_in",))

    def cut_answer(self, played_samples: int) -> None:
        self.calls.append(("cut_answer", played_samples))
        self._answer_left = []

    def reset(self) -> None:
        self.calls.append(("reset",))

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]
