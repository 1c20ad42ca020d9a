"""The plan of a run: every utterance's text, voice, degradations and seed, drawn from the run's seed.

Planning makes every random choice up front, so rendering one utterance depends only on its own
`UtteranceSpec` (and a resumed run renders the missing ones identically).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from training.data.augment import NOISE_COLORS, NOISE_EVENTS
from training.data.config import SPLITS, DataSize, SplitCounts
from training.data.texts import TextBank
from training.data.voices import Delivery, Voice, VoicePicker

MIN_PAUSE_WORDS = 5  # a pause needs at least two words on either side of it


@dataclass(frozen=True)
class UtteranceSpec:
    """Everything needed to render one utterance."""

    id: str
    """Unique id, `<split>-<sub kind>-<index>`; also the wav's file name."""
    split: str
    """train, valid or test."""
    kind: str
    """statement, question or nonquery."""
    sub_kind: str
    """Finer kind: statement, question, pause, backchannel, filler, aside, to_other or a noise event."""
    text: str
    """What is spoken ("" for a noise event)."""
    answer: str | None
    """The LLM's answer (questions with an LLM only)."""
    delivery: Delivery
    """Speaker, speed and pitch."""
    seed: int
    """Seed of the utterance's own random choices while rendering (noise samples)."""
    lead_s: float
    """Silence before the speech, seconds."""
    trail_s: float
    """Silence after the speech, seconds."""
    pause_after_word: int = 0
    """Words spoken before the mid-utterance pause (0: no pause)."""
    pause_s: float = 0.0
    """Length of the mid-utterance pause, seconds."""
    noise_color: str | None = None
    """Background noise colour (None: none)."""
    snr_db: float = 0.0
    """Background noise level below the speech, dB."""
    gain_db: float = 0.0
    """Gain applied last, dB."""

    @property
    def wav(self) -> str:
        """Path of the wav relative to the output directory."""
        return f"wav/{self.split}/{self.id}.wav"


class _Cycle:
    """Draws texts from a pool in shuffled rounds, so every text is used about equally often."""

    def __init__(self, texts: Sequence[str], rng: np.random.Generator) -> None:
        if not texts:
            raise ValueError("a text pool is empty; raise the text counts of this size")
        self.texts, self.rng, self.queue = list(texts), rng, []

    def next(self) -> str:
        if not self.queue:
            self.queue = [self.texts[i] for i in self.rng.permutation(len(self.texts))]
        return self.queue.pop()


class Planner:
    """Builds the `UtteranceSpec`s of one size from a text bank and a seed."""

    def __init__(self, size: DataSize, bank: TextBank, seed: int, use_piper: bool) -> None:
        self.size, self.bank = size, bank
        self.rng = np.random.default_rng([seed, 7])
        self.voices = VoicePicker(size.voices, use_piper, unheard_rng=np.random.default_rng([seed, 11]))

    def plan(self) -> list[UtteranceSpec]:
        specs: list[UtteranceSpec] = []
        for split in SPLITS:
            specs += self._split(split, self.size.splits[split])
        return specs

    def _split(self, split: str, counts: SplitCounts) -> Iterator[UtteranceSpec]:
        statements = _Cycle(self.bank.statements[split], self.rng)
        questions = self.bank.questions[split]
        long_questions = [q for q in questions if len(q.split()) >= MIN_PAUSE_WORDS]
        for i in range(counts.statements):
            yield self._speech(split, "statement", "statement", i, statements.next())
        plain, paused = _Cycle(questions, self.rng), _Cycle(long_questions or questions, self.rng)
        for i in range(counts.questions - counts.pause_questions):
            yield self._speech(split, "question", "question", i, plain.next())
        for i in range(counts.pause_questions):
            yield self._speech(split, "question", "pause", i, paused.next(), with_pause=True)
        yield from self._nonqueries(split, counts)

    def _nonqueries(self, split: str, counts: SplitCounts) -> Iterator[UtteranceSpec]:
        pools = {k: _Cycle(v, self.rng) for k, v in sorted(self.bank.nonqueries[split].items()) if v}
        sub_kinds = sorted(pools)
        numbers = dict.fromkeys(sub_kinds + list(NOISE_EVENTS), 0)
        for i in range(counts.nonqueries - counts.noise_events):
            sub_kind = sub_kinds[i % len(sub_kinds)]  # round robin keeps every sub-kind present
            yield self._speech(split, "nonquery", sub_kind, numbers[sub_kind], pools[sub_kind].next())
            numbers[sub_kind] += 1
        for i in range(counts.noise_events):
            event = NOISE_EVENTS[i % len(NOISE_EVENTS)]
            yield self._noise(split, event, numbers[event])
            numbers[event] += 1

    def _common(self, split: str, sub_kind: str, index: int) -> dict:
        v, rng = self.size.voices, self.rng
        noisy = rng.random() < v.noise_share
        return dict(
            id=f"{split}-{sub_kind}-{index:05d}", split=split, sub_kind=sub_kind,
            seed=int(rng.integers(2**31 - 1)),
            lead_s=round(float(rng.uniform(*v.lead_s)), 3), trail_s=round(float(rng.uniform(*v.trail_s)), 3),
            noise_color=NOISE_COLORS[int(rng.integers(len(NOISE_COLORS)))] if noisy else None,
            snr_db=round(float(rng.uniform(*v.snr_db)), 2), gain_db=round(float(rng.uniform(*v.gain_db)), 2),
        )

    def _speech(self, split: str, kind: str, sub_kind: str, index: int, text: str,
                with_pause: bool = False) -> UtteranceSpec:
        common = self._common(split, sub_kind, index)
        delivery = self.voices.pick(split, self.rng)
        pause_after, pause_s = 0, 0.0
        words = len(text.split())
        if with_pause and words >= 4:
            # Somewhere in the middle third-ish, never after the first or before the last word.
            low, high = max(2, math.ceil(0.3 * words)), min(words - 2, math.floor(0.7 * words))
            pause_after = int(self.rng.integers(low, max(low, high) + 1))
            pause_s = round(float(self.rng.uniform(*self.size.voices.pause_s)), 3)
        answer = self.bank.answers.get(text) if kind == "question" else None
        return UtteranceSpec(kind=kind, text=text, answer=answer, delivery=delivery,
                             pause_after_word=pause_after, pause_s=pause_s, **common)

    def _noise(self, split: str, event: str, index: int) -> UtteranceSpec:
        common = self._common(split, event, index)
        return UtteranceSpec(kind="nonquery", text="", answer=None,
                             delivery=Delivery(Voice(f"noise:{event}", "noise")), **common)
