"""The CTC head's n-best transcripts and the LLM's spelling of them (`training.ctc_spelling`)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.test_ctc_joint import _brute_force, _random_log_probs, _spelled
from training.ctc_prefix import SPACE, CtcPrefixScorer, Lexicon, ctc_nbest
from training.ctc_spelling import TokenSpellings, spell_with_llm


def _normalised(text: str) -> bool:
    return bool(text) and text == " ".join(text.split())


def test_the_nbest_are_the_likeliest_labellings() -> None:
    log_probs, ids = _random_log_probs(6, "ab ", seed=1)
    _, full = _brute_force(log_probs, ids)
    expected = sorted(((math.log(p), t) for t, p in full.items() if _normalised(t)), reverse=True)[:5]
    found = ctc_nbest(CtcPrefixScorer(log_probs), count=5, width=1000, max_chars=6)
    assert [t for _, t in found] == [t for _, t in expected]
    assert [s for s, _ in found] == pytest.approx([s for s, _ in expected], abs=1e-6)
    assert ctc_nbest(CtcPrefixScorer(_spelled("my dog")), 1, 2, 20)[0][1] == "my dog"
    assert ctc_nbest(CtcPrefixScorer(_spelled("my dog")), 0, 2, 20) == []


END, DOG_CAPS, DOG, SPACE_DOG, D, OG, COMMA, BYTE, A = range(9)
PIECES = {DOG_CAPS: " Dog", DOG: "dog", SPACE_DOG: " dog", D: " d", OG: "og", COMMA: ",", BYTE: "\ufffd",
          A: "A"}


def test_token_spellings_follow_the_transcript_so_far() -> None:
    spellings = TokenSpellings(PIECES.items())
    assert spellings.silent == [COMMA]  # the byte token is neither: the head cannot hear it
    assert sorted(spellings.tokens("", False, "dog")) == [DOG_CAPS, DOG, SPACE_DOG]  # no space at the start
    assert sorted(spellings.tokens("a", False, " dog")) == [DOG_CAPS, SPACE_DOG]
    assert spellings.tokens("a", False, "dog") == [DOG]  # "adog": one word
    assert sorted(spellings.tokens("a", True, " dog")) == [DOG_CAPS, DOG, SPACE_DOG]  # after "a,"
    assert spellings.tokens("a", True, "dog") == []  # a letter after "a," comes after a space
    assert sorted(spellings.next_tokens("a", False, "a dog")) == sorted([DOG_CAPS, D, SPACE_DOG])


def _logits_preferring(*order: int) -> torch.Tensor:
    logits = torch.full((len(PIECES) + 1,), -10.0)
    for rank, token in enumerate(order):
        logits[token] = -float(rank)
    return logits


def _feed_preferring(*order: int, after: dict | None = None):
    """A stand-in LLM that ranks the tokens in `order` first, in that order, or after a token
    `t` those in `after[t]`."""
    default, after = _logits_preferring(*order), {t: _logits_preferring(*o) for t, o in (after or {}).items()}
    def feed(tokens, parents, state):
        return torch.stack([after.get(t, default) for t in tokens]), state
    return default, feed


def test_the_llm_spells_the_letters_its_own_way() -> None:
    spellings = TokenSpellings(PIECES.items())
    first, feed = _feed_preferring(COMMA, A, DOG_CAPS, END, D, OG)
    (score, ids), = spell_with_llm(first, None, feed, END, ["a dog"], spellings, max_tokens=6)
    assert ids == [A, DOG_CAPS]  # no punctuation before the first letter
    assert score == pytest.approx(float(torch.log_softmax(first, -1)[[A, DOG_CAPS, END]].sum()))

    # The likeliest whole, not each step's likeliest token: " d" then "og" is unlikely.
    first, feed = _feed_preferring(D, DOG_CAPS, END, after={D: (END, A, COMMA, OG)})
    assert spell_with_llm(first, None, feed, END, ["dog"], spellings, 6, width=1)[0][1] == [D, OG]
    assert spell_with_llm(first, None, feed, END, ["dog"], spellings, 6)[0][1] == [DOG_CAPS]

    # It ends where the whole is likeliest, not where the LLM first likes ending best.
    first, feed = _feed_preferring(DOG_CAPS, after={DOG_CAPS: (COMMA, END), COMMA: (END,)})
    assert spell_with_llm(first, None, feed, END, ["dog"], spellings, 6)[0][1] == [DOG_CAPS, COMMA]
    first, feed = _feed_preferring(DOG_CAPS, after={DOG_CAPS: (COMMA, END), COMMA: (A, D, END)})
    assert spell_with_llm(first, None, feed, END, ["dog"], spellings, 6)[0][1] == [DOG_CAPS]


def test_letters_it_cannot_spell_or_too_many_tokens_give_minus_infinity() -> None:
    spellings = TokenSpellings(PIECES.items())
    first, feed = _feed_preferring(D, OG, END)
    found = spell_with_llm(first, None, feed, END, ["a dog", "cat", "dog"], spellings, max_tokens=6)
    assert found[0][1] == [A, D, OG]
    assert found[1] == (-math.inf, [])  # no token spells "c"
    assert found[2][1] == [D, OG]
    assert spell_with_llm(first, None, feed, END, ["a dog"], spellings, max_tokens=1) == [(-math.inf, [])]
    bars = [found[0][0] + 0.01, found[2][0] - 0.01]  # just above and just below what it reaches
    assert spell_with_llm(first, None, feed, END, ["a dog", "dog"], spellings, 6, bars) == [(-math.inf, []),
                                                                                        found[2]]


def test_a_lexicon_keeps_the_nbest_to_its_words() -> None:
    lexicon = Lexicon({"my", "dog", "do"})
    assert lexicon.allows("my d", "o") and lexicon.allows("my do", SPACE) and not lexicon.allows("my dg", "o")
    assert not lexicon.allows("m", SPACE) and lexicon.allows("", "m")
    scorer = CtcPrefixScorer(_spelled("my dgo"))
    assert ctc_nbest(scorer, 1, 8, 20)[0][1] == "my dgo"
    found = ctc_nbest(scorer, 3, 8, 20, lexicon)
    assert found and all(set(text.split()) <= lexicon.words for _, text in found)
    assert "my dog" in [text for _, text in found]
    assert TokenSpellings(PIECES.items()).whole_words() == {"dog", "d"}  # " Dog", " dog", " d"
