"""Utterances as the engine sees them: 160 ms feature chunks, chunk labels, CMVN, characters.

`utterance_chunks` computes in one pass exactly the 19-row chunks that the engine's streaming
front end (`frontend_step` from a fresh cache) produces chunk by chunk, so every stage trains
on the features it will be served.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path

import numpy as np
import soundfile
import torch
from torch import Tensor

from quantized_models.frontend import (
    CARRY_SAMPLES,
    CHUNK_FEATURE_ROWS,
    CHUNK_NEW_FRAMES,
    CHUNK_OVERLAP_FRAMES,
    CHUNK_SAMPLES,
    INT16_SCALE,
    SAMPLE_RATE_HZ,
    kaldi_fbank,
)
from training.data.manifest import ManifestEntry, read_manifest
from training.data.texts import dedup_key, held_out_keys

N_MELS = 80  # the released front end's mel bins (train.yaml input_dim)


class ChunkLabel(IntEnum):
    """State-head target of one chunk (spec §5; the engine's StateLabel order)."""

    CONTINUE = 0
    RESPOND = 1
    IGNORE = 2


def load_wav(path: Path) -> np.ndarray:
    """[S] float32 samples in ±1 of a 16 kHz mono wav."""
    samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE_HZ:
        raise ValueError(f"{path}: {rate} Hz; the training data must be {SAMPLE_RATE_HZ} Hz")
    return samples.mean(axis=1)


def n_chunks(num_samples: int) -> int:
    """160 ms chunks an utterance occupies (the last one zero-padded)."""
    return max(1, -(-num_samples // CHUNK_SAMPLES))


def utterance_chunks(samples: np.ndarray | Tensor, n_mels: int = N_MELS) -> Tensor:
    """Feature chunks of a fresh stream, equal to successive `frontend_step` calls.

    Args:
        samples: [S] waveform in ±1 (zero-padded here to whole chunks).
        n_mels: mel bins.

    Returns:
        [N, 19, n_mels] float32, N = n_chunks(S).
    """
    x = torch.as_tensor(samples, dtype=torch.float32)
    n = n_chunks(x.shape[0])
    # The streaming front end starts with CARRY_SAMPLES zero samples and 3 zero feature rows.
    padded = torch.zeros(CARRY_SAMPLES + n * CHUNK_SAMPLES)
    padded[CARRY_SAMPLES:CARRY_SAMPLES + x.shape[0]] = x
    rows = kaldi_fbank(padded * INT16_SCALE, n_mels)  # [16 N, M]
    rows = torch.cat([torch.zeros(CHUNK_OVERLAP_FRAMES, n_mels), rows])  # [16 N + 3, M]
    chunks = rows.unfold(0, CHUNK_FEATURE_ROWS, CHUNK_NEW_FRAMES)  # [N, M, 19]
    return chunks.transpose(1, 2).contiguous()  # [N, 19, M]


def chunk_labels(entry: ManifestEntry, tail_chunks: int = 0) -> list[int]:
    """Per-chunk state targets: 0 everywhere, the utterance's last chunk 1 (question) or 2.

    Mid-utterance pauses stay 0. `tail_chunks` silent chunks appended after the utterance
    (see `with_tail`) carry the end label too, so a model that decides one chunk late is
    still taught the right answer. Statements are not dialogue turns and get no end label.
    """
    end = {"question": ChunkLabel.RESPOND, "nonquery": ChunkLabel.IGNORE}.get(entry.kind)
    if end is None:
        raise ValueError(f"{entry.id}: kind {entry.kind!r} has no state label (question/nonquery only)")
    labels = [int(ChunkLabel.CONTINUE)] * n_chunks(entry.num_samples)
    labels[-1] = int(end)
    return labels + [int(end)] * tail_chunks


def with_tail(samples: np.ndarray, tail_chunks: int) -> np.ndarray:
    """Pad to whole chunks and append `tail_chunks` chunks of silence."""
    total = (n_chunks(samples.shape[0]) + tail_chunks) * CHUNK_SAMPLES
    return np.pad(samples, (0, total - samples.shape[0]))


@dataclass
class Utterance:
    """One manifest entry with its features loaded."""

    entry: ManifestEntry
    chunks: Tensor
    """[N, 19, n_mels] raw log-mel chunks (CMVN is applied inside the encoder)."""


def speed_perturbed(samples: np.ndarray, entry: ManifestEntry, speed: float) -> tuple[np.ndarray, ManifestEntry]:
    """The utterance played `speed` times as fast (tempo and pitch together, as a tape would), with
    its entry's length and pause spans scaled to match; speed 1 returns both unchanged.

    Resampling from `speed` x 16 kHz to 16 kHz keeps the voice but moves its pitch and rate, a cheap
    stand-in for speakers outside the training voices' range."""
    if speed == 1.0:
        return samples, entry
    from audio_io.resample import resample

    out = resample(samples, round(SAMPLE_RATE_HZ * speed), SAMPLE_RATE_HZ).astype(np.float32)  # checks the rate
    spans = [[int(start / speed), int(end / speed)] for start, end in entry.pause_spans]
    return out, replace(entry, id=f"{entry.id}@speed{speed:g}", num_samples=int(out.shape[0]), pause_spans=spans)


def check_speed_factors(factors: tuple[float, ...]) -> None:
    """Refuse `--speed-perturb` factors that are not positive, or are 1 (the unperturbed
    utterances are always in; a copy at 1 would only repeat them)."""
    if any(f <= 0 or f == 1.0 for f in factors):
        raise ValueError(f"--speed-perturb {list(factors)}: every factor must be positive and not 1 "
                         "(the unperturbed utterances are always in), e.g. 0.9 1.1")


def load_utterances(data_dir: Path, split: str, kinds: tuple[str, ...],
                    limit: int | None = None, tail_chunks: int = 0,
                    excluded_keys: frozenset[str] = frozenset(), speed: float = 1.0) -> list[Utterance]:
    """Features of every entry of `split` whose kind is in `kinds` (first `limit` ones), leaving
    out entries whose text's dedup key is in `excluded_keys`; `speed` != 1 speed-perturbs each
    (`speed_perturbed`)."""
    entries = [e for e in read_manifest(data_dir, split)
               if e.kind in kinds and dedup_key(e.text) not in excluded_keys]
    if limit is not None:
        entries = entries[:limit]
    utts = []
    for e in entries:
        samples, entry = speed_perturbed(load_wav(data_dir / e.wav), e, speed)
        utts.append(Utterance(entry, utterance_chunks(with_tail(samples, tail_chunks))))
    return utts


def _texts_by_split(data_dir: Path) -> dict[str, list[str]]:
    return {split: [e.text for e in read_manifest(data_dir, split)] for split in ("train", "valid", "test")}


def held_out_texts(data_dir: Path) -> frozenset[str]:
    """Dedup keys of the texts `data_dir` keeps for valid or test (and not for train): another
    data directory's train split must not bring them into training."""
    own = _texts_by_split(data_dir)
    return held_out_keys(own["train"], own["valid"] + own["test"])


def trained_texts(data_dir: Path) -> frozenset[str]:
    """Dedup keys of the texts `data_dir` trains on (and never holds out): another data
    directory's valid split must not bring them into a choice made on held-out texts."""
    own = _texts_by_split(data_dir)
    return held_out_keys(own["valid"] + own["test"], own["train"])


def load_train_utterances(data_dir: Path, kinds: tuple[str, ...], extra_data: tuple[Path, ...] = (),
                          limit: int | None = None, speed_factors: tuple[float, ...] = (),
                          tail_chunks: int = 0) -> list[Utterance]:
    """`data_dir`'s train split (first `limit`), a copy of it played at each of `speed_factors`
    (`speed_perturbed`), then the train splits of `extra_data` (other seeds of `train data`: new
    texts, voices and noise) less every text `data_dir` holds out; each with `tail_chunks` silent
    chunks after it."""
    check_speed_factors(speed_factors)
    utts = load_utterances(data_dir, "train", kinds, limit, tail_chunks)
    for speed in speed_factors:
        utts += load_utterances(data_dir, "train", kinds, limit, tail_chunks, speed=speed)
    excluded = held_out_texts(data_dir) if extra_data else frozenset()
    for extra in extra_data:
        utts += load_utterances(extra, "train", kinds, tail_chunks=tail_chunks, excluded_keys=excluded)
    return utts


def cmvn_stats(utterances: list[Utterance]) -> dict[str, list[float] | float]:
    """JSON `global_cmvn` statistics (sums over every fresh feature row of the utterances)."""
    rows = torch.cat([u.chunks[:, CHUNK_OVERLAP_FRAMES:].reshape(-1, u.chunks.shape[-1])
                      for u in utterances]).double()  # [F, M]
    return {"mean_stat": rows.sum(0).tolist(), "var_stat": (rows * rows).sum(0).tolist(),
            "frame_num": float(rows.shape[0])}


def write_cmvn(stats: dict, path: Path) -> None:
    path.write_text(json.dumps(stats))


class CharVocab:
    """CTC output symbols of stage 1: blank, space, apostrophe, a-z and digits."""

    BLANK = 0
    SYMBOLS = " '" + "abcdefghijklmnopqrstuvwxyz" + "0123456789"

    def __init__(self) -> None:
        self.index = {c: i + 1 for i, c in enumerate(self.SYMBOLS)}

    def __len__(self) -> int:
        return len(self.SYMBOLS) + 1

    def encode(self, text: str) -> list[int]:
        """Lower-cased symbols of `text`; other characters dropped, spaces collapsed."""
        words = "".join(c if c in self.index else " " for c in text.lower()).split()
        return [self.index[c] for c in " ".join(words)]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.SYMBOLS[i - 1] for i in ids if i != self.BLANK)

    def greedy(self, best: list[int]) -> str:
        """CTC greedy decoding: collapse repeats, drop blanks."""
        out, previous = [], None
        for i in best:
            if i != previous and i != self.BLANK:
                out.append(i)
            previous = i
        return self.decode(out)
