"""Transcripts the CTC head hears, written out by the frozen LLM: n-best rescoring for the joint beam.

The joint beam (`transcribe.beam_search` with `ctc_prefix.CtcJointScore`) judges only the LLM's
likeliest tokens, so where the adapter's vectors say little it never meets the words spoken:
"Sure." scored -9.7 (LLM) and -0.1 (CTC) on the valid split, yet the beam returned "Shyrkshoes."
(-13.2 and -88.9): the LLM ranked "Sure" below its first 8 tokens. Here the head's own n-best
transcripts (`ctc_prefix.ctc_nbest`, of words that one token of the LLM spells: `whole_words`)
become candidates too. The LLM spells each with its own tokens (casing, punctuation and where
words split are its choice; the letters are fixed) by a small beam, all candidates in one batch,
and each then has a joint score like the beam's: LLM log-probability + `weight` × the CTC
log-probability of its letters. A misspelt candidate ("railoroslo") costs the
LLM so much that it rarely wins; a clean one ("can you explain how to change a flat tire") does.
Keeping the head's transcripts to the lexicon's words makes clean ones more common.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from training.ctc_prefix import SPACE, added_characters
from training.features import CharVocab

SENTENCE_PUNCTUATION = ".,?!;:"
"""The only characters of the tokens the LLM may write between two words or at the end: left
free, it wrote "Sure, [" and "True-@"."""
DEFAULT_SPELLING_WIDTH = 3
"""Beam width per target: greedy, the LLM spelt "sure" as "S" + "ure" (each step's likeliest
token), where "Sure" as one token was far likelier as a whole."""
MAX_SILENT_TOKENS_IN_A_ROW = 1
"""Punctuation-only tokens in a row (its vocabulary has "..." and "?!" as one token)."""


class TokenSpellings:
    """Token ids by the characters they add after a transcript that ends in a letter (normalised as
    the CTC targets: " School," adds " school"); `silent`: tokens of `SENTENCE_PUNCTUATION` only."""

    def __init__(self, pieces: Iterable[tuple[int, str]], vocab: CharVocab | None = None) -> None:
        vocab = vocab or CharVocab()
        self.by_form: dict[str, list[int]] = {}
        self.silent: list[int] = []
        self.pieces: dict[int, str] = {}
        for token, piece in pieces:
            added = added_characters(vocab, "a", False, piece)
            if added is None:
                continue
            self.pieces[token] = piece
            if added[0]:
                self.by_form.setdefault(added[0], []).append(token)
            elif piece and all(c in SENTENCE_PUNCTUATION for c in piece):
                self.silent.append(token)

    def whole_words(self) -> set[str]:
        """Words that one token spells with its leading space (" school" gives "school")."""
        return {form[1:] for form in self.by_form if form.startswith(SPACE) and SPACE not in form[1:]}

    def tokens(self, text: str, space_pending: bool, form: str) -> list[int]:
        """Tokens that add exactly `form` (with its leading space where one is due) after the
        normalised `text`, a separator pending after it or not."""
        if not text:  # a leading separator is dropped at the start
            return self.by_form.get(form, []) + self.by_form.get(SPACE + form, [])
        if space_pending:  # the next letter comes after a space: the token's own is optional
            if not form.startswith(SPACE):
                return []
            return self.by_form.get(form, []) + self.by_form.get(form[1:], [])
        return self.by_form.get(form, [])

    def next_tokens(self, text: str, space_pending: bool, target: str) -> list[int]:
        """Tokens that continue `text` (a prefix of `target`) along `target`."""
        rest = target[len(text):]
        return [t for end in range(1, len(rest) + 1) for t in self.tokens(text, space_pending, rest[:end])]


def vocabulary_pieces(tokenizer: Any, piece: Callable[[int], str]) -> Iterable[tuple[int, str]]:
    """(id, text) of every ordinary token of `tokenizer` (special tokens are never written)."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    return ((t, piece(t)) for t in range(len(tokenizer)) if t not in special)


def spell_with_llm(first_logits: torch.Tensor, state: Any, feed: Callable, end_id: int,
                   targets: list[str], spellings: TokenSpellings, max_tokens: int,
                   bars: list[float] | None = None, width: int = DEFAULT_SPELLING_WIDTH,
                   vocab: CharVocab | None = None) -> list[tuple[float, list[int]]]:
    """Per target (normalised letters), (LLM log-probability, token ids) of the likeliest way the
    LLM spells exactly those letters that a beam of `width` per target finds, or (-inf, []) where
    none within `max_tokens` gets above `bars[i]` (it could not win then).

    Only tokens that keep the letters are taken; wherever all are written, ending there is a
    candidate, and the search of a target stops once none of its live spellings (whose
    log-probability only falls) is likelier than its best. `first_logits` [V] and `state` (one
    row) are the LLM after its context; `feed` is a `transcribe.BatchFeed` and may change `state`."""
    vocab = vocab or CharVocab()
    best = [(bar, ()) for bar in (bars if bars is not None else [-math.inf] * len(targets))]
    live = [(0, i, _Spelling(target)) for i, target in enumerate(targets)]  # (state row, target, spelling)
    logits = first_logits.reshape(1, -1)
    while live:
        log_probs = torch.log_softmax(logits.float(), -1)
        options: dict[int, list[tuple[float, int, int, _Spelling]]] = {}
        for r, i, spelling in live:
            if spelling.text == spelling.target and spelling.score + float(log_probs[r, end_id]) > best[i][0]:
                best[i] = (spelling.score + float(log_probs[r, end_id]), spelling.ids)  # it may end here
            allowed = spelling.allowed(spellings, max_tokens)
            if allowed:
                top = log_probs[r, allowed].topk(min(width, len(allowed)))
                pairs = zip(top.values.tolist(), top.indices.tolist())
                options.setdefault(i, []).extend([(spelling.score + value, r, allowed[k], spelling)
                                                  for value, k in pairs])
        live = [(r, i, spelling.take(token, score, spellings, vocab))
                for i, found in options.items()
                for score, r, token, spelling in sorted(found, key=lambda o: -o[0])[:width]
                if score > best[i][0]]  # it only falls: below the best it cannot win
        if not live:
            break
        logits, state = feed([s.ids[-1] for _, _, s in live], [r for r, _, _ in live], state)
        live = [(row, i, s) for row, (_, i, s) in enumerate(live)]
    return [(score, list(ids)) if ids else (-math.inf, []) for score, ids in best]


@dataclass(frozen=True)
class _Spelling:
    """One way of spelling a target so far."""

    target: str
    text: str = ""
    pending: bool = False
    silent: int = 0
    """Punctuation-only tokens in a row at its end."""
    score: float = 0.0
    ids: tuple[int, ...] = ()

    def allowed(self, spellings: TokenSpellings, max_tokens: int) -> list[int]:
        """Tokens that keep to the target: its next letters, or punctuation where a word ends."""
        if len(self.ids) >= max_tokens:
            return []
        allowed = spellings.next_tokens(self.text, self.pending, self.target)
        word_ends = self.target[len(self.text):][:1] in ("", SPACE)
        if self.text and self.silent < MAX_SILENT_TOKENS_IN_A_ROW and word_ends:
            allowed += spellings.silent
        return allowed

    def take(self, token: int, score: float, spellings: TokenSpellings, vocab: CharVocab) -> _Spelling:
        added, pending = added_characters(vocab, self.text, self.pending, spellings.pieces[token])
        return _Spelling(self.target, self.text + added, pending, 0 if added else self.silent + 1, score,
                         self.ids + (token,))
