"""One spoken dialogue as the daemon sees it: listen, answer in small work units, barge in.

`Conversation` wraps the engine's step functions and the barge-in helpers around one
`SessionState`. The daemon only talks to the `ConversationLike` protocol, so its
turn-taking logic is tested with a scripted fake on a fake clock.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from assistant import barge_in
from assistant.dialogue import Decision, DialogueState, Event, next_state
from assistant.engine import Engine
from assistant.segmentation import Segment
from assistant.session import SessionState

logger = logging.getLogger(__name__)

ANSWER_FRAME_POSITIONS = 16
"""Chat-template positions around an answer (assistant suffix, end of turn), with room to spare."""


@dataclass
class AnswerWork:
    """What one answer work unit produced."""

    pcm: list[np.ndarray] = field(default_factory=list)
    """24 kHz float pieces ready to play."""
    new_text_token: bool = False
    new_speech_token: bool = False
    done: bool = False
    """The answer is complete: all its audio has been produced."""


class ConversationLike(Protocol):
    def listen(self, chunk: np.ndarray, follow_decision: bool) -> Decision: ...
    def close_ignored_turn(self) -> None: ...
    def start_answer(self) -> None: ...
    def answer_step(self) -> AnswerWork: ...
    @property
    def answering(self) -> bool: ...
    def begin_barge_in(self) -> None: ...
    def barge_in_listen(self, chunk: np.ndarray, follow_decision: bool) -> Decision: ...
    def commit_barge_in(self, played_samples: int) -> None: ...
    def drop_barge_in(self) -> None: ...
    def cut_answer(self, played_samples: int) -> None: ...
    def reset(self) -> None: ...


class Conversation:
    """The real dialogue over an `Engine`."""

    def __init__(self, engine: Engine, seed: int | None = None, role: str | None = None) -> None:
        self.engine = engine
        self._seed, self._role = seed, role
        self.state = self._fresh()
        self.fork: SessionState | None = None
        self._segments: deque[Segment] = deque()
        self._positions_per_chunk = 1
        """Most LLM positions one listened chunk took so far, a turn's first chunk left out."""
        self._first_chunk_positions = 1
        """Most positions a turn's first chunk took (it adds the user turn's opening)."""

    def _fresh(self) -> SessionState:
        return self.engine.prefill_system(self.engine.new_session(self._seed), self._role)

    def reset(self) -> None:
        """Forget the dialogue (idle timeout, full context)."""
        self.state, self.fork = self._fresh(), None
        self._segments.clear()

    def context_nearly_full(self) -> bool:
        """Would the longest user turn and the longest answer overflow the LLM's context?

        Asked when a user turn opens, so a long dialogue starts afresh between turns instead of
        failing in the middle of one when the LLM's context window is full. The longest turn is
        the engine's `max_user_turn_chunks` (it answers then), at the most positions a chunk took;
        the longest answer is `max_new_tokens`.
        """
        options = self.engine.options
        needed = self._first_chunk_positions + (options.max_user_turn_chunks - 1) * self._positions_per_chunk
        needed += options.max_new_tokens + ANSWER_FRAME_POSITIONS
        left = self.engine.models.llm.max_context_tokens - self.state.llm.seq_length
        return needed > left

    # -- listening ----------------------------------------------------------------
    def listen(self, chunk: np.ndarray, follow_decision: bool) -> Decision:
        """One chunk of the main user turn; a turn opening on a nearly full context starts afresh.

        Only here: an interruption (`barge_in_listen`) is never cut off from the answer it
        interrupts.
        """
        if self.state.turn_chunks == 0 and self.context_nearly_full():
            logger.info("the dialogue nearly fills the LLM's context window: starting a fresh dialogue")
            self.reset()
        self.state = barge_in.flush_pending_turns(self.engine, self.state)
        before, first_of_turn = self.state.llm.seq_length, self.state.turn_chunks == 0
        result, self.state = self.engine.listen_chunk(self.state, torch.from_numpy(chunk), follow_decision)
        grew = self.state.llm.seq_length - before
        if first_of_turn:
            self._first_chunk_positions = max(self._first_chunk_positions, grew)
        else:
            self._positions_per_chunk = max(self._positions_per_chunk, grew)
        return result.decision

    def close_ignored_turn(self) -> None:
        """Close a turn that ended without a model decision; its words stay in the context."""
        if self.state.dialogue is DialogueState.LISTENING:
            self.state.dialogue = next_state(self.state.dialogue, Event.MODEL_IGNORE)
            self.state.turn_chunks = 0

    # -- answering ----------------------------------------------------------------
    def start_answer(self) -> None:
        """Answer the user turn (after a respond decision, or when the caller ends the turn)."""
        self._segments.clear()
        token, self.state = self.engine.start_speaking(self.state)
        self._segments.extend(token.segments)

    @property
    def answering(self) -> bool:
        answer, speech = self.state.answer, self.state.speech
        if answer is None:
            return False
        return not answer.finished or bool(self._segments) or (speech is not None and not speech.done)

    def answer_step(self) -> AnswerWork:
        """One unit of work: a speech-decoder step, a segment start, or a text token."""
        work = AnswerWork()
        speech = self.state.speech
        if speech is not None and not speech.done:
            pieces, self.state = self.engine.speech_step(self.state)
            work.pcm = [p.float().cpu().numpy() for p in pieces]
            work.new_speech_token = True
        elif self._segments:
            self.state = self.engine.start_segment(self.state, self._segments.popleft())
        elif self.state.answer is not None and not self.state.answer.finished:
            token, self.state = self.engine.next_token(self.state)
            self._segments.extend(token.segments)
            work.new_text_token = token.token_id is not None
        work.done = not self.answering
        return work

    def cut_answer(self, played_samples: int) -> None:
        self._segments.clear()
        self.state = barge_in.cut_answer(self.engine, self.state, played_samples)

    # -- barge-in -----------------------------------------------------------------
    def begin_barge_in(self) -> None:
        self.fork = barge_in.fork_listener(self.state)

    def barge_in_listen(self, chunk: np.ndarray, follow_decision: bool) -> Decision:
        assert self.fork is not None, "begin_barge_in first"
        result, self.fork = self.engine.listen_chunk(self.fork, torch.from_numpy(chunk), follow_decision)
        return result.decision

    def commit_barge_in(self, played_samples: int) -> None:
        assert self.fork is not None, "begin_barge_in first"
        self._segments.clear()
        self.state = barge_in.commit_barge_in(self.engine, self.state, self.fork, played_samples)
        self.fork = None

    def drop_barge_in(self) -> None:
        """The interruption was ignored (or ended without a decision): keep its words for later."""
        if self.fork is not None:
            barge_in.keep_ignored_turn(self.state, self.fork)
            self.fork = None
