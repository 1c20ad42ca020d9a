"""Stage 1: the streaming speech encoder trained as chunk-wise CTC ASR over characters.

The encoder is the library's `SpeechEncoder` (so the engine loads the weights unchanged) with a
linear CTC head on top that is not exported. Dynamic chunk training (spec §11.2, wenet): each
batch draws its attention mask — the deployed streaming mask (chunk 4, 16 left chunks, the
engine's own positions) half of the time, otherwise a random chunk of 4–32 frames with random
or unlimited left context, and now and then full context.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from quantized_models.encoder import SpeechEncoder
from quantized_models.frontend import CHUNK_NEW_FRAMES
from training.common import RESULT_NAME, LoopConfig, batch_rng, train_loop
from training.features import CharVocab, Utterance, cmvn_stats, load_utterances
from training.model_config import (
    AudioLlmParts,
    EncoderGeometry,
    cmvn_tensors,
    encoder_train_yaml,
    save_result,
)

logger = logging.getLogger(__name__)

ASR_KINDS = ("statement", "question", "nonquery")
MAX_DYNAMIC_CHUNKS = 8  # dynamic masks use chunks of 1..8 encoder chunks (4..32 frames)


@dataclass(frozen=True)
class Stage1Config:
    """Stage-1 settings."""

    geometry: EncoderGeometry = field(default_factory=EncoderGeometry)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=3000, lr=1e-3, warmup_steps=300))
    batch_utterances: int = 16
    """Utterances per step (drawn among neighbours in length, to limit padding)."""
    streaming_mask_share: float = 0.5
    """Share of batches trained with exactly the deployed streaming mask."""
    full_context_share: float = 0.1
    """Share of batches with full (bidirectional) context."""
    freq_mask_bins: int = 10
    """SpecAugment: one frequency mask of up to this many bins (the released recipe)."""
    train_limit: int | None = None
    """Use only the first N training utterances (None: all)."""
    valid_limit: int = 100
    """Validation utterances for the character error rate at the end."""


class CtcModel(nn.Module):
    """Encoder plus the CTC projection used only for stage-1 training."""

    def __init__(self, encoder: SpeechEncoder, vocab_size: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.ctc_head = nn.Linear(encoder.dims.model_dim, vocab_size)

    def log_probs(self, chunks: Tensor, positions: Tensor, visible: Tensor) -> Tensor:
        """[B, N, 19, M] chunks -> [B, T, V] log-probabilities."""
        logits = self.ctc_head(self.encoder.forward_masked(chunks, positions, visible))
        return logits.float().log_softmax(-1)  # float32 even under bf16 autocast: CTC sums many


def pad_chunks(utts: list[Utterance]) -> tuple[Tensor, Tensor]:
    """([B, N_max, 19, M] zero-padded chunks, [B] chunk counts)."""
    counts = torch.tensor([u.chunks.shape[0] for u in utts])
    out = torch.zeros(len(utts), int(counts.max()), *utts[0].chunks.shape[1:])
    for i, u in enumerate(utts):
        out[i, : u.chunks.shape[0]] = u.chunks
    return out, counts


def chunk_mask(n_frames: int, chunk_frames: int, left_chunks: int | None) -> tuple[Tensor, Tensor]:
    """(positions [T, T], visible [T, T]): chunk-causal attention with absolute key positions."""
    chunk = torch.arange(n_frames) // chunk_frames  # [T]
    visible = chunk.unsqueeze(0) <= chunk.unsqueeze(1)  # key chunk <= query chunk
    if left_chunks is not None:
        visible &= chunk.unsqueeze(0) >= chunk.unsqueeze(1) - left_chunks
    positions = torch.arange(n_frames).expand(n_frames, n_frames)
    return positions, visible


def draw_mask(encoder: SpeechEncoder, rng: np.random.Generator, counts: Tensor,
              config: Stage1Config) -> tuple[Tensor, Tensor, str]:
    """One batch's (positions, visible, kind) under dynamic chunk training."""
    c = encoder.dims.chunk_frames
    n = int(counts.max())
    draw = rng.random()
    if draw < config.streaming_mask_share:
        positions, visible = encoder.offline_positions(n, torch.device("cpu"))
        return positions, visible, "streaming"
    if draw < config.streaming_mask_share + config.full_context_share:
        valid = torch.arange(n * c).unsqueeze(0) < (counts * c).unsqueeze(1)  # [B, T]
        positions = torch.arange(n * c).expand(n * c, n * c)
        return positions, valid[:, None, None, :], "full"  # padding keys hidden, [B, 1, 1, T]
    left = None if rng.random() < 0.25 else int(rng.integers(1, encoder.dims.left_chunks + 1))
    positions, visible = chunk_mask(n * c, c * int(rng.integers(1, MAX_DYNAMIC_CHUNKS + 1)), left)
    return positions, visible, "dynamic"


def freq_mask(chunks: Tensor, mean: Tensor, max_bins: int, rng: np.random.Generator) -> Tensor:
    """SpecAugment frequency mask per utterance, filled with the CMVN mean (normalised to 0)."""
    out = chunks.clone()
    for i in range(out.shape[0]):
        width = int(rng.integers(0, max_bins + 1))
        start = int(rng.integers(0, out.shape[-1] - width + 1))
        out[i, ..., start:start + width] = mean[start:start + width]
    return out


def time_mask(chunks: Tensor, counts: Tensor, mean: Tensor, masks: int, max_frames: int,
              rng: np.random.Generator) -> Tensor:
    """SpecAugment time masks: per utterance `masks` runs of up to `max_frames` fbank frames set to
    the CMVN mean. Chunks overlap (19 rows, 16 new per chunk), so a frame is masked in every
    chunk that holds it, as if the mask had been applied to the waveform's frames."""
    out = chunks.clone()
    rows = chunks.shape[2]
    frame = CHUNK_NEW_FRAMES * torch.arange(chunks.shape[1])[:, None] + torch.arange(rows)[None, :]  # [N, 19]
    for i, count in enumerate(counts.tolist()):
        total = CHUNK_NEW_FRAMES * (count - 1) + rows
        hidden = torch.zeros_like(frame, dtype=torch.bool)
        for _ in range(masks):
            width = int(rng.integers(0, max_frames + 1))
            start = int(rng.integers(0, max(total - width, 0) + 1))
            hidden |= (frame >= start) & (frame < start + width)
        hidden[count:] = False  # padding stays zero
        out[i][hidden] = mean
    return out


class _Batches:
    """Length-sorted training set; a batch is a random run of neighbours."""

    def __init__(self, utts: list[Utterance], vocab: CharVocab, size: int) -> None:
        self.utts = sorted(utts, key=lambda u: u.chunks.shape[0])
        self.targets = [vocab.encode(u.entry.text) for u in self.utts]
        self.size = min(size, len(self.utts))

    def draw(self, rng: np.random.Generator) -> list[int]:
        start = int(rng.integers(0, len(self.utts) - self.size + 1))
        return list(range(start, start + self.size))


def ctc_loss(model: CtcModel, chunks: Tensor, counts: Tensor, targets: list[list[int]],
             positions: Tensor, visible: Tensor) -> Tensor:
    """Mean CTC loss per target symbol (utterances too short for their text count 0)."""
    log_probs = model.log_probs(chunks, positions, visible)  # [B, T, V]
    device = log_probs.device
    frames = counts.to(device) * model.encoder.dims.chunk_frames
    flat = torch.tensor([t for ts in targets for t in ts], dtype=torch.long, device=device)
    lengths = torch.tensor([len(t) for t in targets], device=device)
    return nn.functional.ctc_loss(log_probs.transpose(0, 1), flat, frames, lengths,
                                  blank=CharVocab.BLANK, zero_infinity=True)


@torch.no_grad()
def char_error_rate(model: CtcModel, utts: list[Utterance], vocab: CharVocab) -> float:
    """Greedy CTC character error rate under the deployed streaming mask."""
    errors = total = 0
    device = model.ctc_head.weight.device
    for u in utts:
        positions, visible = model.encoder.offline_positions(u.chunks.shape[0], device)
        best = model.log_probs(u.chunks.unsqueeze(0).to(device), positions, visible)[0].argmax(-1).tolist()
        ref = vocab.decode(vocab.encode(u.entry.text))
        errors += _edit_distance(vocab.greedy(best), ref)
        total += max(1, len(ref))
    return errors / max(1, total)


def _edit_distance(a: str | list, b: str | list) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def train_stage1(data_dir: Path, run_dir: Path, config: Stage1Config) -> dict:
    """Train the encoder with CTC; writes `run_dir/result.pt`. Returns a summary dict."""
    torch.manual_seed(config.loop.seed)
    vocab = CharVocab()
    train = load_utterances(data_dir, "train", ASR_KINDS, config.train_limit)
    valid = load_utterances(data_dir, "valid", ASR_KINDS, config.valid_limit)
    if not train:
        raise ValueError(f"{data_dir}: no training utterances")
    cmvn = cmvn_stats(train)
    parts = AudioLlmParts.build(encoder_train_yaml(config.geometry, len(vocab)), cmvn)
    model = CtcModel(parts.encoder, len(vocab))
    model.encoder.global_cmvn.requires_grad_(False)
    device = config.loop.torch_device
    model.to(device)
    batches = _Batches(train, vocab, config.batch_utterances)
    mean, _ = cmvn_tensors(cmvn)
    logger.info("stage 1: %d train / %d valid utterances, %d encoder parameters", len(train), len(valid),
                sum(p.numel() for p in model.encoder.parameters()))

    def step_fn(step: int) -> tuple[Tensor, dict[str, float]]:
        rng = batch_rng(config.loop.seed, step)
        index = batches.draw(rng)
        chunks, counts = pad_chunks([batches.utts[i] for i in index])
        chunks = freq_mask(chunks, mean, config.freq_mask_bins, rng)
        positions, visible, kind = draw_mask(model.encoder, rng, counts, config)  # built on the CPU
        loss = ctc_loss(model, chunks.to(device), counts, [batches.targets[i] for i in index],
                        positions.to(device), visible.to(device))
        return loss, {"ctc_loss": loss.item(), "streaming_mask": float(kind == "streaming")}

    result = train_loop(run_dir, {"ctc_model": model}, step_fn, config.loop, title="stage 1: CTC loss")
    summary = {"steps": result.step, "finished": result.finished, "seconds": round(result.seconds, 1),
               "train_utterances": len(train), "valid_utterances": len(valid),
               "train_audio_s": round(sum(u.entry.num_samples for u in train) / 16000, 1)}
    if result.finished:
        summary["valid_cer"] = round(char_error_rate(model, valid, vocab), 4) if valid else None
        save_result(run_dir / RESULT_NAME, 1, parts, cmvn,
                    {"ctc_head": model.ctc_head.state_dict(), "config": asdict(config), "summary": summary})
    logger.info("stage 1: %s", summary)
    return summary
