"""The text bank of a run: distinct statements, questions (+ LLM answers) and non-queries per split.

Texts are cleaned so that they are speakable as written (letters and light punctuation only),
deduplicated on a case- and punctuation-free key, and split by text: a test sentence is never
heard in training, whatever the voice.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from training.data import templates
from training.data.config import SPLITS, TextCounts

MIN_WORDS, MAX_WORDS = 3, 18
_ALLOWED = re.compile(r"^[A-Za-z][A-Za-z ,'\-]*[A-Za-z][.?!]$")
_LEAD_JUNK = re.compile(r"^\s*(?:[-*#>•]+|\d+[.)]|q\d*[:.]|question\s*\d*:|statement\s*\d*:|sentence:)\s*",
                        re.IGNORECASE)
# The LLM talking about itself: not a line a user would say.
_SELF_TALK = re.compile(r"\b(?:ai|assistant|smollm|language model|i'm sorry|as an)\b", re.IGNORECASE)
# Short lists that are part of any conversation; they may occur in every split (held-out voices
# still keep the test apart). Sub-kinds not listed here are split by text.
SHARED_NONQUERY_KINDS = ("backchannel", "filler", "aside")


def dedup_key(text: str) -> str:
    """Case- and punctuation-free form used to find duplicates."""
    return " ".join(re.sub(r"[^a-z ]+", " ", text.lower()).split())


def held_out_keys(train_texts: Iterable[str], held_texts: Iterable[str]) -> frozenset[str]:
    """Dedup keys of held-out texts that the train split lacks.

    Another run's train split (a second seed) may hold texts this run keeps for valid or test;
    those must not be trained on. Texts every split shares by design (backchannels, fillers)
    are in this run's train split too, so they stay usable; texts without letters (noise
    events) never count as held out.
    """
    train = {dedup_key(t) for t in train_texts}
    return frozenset(k for k in map(dedup_key, held_texts) if k and k not in train)


def clean_spoken(text: str, ending: str) -> str | None:
    """One line of generated text as a speakable sentence ending in `ending`, or None.

    Args:
        text: raw line (may carry numbering, quotes or markdown).
        ending: the required final punctuation, "?" for questions and "." for statements.
    """
    line = _LEAD_JUNK.sub("", text.strip()).strip().strip("\"'*_`“”‘’").strip()
    line = line.replace("’", "'")
    line = re.sub(r"\s+", " ", line)
    if not line or not _ALLOWED.match(line) or not line.endswith(ending):
        return None
    if not MIN_WORDS <= len(line.split()) <= MAX_WORDS or line.count(ending) > 1:
        return None
    if _SELF_TALK.search(line):
        return None
    return line[0].upper() + line[1:]


def dedup(texts: Iterable[str], seen: set[str] | None = None) -> list[str]:
    """Texts whose key was not seen before, in order; `seen` is updated."""
    seen = set() if seen is None else seen
    out = []
    for text in texts:
        key = dedup_key(text)
        if key and key not in seen:
            seen.add(key)
            out.append(text)
    return out


def split_texts(texts: Sequence[str], counts: TextCounts, rng: np.random.Generator) -> dict[str, list[str]]:
    """Shuffle and cut into train/valid/test; each split gets at least one text when there are 3+."""
    order = [texts[i] for i in rng.permutation(len(texts))]
    n_valid = round(len(order) * counts.valid_fraction)
    n_test = round(len(order) * counts.test_fraction)
    if len(order) >= 3:
        n_valid, n_test = max(1, n_valid), max(1, n_test)
    return {"test": order[:n_test], "valid": order[n_test:n_test + n_valid],
            "train": order[n_test + n_valid:]}


def template_pool(kind: str, n: int, rng: np.random.Generator) -> list[str]:
    """`n` distinct template texts of `kind` ("question" or "statement"), drawn with `rng`.

    Templates take turns (a shuffled round robin), so a template with thousands of slot
    combinations contributes no more than one with twenty until the small ones run out.
    """
    families = templates.question_families() if kind == "question" else templates.statement_families()
    available = sum(len(f) for f in families)
    if n > available:
        raise ValueError(f"only {available} template {kind}s exist; lower template_{kind}s to ≤ that")
    queues = [[family[i] for i in rng.permutation(len(family))] for family in families]
    out: list[str] = []
    while len(out) < n:
        for queue in (queues[i] for i in rng.permutation(len(queues))):
            if queue and len(out) < n:
                out.append(queue.pop())
    return out


@dataclass
class TextBank:
    """All texts of a run, by split; saved as `texts.json` so a resumed run skips the LLM."""

    statements: dict[str, list[str]]
    """Split → distinct statements."""
    questions: dict[str, list[str]]
    """Split → distinct questions."""
    nonqueries: dict[str, dict[str, list[str]]]
    """Split → sub-kind → texts that must not be answered."""
    answers: dict[str, str] = field(default_factory=dict)
    """Question → the frozen LLM's answer (empty when no LLM was used)."""
    sources: dict[str, int] = field(default_factory=dict)
    """How many distinct texts came from each source (template_questions, llm_questions, ...)."""
    settings: dict = field(default_factory=dict)
    """What the bank was made from (seed, size, LLM); a resumed run reuses the bank only if equal."""

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "TextBank":
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def build_text_bank(
    counts: TextCounts,
    rng: np.random.Generator,
    llm_questions: Sequence[str] = (),
    llm_statements: Sequence[str] = (),
) -> TextBank:
    """Merge template and LLM texts, deduplicate, and split each kind by text.

    LLM texts come first so that, on a clash, the LLM's wording is kept (its texts are rarer).
    """
    seen: set[str] = set()
    llm_q, llm_s = dedup(llm_questions, seen), dedup(llm_statements, seen)
    tpl_q = dedup(template_pool("question", counts.template_questions, rng), seen)
    tpl_s = dedup(template_pool("statement", counts.template_statements, rng), seen)
    nonqueries: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    for sub_kind, texts in templates.nonquery_texts().items():
        if sub_kind in SHARED_NONQUERY_KINDS:
            for split in SPLITS:
                nonqueries[split][sub_kind] = list(texts)
        else:
            for split, part in split_texts(dedup(texts, seen), counts, rng).items():
                nonqueries[split][sub_kind] = part
    return TextBank(
        statements=split_texts(llm_s + tpl_s, counts, rng),
        questions=split_texts(llm_q + tpl_q, counts, rng),
        nonqueries=nonqueries,
        sources={"llm_questions": len(llm_q), "llm_statements": len(llm_s),
                 "template_questions": len(tpl_q), "template_statements": len(tpl_s)},
    )
