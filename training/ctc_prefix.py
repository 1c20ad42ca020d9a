"""CTC prefix scores of partial transcripts, for decoding the frozen LLM jointly with a CTC head.

The LLM writes a transcript token by token; a character CTC head on the speech encoder's frames
says how well the audio supports each prefix (hybrid CTC/attention decoding, Watanabe et al.
2017). A prefix's score is log P(the frames begin with it): the sum over every CTC path whose
collapsed label sequence starts with the prefix. It only falls as the prefix grows, and the
score of a finished transcript (every frame accounted for) is below its prefix score, so a beam
that adds it to the LLM's log-probability may still stop once no live hypothesis can win.

Text enters as the LLM's token pieces, normalised as the CTC targets are (`CharVocab.encode`:
lower case, punctuation acts as a space, spaces collapsed and never leading): a space is held
back until the next kept character, so "Hello, world." scores as "hello world". A letter the
head has no symbol for ("ß"), or a byte token's "\ufffd", makes a piece impossible rather than free.

The recursions over frames are first-order linear in probability space, so each is solved for
all frames at once with a cumulative log-sum-exp (float64: the cumulative sums reach thousands).
"""
from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from training.features import CharVocab

SPACE = " "
LOG_PROB_FLOOR = -1e4


@dataclass(frozen=True)
class CtcPrefix:
    """One partial transcript's CTC state."""

    text: str
    """Normalised characters scored so far (never ends with a space)."""
    space_pending: bool
    """A separator came after `text`; it is scored with the next kept character."""
    log_nonblank: Tensor
    """[T] log P(frames 0..t emit `text`, frame t on its last character)."""
    log_blank: Tensor
    """[T] log P(frames 0..t emit `text`, frame t blank)."""
    score: float
    """log P(the frames' labelling begins with `text`)."""


class CtcPrefixScorer:
    """Prefix scores over one utterance's CTC log-probabilities [T, V] (blank = `CharVocab.BLANK`)."""

    def __init__(self, log_probs: Tensor, vocab: CharVocab | None = None) -> None:
        if log_probs.dim() != 2 or log_probs.shape[0] < 1:
            raise ValueError("CTC log-probabilities must be [frames >= 1, symbols], "
                             f"not {tuple(log_probs.shape)}")
        self.vocab = vocab or CharVocab()
        if log_probs.shape[1] != len(self.vocab):
            raise ValueError(f"the CTC head has {log_probs.shape[1]} symbols, "
                             f"the vocabulary {len(self.vocab)}")
        # Clamped: a -inf (a float16 underflow) would make the recursions' differences NaN.
        self.log_probs = log_probs.detach().to("cpu", torch.float64).clamp(min=LOG_PROB_FLOOR)
        self.blank_cumsum = torch.cumsum(self.log_probs[:, CharVocab.BLANK], 0)  # [T]

    def initial(self) -> CtcPrefix:
        """The empty transcript (every frame so far blank)."""
        return CtcPrefix("", False, torch.full_like(self.blank_cumsum, -torch.inf), self.blank_cumsum, 0.0)

    def final_score(self, prefix: CtcPrefix) -> float:
        """log P(the frames' labelling is exactly `prefix.text`)."""
        return float(torch.logaddexp(prefix.log_nonblank[-1], prefix.log_blank[-1]))

    def extend(self, prefixes: list[CtcPrefix], pieces: list[str]) -> list[CtcPrefix]:
        """`prefixes[i]` continued by the text `pieces[i]`, all at once; a piece with a letter the
        head has no symbol for (`added_characters`) gets the score -inf."""
        added = [added_characters(self.vocab, p.text, p.space_pending, piece)
                 for p, piece in zip(prefixes, pieces, strict=True)]
        current = list(prefixes)
        for j in range(max((len(a[0]) for a in added if a is not None), default=0)):
            rows = [i for i, a in enumerate(added) if a is not None and len(a[0]) > j]
            for i, state in zip(rows, self.extend_by_chars([current[i] for i in rows],
                                                           [added[i][0][j] for i in rows])):
                current[i] = state
        return [CtcPrefix(p.text, a[1], p.log_nonblank, p.log_blank, p.score) if a is not None
                else CtcPrefix(p.text, p.space_pending, p.log_nonblank, p.log_blank, -math.inf)
                for p, a in zip(current, added)]

    def extend_by_chars(self, prefixes: list[CtcPrefix], chars: list[str]) -> list[CtcPrefix]:
        """Each prefix continued by one character of the head's vocabulary (batched over the prefixes)."""
        ids = torch.tensor([self.vocab.index[c] for c in chars])
        emit = self.log_probs[:, ids].T  # [C, T] log P(frame t is the new character)
        emit_cumsum = torch.cumsum(emit, 1)
        nonblank = torch.stack([p.log_nonblank for p in prefixes])
        blank = torch.stack([p.log_blank for p in prefixes])
        repeat = torch.tensor([p.text[-1:] == c for p, c in zip(prefixes, chars)])
        # Paths that may start the new character after frame t: a repeated character needs a blank between.
        start = torch.where(repeat[:, None], blank, torch.logaddexp(blank, nonblank))  # [C, T]
        empty = torch.tensor([not p.text for p in prefixes])
        first = torch.where(empty, 0.0, -torch.inf).to(torch.float64)  # the character on frame 0
        new_nonblank = torch.empty_like(emit)
        new_nonblank[:, 0] = first + emit_cumsum[:, 0]
        new_nonblank[:, 1:] = emit_cumsum[:, 1:] + torch.logaddexp(
            first[:, None], _logcumsumexp(start[:, :-1] - emit_cumsum[:, :-1]))
        new_blank = torch.full_like(emit, -torch.inf)
        new_blank[:, 1:] = self.blank_cumsum[1:] + _logcumsumexp(
            new_nonblank[:, :-1] - self.blank_cumsum[:-1])
        score = torch.logsumexp(torch.cat([new_nonblank[:, :1], start[:, :-1] + emit[:, 1:]], 1), 1)
        return [CtcPrefix(p.text + c, False, new_nonblank[i], new_blank[i], float(score[i]))
                for i, (p, c) in enumerate(zip(prefixes, chars))]


class Lexicon:
    """Words a transcript may hold (normalised like the CTC targets), and every prefix of them."""

    def __init__(self, words: set[str]) -> None:
        self.words = words
        self.prefixes = {word[:end] for word in words for end in range(len(word) + 1)}

    def allows(self, text: str, char: str) -> bool:
        """Whether `text` may go on with `char` (a space ends a word) and keep to the lexicon."""
        word = text[text.rfind(SPACE) + 1:]
        return word in self.words if char == SPACE else word + char in self.prefixes


def ctc_nbest(scorer: CtcPrefixScorer, count: int, width: int, max_chars: int,
              lexicon: Lexicon | None = None) -> list[tuple[float, str]]:
    """The `count` likeliest transcripts (log P(labelling is text), text), best first, by a prefix
    beam search of `width` over characters, no language model; with a `lexicon`, of its words only.
    It stops once no live prefix (whose score bounds every transcript it begins) can enter the
    `count` best, or at `max_chars`."""
    if count < 1:
        return []
    symbols = list(scorer.vocab.index)
    live, finished = [scorer.initial()], []
    for _ in range(max_chars + 1):
        finished += [(scorer.final_score(p), p.text) for p in live if p.text and not p.text.endswith(SPACE)
                     and (lexicon is None or lexicon.allows(p.text, SPACE))]
        finished = sorted(finished, reverse=True)[:count]
        bar = finished[-1][0] if len(finished) == count else -math.inf
        rows = [(p, c) for p in live for c in symbols
                if (c != SPACE or (p.text and not p.text.endswith(SPACE)))  # as the targets are spaced
                and (lexicon is None or lexicon.allows(p.text, c))]
        extended = scorer.extend_by_chars([p for p, _ in rows], [c for _, c in rows]) if rows else []
        live = sorted((e for e in extended if e.score > bar), key=lambda e: -e.score)[:width]
        if not live:
            break
    return finished


def added_characters(vocab: CharVocab, text: str, space_pending: bool,
                     piece: str) -> tuple[str, bool] | None:
    """(characters `piece` adds after the normalised `text`, whether a space is pending after them),
    or None when it holds a letter or digit the head has no symbol for ("ß", "é", "中") or a
    pictograph (an emoji, or "\ufffd": a token of one byte of a longer character): the head cannot
    hear those, so scoring them as separators would let the beam write them for free."""
    out, pending = [], space_pending
    for ch in piece.lower():
        if ch not in vocab.index or ch == SPACE:
            if ch.isalnum() or unicodedata.category(ch) == "So":
                return None
            pending = True
            continue
        if pending and (text or out):
            out.append(SPACE)
        out.append(ch)
        pending = False
    return "".join(out), pending


def _logcumsumexp(x: Tensor) -> Tensor:
    """`torch.logcumsumexp` along the last axis (frames); no frames give no values."""
    return x if x.shape[-1] == 0 else torch.logcumsumexp(x, -1)


class CtcJointScore:
    """`transcribe.JointScore` of a CTC head: `weight` × the CTC prefix score of the transcript the
    LLM's tokens spell (`piece(token)` is a token's text), its full score once it ends."""

    def __init__(self, scorer: CtcPrefixScorer, piece: Callable[[int], str], weight: float,
                 candidates: int) -> None:
        self.scorer, self.piece, self.weight, self.candidates = scorer, piece, weight, candidates

    def initial(self) -> CtcPrefix:
        return self.scorer.initial()

    def extend(self, states: list[CtcPrefix], tokens: list[int],
               end_id: int) -> tuple[list[CtcPrefix], list[float]]:
        new = list(states)
        scores = [self.weight * self.scorer.final_score(s) if t == end_id else 0.0
                  for s, t in zip(states, tokens, strict=True)]
        going_on = [i for i, t in enumerate(tokens) if t != end_id]
        extended = self.scorer.extend([states[i] for i in going_on],
                                      [self.piece(tokens[i]) for i in going_on])
        for i, state in zip(going_on, extended):
            new[i], scores[i] = state, self.weight * state.score
        return new, scores
