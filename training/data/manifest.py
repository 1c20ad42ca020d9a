"""The manifest: the contract between data synthesis and the training stages.

A data directory holds `manifest.jsonl` (one JSON object per utterance, fields of
`ManifestEntry`), `meta.json` (seed, counts, settings, times) and the wavs (16 kHz mono PCM16)
under `wav/<split>/`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from training.data.config import KINDS, SPLITS

MANIFEST_NAME = "manifest.jsonl"
META_NAME = "meta.json"


@dataclass(frozen=True)
class ManifestEntry:
    """One utterance of the data set."""

    id: str
    """Unique id (also the wav's file stem)."""
    split: str
    """`train`, `valid` or `test` (test voices and texts never occur in train)."""
    voice: str
    """Speaker: `espeak:<voice>+<variant>`, `piper:<model>` or `noise:<event>`."""
    kind: str
    """`statement`, `question` or `nonquery`."""
    text: str
    """What is spoken ("" for a noise event)."""
    answer: str | None
    """The frozen LLM's answer to a question (None otherwise, or when no LLM was used)."""
    wav: str
    """Path of the wav relative to the data directory (16 kHz, mono, PCM16)."""
    num_samples: int
    """Length of the wav in samples."""
    pause_spans: list[list[int]] = field(default_factory=list)
    """Mid-utterance pauses as [start_sample, end_sample) pairs (silence or background noise)."""
    seed: int = 0
    """Seed of the utterance's rendering."""

    def validate(self) -> None:
        """Raise ValueError naming the entry and field that break the contract."""
        if self.split not in SPLITS or self.kind not in KINDS:
            raise ValueError(f"{self.id}: split must be one of {SPLITS} and kind one of {KINDS}")
        if self.num_samples <= 0 or not self.wav.endswith(".wav"):
            raise ValueError(f"{self.id}: needs a .wav path and a positive num_samples")
        for start, end in self.pause_spans:
            if not 0 < start < end < self.num_samples:
                raise ValueError(f"{self.id}: pause span {[start, end]} must lie inside the utterance")
        if self.answer is not None and self.kind != "question":
            raise ValueError(f"{self.id}: only questions carry an answer")


def write_manifest(directory: Path, entries: Iterable[ManifestEntry]) -> None:
    """Write `manifest.jsonl` atomically (a crash never leaves half a manifest)."""
    path = directory / MANIFEST_NAME
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(asdict(entry), ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_manifest(directory: Path, split: str | None = None) -> list[ManifestEntry]:
    """Entries of `directory/manifest.jsonl` (of one split if given), validated."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; create it with "
                                f"`freeze-omni train data --out {directory}`")
    names = {f.name for f in fields(ManifestEntry)}
    entries = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            raw = json.loads(line)
            if set(raw) != names:
                raise ValueError(f"{path}: entry {raw.get('id')!r} has fields {sorted(raw)}, "
                                 f"expected {sorted(names)}")
            entry = ManifestEntry(**raw)
            entry.validate()
            if split is None or entry.split == split:
                entries.append(entry)
    return entries
