"""CTC prefix scores, the beam decoded jointly with them, and the CTC head of `train ctc-head`."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from training.ctc_prefix import CtcJointScore, CtcPrefixScorer
from training.features import CharVocab
from training.transcribe import beam_search

VOCAB = CharVocab()


def _random_log_probs(frames: int, symbols: str, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Log-probabilities over blank + `symbols` (every other symbol impossible)."""
    ids = [CharVocab.BLANK] + [VOCAB.index[c] for c in symbols]
    log_probs = torch.full((frames, len(VOCAB)), -1e4)
    log_probs[:, ids] = (torch.randn(frames, len(ids), generator=torch.Generator().manual_seed(seed)) * 2)
    log_probs[:, ids] = log_probs[:, ids].log_softmax(-1)
    return log_probs, ids


def _brute_force(log_probs: torch.Tensor, ids: list[int]) -> tuple[dict[str, float], dict[str, float]]:
    """(P(labelling starts with s), P(labelling is s)) by summing every path."""
    prefix, full = {}, {}
    for path in itertools.product(ids, repeat=log_probs.shape[0]):
        label, previous = [], None
        for symbol in path:
            if symbol != previous and symbol != CharVocab.BLANK:
                label.append(VOCAB.SYMBOLS[symbol - 1])
            previous = symbol
        text = "".join(label)
        p = math.exp(sum(float(log_probs[t, s]) for t, s in enumerate(path)))
        full[text] = full.get(text, 0.0) + p
        for k in range(len(text) + 1):
            prefix[text[:k]] = prefix.get(text[:k], 0.0) + p
    return prefix, full


def test_prefix_and_full_scores_equal_the_sum_over_every_path() -> None:
    log_probs, ids = _random_log_probs(6, "ab ")
    prefix, full = _brute_force(log_probs, ids)
    scorer = CtcPrefixScorer(log_probs)
    texts = ["", "a", "b", "aa", "ab", "a b", "abba", "b a b", "aab"]
    states = scorer.extend([scorer.initial()] * len(texts), texts)
    for text, state in zip(texts, states):
        assert state.text == text
        assert state.score == pytest.approx(math.log(prefix[text]) if text else 0.0, abs=1e-6)
        assert scorer.final_score(state) == pytest.approx(math.log(full[text]), abs=1e-6)


def test_token_pieces_are_normalised_like_the_ctc_targets() -> None:
    log_probs, _ = _random_log_probs(8, "helowrd ")
    scorer = CtcPrefixScorer(log_probs)
    state = scorer.initial()
    for piece in [" Hel", "lo", ",", " World", "."]:  # leading space, punctuation, capitals
        state = scorer.extend([state], [piece])[0]
    whole = scorer.extend([scorer.initial()], ["hello world"])[0]
    assert state.text == "hello world" == " ".join(VOCAB.decode(VOCAB.encode(" Hello, World.")).split())
    assert state.score == pytest.approx(whole.score, abs=1e-9)
    assert state.space_pending  # the "." acts as a separator, scored only with a next character


def _spelled(text: str, blanks_after: int = 2) -> torch.Tensor:
    """CTC log-probabilities that clearly spell `text` (one frame per character, then blanks)."""
    frames = len(text) + blanks_after
    log_probs = torch.full((frames, len(VOCAB)), math.log(0.01 / (len(VOCAB) - 1)))
    for t in range(frames):
        symbol = VOCAB.index[text[t]] if t < len(text) else CharVocab.BLANK
        log_probs[t, symbol] = math.log(0.99)
    return log_probs


def test_the_ctc_score_changes_which_transcript_the_beam_returns() -> None:
    end, cat, dog = 0, 1, 2
    pieces = {cat: " cat", dog: " dog"}
    first = torch.log(torch.tensor([0.001, 0.6, 0.399]))  # the LLM prefers "cat"
    then_end = torch.log(torch.tensor([0.98, 0.01, 0.01]))

    def feed(tokens, parents, state):
        return then_end.expand(len(tokens), -1).clone(), state

    def search(weight: float | None) -> list[int]:
        scorer = CtcPrefixScorer(_spelled("dog"))
        joint = None if weight is None else CtcJointScore(scorer, pieces.get, weight, 3)
        return beam_search(first, None, feed, end, max_tokens=5, width=2, joint=joint)

    assert search(None) == [cat]
    assert search(1e-4) == [cat]  # too light to move the LLM's choice
    assert search(0.1) == [dog]  # the audio spells "dog"


def test_a_transcript_cut_at_the_token_cap_is_scored_as_finished() -> None:
    """Padding with separators up to the cap must not leave the rest of the audio unexplained
    for free: the audio spells "dog cat", the LLM likes "dog" followed by dots."""
    end, dog, dot, cat = 0, 1, 2, 3
    pieces = {dog: " dog", dot: ".", cat: " cat"}
    first = torch.log(torch.tensor([0.001, 0.997, 0.001, 0.001]))
    after_dog = torch.log(torch.tensor([0.001, 0.001, 0.99, 0.008]))  # the LLM wants dots
    after_cat = torch.log(torch.tensor([0.997, 0.001, 0.001, 0.001]))

    def feed(tokens, parents, state):
        rows = [after_cat if token == cat else after_dog for token in tokens]
        return torch.stack(rows), state

    scorer = CtcPrefixScorer(_spelled("dog cat"))
    joint = CtcJointScore(scorer, pieces.get, 1.0, 4)
    ids = beam_search(first, None, feed, end, max_tokens=4, width=2, joint=joint)
    assert ids[0] == dog and ids[-1] == cat  # not "dog..." (the cap is 4 tokens)


def test_a_finished_transcript_never_scores_above_its_prefix() -> None:
    log_probs, _ = _random_log_probs(10, "abc ", seed=3)
    scorer = CtcPrefixScorer(log_probs)
    state = scorer.initial()
    for piece in ["a", "b", " c", "a"]:
        longer = scorer.extend([state], [piece])[0]
        assert longer.score <= state.score + 1e-9  # the beam's stopping rule needs this
        assert scorer.final_score(longer) <= longer.score + 1e-9
        state = longer


def test_bad_log_probabilities_are_refused() -> None:
    with pytest.raises(ValueError, match="symbols"):
        CtcPrefixScorer(torch.zeros(4, 7))
    with pytest.raises(ValueError, match="frames"):
        CtcPrefixScorer(torch.zeros(0, len(VOCAB)))


def test_letters_the_head_cannot_hear_are_never_free() -> None:
    scorer = CtcPrefixScorer(_spelled("dog"))
    start = scorer.extend([scorer.initial()], [" do"])[0]
    foreign, punctuation, byte, emoji = scorer.extend([start] * 4, ["ß", "!", "\ufffd", " 😀"])
    assert foreign.score == -math.inf  # not a separator: the beam would write it for free
    assert byte.score == emoji.score == -math.inf
    assert punctuation.score == start.score and punctuation.space_pending

    end, german, dog = 0, 1, 2
    first = torch.log(torch.tensor([0.001, 0.7, 0.299]))  # the LLM prefers "Au"
    then_end = torch.log(torch.tensor([0.98, 0.01, 0.01]))
    joint = CtcJointScore(scorer, {german: "Auß", dog: " dog"}.get, 0.1, 3)
    assert beam_search(first, None, lambda t, p, s: (then_end.expand(len(t), -1).clone(), s),
                       end, max_tokens=5, width=2, joint=joint) == [dog]
