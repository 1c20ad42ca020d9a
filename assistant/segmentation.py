"""Cutting the streaming answer into speech segments, and the text clean-up before TTS.

Two official rule sets exist (spec §6.1): the offline driver `bin/inference.py` cuts at
sentence-final punctuation (`SegmentationRule.SENTENCE`); the demo server `bin/server.py` also
cuts at commas early in the answer and waits for at least four tokens (`SegmentationRule.EAGER`).

Both work on "deltas": the full decoded answer after a step minus as many leading characters as
the previous full decode had. Before the first loop step the previous decode is empty, so the
first delta covers the start-speaking token *and* the first loop token; the first token alone
never ends a segment (spec §14.2). Segment texts are raw; `normalize_tts_text` (spec §6.2) is
applied by the caller before re-tokenizing.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

import torch

logger = logging.getLogger(__name__)

SENTENCE_ENDINGS: Final = ("。", "：", "？", "！", ".", "?", "!", "\n")
"""Delta endings that close a segment under both rule sets."""
EAGER_COMMA_ENDINGS: Final = (",", "，", ":")
"""Extra endings the demo server accepts for the first segment or a long one."""
EAGER_MIN_HIDDEN_STATES: Final = 4
"""Demo server: a segment needs at least this many tokens."""
EAGER_COMMA_MIN_HIDDEN_STATES: Final = 20
"""Demo server: from this many tokens on, comma-class endings close any segment."""
REPLACEMENT_CHAR: Final = "\ufffd"


class SegmentationRule(Enum):
    """Which official driver's segmentation rules to follow."""

    SENTENCE = "sentence"
    """`bin/inference.py`: cut when a delta ends with sentence-final punctuation or a newline."""
    EAGER = "eager"
    """`bin/server.py`: skip deltas with U+FFFD, need >= 4 tokens, commas count early on."""


@dataclass
class Segment:
    """A piece of the answer to synthesize."""

    text: str
    """Raw decoded text of the segment (may be empty); normalise before re-tokenizing."""
    hidden_states: list[torch.Tensor]
    """One LLM hidden state per token of the segment, each [llm_dim], in generation order."""


@dataclass
class SegmenterState:
    """Streaming state of one answer's segmentation."""

    previous_text: str = ""
    """Full decode at the last step accounted for text; '' until the first loop step."""
    text: str = ""
    """Raw text of the open segment."""
    hidden_states: list[torch.Tensor] = field(default_factory=list)
    """Hidden states of the open segment, each [llm_dim]."""
    n_tokens: int = 0
    """Tokens pushed in this answer (the start-speaking token included)."""
    n_segments: int = 0
    """Segments emitted in this answer."""

    def reset(self) -> None:
        """Start a new answer."""
        self.previous_text = ""
        self.text = ""
        self.hidden_states = []
        self.n_tokens = 0
        self.n_segments = 0


class Segmenter:
    """Turns (full text, hidden state) per generated token into speech segments.

    Args:
        rule: The official rule set to reproduce.
        max_segment_tokens: Optional cap: a segment is closed once it holds this many tokens,
            whatever its text. None (the official behaviour) relies on the answer's token cap.
    """

    def __init__(self, rule: SegmentationRule, *, max_segment_tokens: int | None = None) -> None:
        if max_segment_tokens is not None and max_segment_tokens < 2:
            # The first token's text only arrives with the second one (spec §14.2).
            raise ValueError(f"max_segment_tokens must be >= 2 or None, got {max_segment_tokens}")
        self.rule = rule
        self.max_segment_tokens = max_segment_tokens
        self.state = SegmenterState()

    def reset(self) -> None:
        """Drop the open segment and start a new answer."""
        self.state.reset()

    def push(self, full_text: str, hidden: torch.Tensor) -> Segment | None:
        """Account one generated token.

        Args:
            full_text: The full decoded answer including this token.
            hidden: [llm_dim] hidden state that produced this token.

        Returns:
            The segment this token closes, or None.
        """
        state = self.state
        state.hidden_states.append(hidden)
        state.n_tokens += 1
        if state.n_tokens == 1:
            # The start-speaking token: its text is part of the next step's delta.
            return None
        delta = full_text[len(state.previous_text) :]
        if self.rule is SegmentationRule.EAGER and REPLACEMENT_CHAR in delta:
            # Incomplete character: the server waits; `previous_text` stays where it was. As in
            # the server, a U+FFFD that never completes (invalid bytes) stalls text accounting
            # for the rest of the answer; its tokens then all land in the final segment.
            return self._cap_reached()
        state.text += delta
        closes = self._closes(delta)
        state.previous_text = full_text
        return self._emit() if closes else self._cap_reached()

    def finish(self) -> Segment | None:
        """Close the answer: the open segment if it holds any token, then reset.

        The returned segment may have empty text (e.g. only a start-speaking token, or text
        held back by the eager rule); the caller decides whether to synthesize it.
        """
        segment = self._emit() if self.state.hidden_states else None
        self.state.reset()
        return segment

    def _closes(self, delta: str) -> bool:
        """Whether `delta` ends the open segment (called before `previous_text` advances)."""
        state = self.state
        n_hidden = len(state.hidden_states)
        endings = SENTENCE_ENDINGS
        if self.rule is SegmentationRule.EAGER:
            if n_hidden < EAGER_MIN_HIDDEN_STATES:
                return False
            # The server tests "no audio piece sent yet"; a segment always yields audio there
            # unless its decode is empty, so "no segment emitted yet" is the same in practice.
            if state.n_segments == 0 or n_hidden >= EAGER_COMMA_MIN_HIDDEN_STATES:
                endings = SENTENCE_ENDINGS + EAGER_COMMA_ENDINGS
        if not delta.endswith(endings):
            return False
        # "3." is probably a list number or a decimal, not a sentence end. The official code
        # crashes on an empty previous text here (spec §14.4); an empty text has no digit.
        previous = state.previous_text
        return not (delta.endswith(".") and previous[-1:].isdigit())

    def _cap_reached(self) -> Segment | None:
        cap = self.max_segment_tokens
        if cap is not None and len(self.state.hidden_states) >= cap:
            logger.debug("segment closed at the %d-token cap", cap)
            return self._emit()
        return None

    def _emit(self) -> Segment:
        state = self.state
        segment = Segment(text=state.text, hidden_states=state.hidden_states)
        state.text = ""
        state.hidden_states = []
        state.n_segments += 1
        return segment


# -- text normalisation before TTS (spec §6.2) -----------------------------------------------

_PUNCTUATION_MAP: Final = str.maketrans({"、": "，", "(": ",", ")": ",", "（": "，", "）": "，"})
_DELETED_CHARS: Final = re.compile(r"[\n\r\t*_`~]")
_SPACE_AFTER_DOT_OR_COLON: Final = re.compile(r"([.:])\s+")
_CJK_IDEOGRAPH: Final = re.compile(r"[\u4e00-\u9fa5]")
# Python's \d, \s and \w are Unicode-aware, like the official patterns.
_CJK_LIST_NUMBER: Final = re.compile(r"(\d+)\.\s*([\u4e00-\u9fa5A-Za-z])")
_LATIN_LIST_NUMBER: Final = re.compile(r"(\d+)\.\s*(\w)")
_FINAL_MARKS: Final = ("。", "？", "！", ".", "?", "!")
_REPLACED_FINAL_MARKS: Final = (",", "，", ";", "；", ":", "：", "、")


def normalize_tts_text(text: str) -> str:
    """The official `post_process`: make a raw segment text speakable (spec §6.2).

    Brackets become commas, newlines/tabs/markdown marks disappear, whitespace after "." and
    ":" is removed, list numbers "1. x" become "1：x" (CJK text) or "1:x", and the text is
    closed with "。" unless it already ends a sentence. Empty text stays empty.
    """
    text = text.translate(_PUNCTUATION_MAP)
    text = _DELETED_CHARS.sub("", text)
    text = _SPACE_AFTER_DOT_OR_COLON.sub(r"\1", text)
    if _CJK_IDEOGRAPH.search(text):
        text = _CJK_LIST_NUMBER.sub(r"\1：\2", text)
    else:
        text = _LATIN_LIST_NUMBER.sub(r"\1:\2", text)
    if not text or text.endswith(_FINAL_MARKS):
        return text
    if text.endswith(_REPLACED_FINAL_MARKS):
        return text[:-1] + "。"
    return text + "。"
