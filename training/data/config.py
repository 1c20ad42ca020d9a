"""Sizes and settings of a synthesis run (`--size small|full`)."""
from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "valid", "test")
KINDS = ("statement", "question", "nonquery")
VALID_VOICES = ("training", "unheard")  # see VoiceSettings.valid_voices
SAMPLE_RATE_HZ = 16_000  # the speech encoder's input rate


@dataclass(frozen=True)
class SplitCounts:
    """Utterances of one split."""

    statements: int
    """Spoken statements (speech recognition targets)."""
    questions: int
    """Spoken questions and requests to the assistant, pauses included."""
    pause_questions: int
    """Of `questions`, how many carry a mid-utterance pause (0 ≤ pause_questions ≤ questions)."""
    nonqueries: int
    """Speech or sounds that must not be answered, noise events included."""
    noise_events: int
    """Of `nonqueries`, how many are coughs and noise bursts without words."""


@dataclass(frozen=True)
class TextCounts:
    """Distinct texts to collect before splitting them into train/valid/test."""

    template_questions: int
    """Questions drawn from the templates."""
    template_statements: int
    """Statements drawn from the templates."""
    llm_questions: int
    """Questions written by the frozen LLM from topic prompts (0 without an LLM)."""
    llm_statements: int
    """Statements written by the frozen LLM from topic prompts (0 without an LLM)."""
    valid_fraction: float = 0.05
    """Share of distinct texts reserved for validation, 0–0.5."""
    test_fraction: float = 0.07
    """Share of distinct texts reserved for the held-out test, 0–0.5."""


@dataclass(frozen=True)
class VoiceSettings:
    """How utterances are spoken and degraded."""

    piper_share: float
    """Share of train/valid speech spoken by piper (the rest by espeak-ng), 0–1."""
    train_pitch: tuple[int, int] = (25, 75)
    """espeak-ng pitch range (0–99) of train/valid voices."""
    test_pitch: tuple[int, int] = (10, 90)
    """espeak-ng pitch range of held-out voices; wider, so some pitches occur only in test."""
    speed_wpm: tuple[int, int] = (120, 210)
    """espeak-ng speaking rate range, words per minute."""
    piper_length_scale: tuple[float, float] = (0.8, 1.25)
    """piper phoneme length scale range (< 1 is faster)."""
    noise_share: float = 0.7
    """Share of utterances with additive background noise, 0–1."""
    snr_db: tuple[float, float] = (12.0, 40.0)
    """Signal-to-noise ratio range of the background noise, dB."""
    gain_db: tuple[float, float] = (-18.0, 3.0)
    """Gain range applied last (the peak is then limited to 0.95 of full scale), dB."""
    lead_s: tuple[float, float] = (0.1, 0.5)
    """Silence before the speech, seconds."""
    trail_s: tuple[float, float] = (0.05, 0.2)
    """Silence after the speech, seconds (kept short: the wav's end is the turn's end)."""
    pause_s: tuple[float, float] = (0.5, 1.2)
    """Length of a mid-utterance pause, seconds."""
    valid_voices: str = "training"
    """Voices of the valid split: `training` (train's voices, piper included) or `unheard` (espeak
    voices of neither train nor test, at the test's pitch range; `training.data.voices`)."""


@dataclass(frozen=True)
class DataSize:
    """One named size of the data set."""

    name: str
    """`small` (CI) or `full` (training)."""
    splits: dict[str, SplitCounts]
    """Utterance counts per split."""
    texts: TextCounts
    """Distinct texts to collect."""
    voices: VoiceSettings = field(default_factory=lambda: VoiceSettings(piper_share=0.0))
    """How utterances are spoken."""
    answer_max_tokens: int = 48
    """Cap on the LLM's greedy answer, tokens (then cut to its first one or two sentences)."""

    def validate(self) -> None:
        """Raise ValueError with a fix when the counts cannot be met."""
        for split, c in self.splits.items():
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
            if not 0 <= c.pause_questions <= c.questions or not 0 <= c.noise_events <= c.nonqueries:
                raise ValueError(f"{self.name}/{split}: pause_questions must be ≤ questions and "
                                 "noise_events ≤ nonqueries")
        t = self.texts
        if t.valid_fraction + t.test_fraction >= 0.5:
            raise ValueError("valid_fraction + test_fraction must stay below 0.5")
        if not 0.0 <= self.voices.piper_share <= 1.0:
            raise ValueError("piper_share must be within 0–1")
        if self.voices.valid_voices not in VALID_VOICES:
            raise ValueError(f"valid_voices {self.voices.valid_voices!r}: use one of {VALID_VOICES}")


SMALL = DataSize(
    name="small",
    splits={"train": SplitCounts(statements=4, questions=4, pause_questions=1, nonqueries=5, noise_events=1),
            "valid": SplitCounts(statements=1, questions=2, pause_questions=0, nonqueries=2, noise_events=1),
            "test": SplitCounts(statements=2, questions=3, pause_questions=1, nonqueries=4, noise_events=1)},
    texts=TextCounts(template_questions=40, template_statements=40, llm_questions=8, llm_statements=8,
                     valid_fraction=0.15, test_fraction=0.2),
    answer_max_tokens=24,
)

FULL = DataSize(
    name="full",
    splits={"train": SplitCounts(statements=3000, questions=2400, pause_questions=420, nonqueries=1300,
                                 noise_events=250),
            "valid": SplitCounts(statements=120, questions=150, pause_questions=30, nonqueries=80,
                                 noise_events=15),
            "test": SplitCounts(statements=200, questions=300, pause_questions=60, nonqueries=160,
                                noise_events=30)},
    texts=TextCounts(template_questions=700, template_statements=1800, llm_questions=600,
                     llm_statements=600),
    voices=VoiceSettings(piper_share=0.25),
)

SIZES = {size.name: size for size in (SMALL, FULL)}
