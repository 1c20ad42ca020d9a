"""Kept speech pairs: a run's `pairs.jsonl` archived with the codec that encoded it, so a later run
(on a fresh machine) starts with them instead of speaking and encoding every text again.

Speaking the whole bank with piper and encoding it with the WORLD codec takes most of an hour on
this project's CPU, while the result (text + codec ids) is a few megabytes. Codec ids only mean
something to the codec that made them, so the archive's first line names that codec by a
fingerprint of its files, and seeding a run with another codec is refused.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path

from training.tts.pairs import SpeechPair, open_to_append, pair_line, read_pairs

logger = logging.getLogger(__name__)

KEPT_PAIRS_FORMAT = "freeze-omni speech pairs 1"
CODEC_FILES = ("model.json", "final.pt")


def codec_fingerprint(codec_dir: Path, targets: str = "speech") -> str:
    """sha256 over the codec folder's files (those that decide which id means which sound), and
    over `targets` unless it is the default "speech" (ids read from the voice differ from ids
    encoded from its audio, so their archives must not mix)."""
    digest = hashlib.sha256()
    if targets != "speech":
        digest.update(f"targets={targets}".encode())
    for name in CODEC_FILES:
        path = Path(codec_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: pass a trained codec folder (model.json + final.pt)")
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def keep_pairs(pairs_path: Path, out: Path, fingerprint: str) -> int:
    """Write the distinct pairs of `pairs_path` to the gzip'd archive `out`; returns how many."""
    pairs = list({(p.text, p.split): p for p in read_pairs(pairs_path)}.values())
    if not pairs:
        raise ValueError(f"{pairs_path} holds no pairs: pass a tts-decoder run's pairs.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": KEPT_PAIRS_FORMAT, "codec_sha256": fingerprint, "pairs": len(pairs)}
    with gzip.open(out, "wt", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        f.writelines(pair_line(pair) for pair in pairs)
    return len(pairs)


def read_kept_pairs(kept: Path, fingerprint: str) -> list[SpeechPair]:
    """The pairs of an archive made by `keep_pairs`, checked against the codec of this run.

    Raises:
        FileNotFoundError: no such archive.
        ValueError: not such an archive, or its ids come from another codec.
    """
    kept = Path(kept)
    if not kept.is_file():
        raise FileNotFoundError(f"{kept} does not exist: pass an archive written by tools/keep-pairs.py, "
                                "or leave out --pairs-from to speak and encode every text")
    with gzip.open(kept, "rt", encoding="utf-8") as f:
        try:
            header = json.loads(f.readline())
        except (json.JSONDecodeError, OSError) as err:
            raise ValueError(f"{kept} is not a kept-pairs archive (tools/keep-pairs.py writes them)") from err
        if not isinstance(header, dict) or header.get("format") != KEPT_PAIRS_FORMAT:
            raise ValueError(f"{kept} is not a kept-pairs archive (tools/keep-pairs.py writes them)")
        if header.get("codec_sha256") != fingerprint:
            raise ValueError(f"{kept} was encoded by another codec than this run's (its ids would mean other "
                             "sounds): pass the codec it was made with, or leave out --pairs-from")
        return [SpeechPair(**json.loads(line)) for line in f if line.strip()]


def seed_pairs(pairs_path: Path, kept: Path, fingerprint: str) -> int:
    """Append the kept pairs a run's `pairs.jsonl` lacks; returns how many were added.

    `build_pairs` then speaks only texts the archive does not have.
    """
    have = {(p.text, p.split) for p in read_pairs(pairs_path)}
    new = [p for p in read_kept_pairs(kept, fingerprint) if (p.text, p.split) not in have]
    with open_to_append(pairs_path) as f:
        f.writelines(pair_line(pair) for pair in new)
    logger.info("%s: %d kept pairs added from %s", pairs_path, len(new), kept)
    return len(new)
