"""Stage 2: connect the stage-1 encoder to the frozen LLM through the adapter.

Encoder + adapter + the `transcribe` task embedding are trained so that the frozen LLM,
given `<|im_end|>` + user prefix + task vector + the audio vectors + assistant suffix, writes
the transcript (loss on the transcript tokens and the closing `<|im_end|>` only). The encoder
runs under the deployed streaming mask, so the vectors are those the engine computes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from quantized_models.llm import ChatLayout
from training.common import RESULT_NAME, LoopConfig, batch_rng, config_record, train_loop
from training.features import Utterance, load_train_utterances
from training.llm_sequence import VECTORS_PER_CHUNK, TurnItem, TurnLayout, load_frozen_llm
from training.model_config import (
    DEFAULT_ROLE,
    TRANSCRIBE_TASK_ID,
    AudioLlmParts,
    cmvn_tensors,
    load_result,
    save_result,
    with_llm,
)
from training.stage1_encoder import freq_mask, pad_chunks, time_mask

logger = logging.getLogger(__name__)

TEXT_KINDS = ("statement", "question", "nonquery")


@dataclass(frozen=True)
class Stage2Config:
    """Stage-2 settings."""

    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=1500, lr=5e-4, warmup_steps=100))
    batch_utterances: int = 4
    max_text_tokens: int = 48
    """Transcripts are cut to this many tokens (no closing `<|im_end|>` then)."""
    train_limit: int | None = None
    valid_limit: int = 50
    encoder_frozen_steps: int = 0
    """For the first N steps only the adapter and the task vector learn (the encoder runs without
    gradients, and faster): a fresh adapter's first gradients would otherwise flow into the
    stage-1 encoder and undo part of its CTC training."""
    extra_data: tuple[Path, ...] = ()
    """More data directories whose train splits are added, less the texts `data_dir` holds out."""
    freq_mask_bins: int = 0
    """SpecAugment in stage 2: one frequency mask of up to this many mel bins per utterance."""
    time_masks: int = 0
    """SpecAugment in stage 2: this many time masks per utterance ..."""
    time_mask_frames: int = 10
    """... each of up to this many fbank frames (10 ms each)."""
    speed_factors: tuple[float, ...] = ()
    """Extra copies of `data_dir`'s train utterances played this many times as fast (pitch and
    tempo together; `training.features.speed_perturbed`), for voices outside the training range."""


def answer_role(data_dir: Path) -> str:
    """The system role the data's answers were written under (meta.json), else the default."""
    meta = data_dir / "meta.json"
    if meta.is_file():
        role = json.loads(meta.read_text()).get("answer_system_role")
        if role:
            return str(role)
    return DEFAULT_ROLE


def target_ids(tokenizer, text: str, end_id: int, limit: int) -> list[int]:
    """Tokens of `text` plus `end_id`, or the first `limit` tokens without it when longer."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[:limit] if len(ids) > limit else [*ids, end_id]


def init_like_tokens(weight: Tensor, table: Tensor, gen: torch.Generator) -> None:
    """Start trained vectors as copies of random token embeddings (the LLM's input scale)."""
    rows = torch.randint(0, table.shape[0], (weight.shape[0],), generator=gen)
    with torch.no_grad():
        weight.copy_(table[rows])


def audio_vectors(parts: AudioLlmParts, utts: list[Utterance], encoder_grad: bool = True) -> list[Tensor]:
    """Per utterance [2 N, H] adapter vectors, as the engine's streaming steps compute them."""
    return padded_audio_vectors(parts, *pad_chunks(utts), encoder_grad)


def padded_audio_vectors(parts: AudioLlmParts, chunks: Tensor, counts: Tensor,
                         encoder_grad: bool = True) -> list[Tensor]:
    """`audio_vectors` of a padded batch ([B, N_max, 19, M] chunks, [B] chunk counts)."""
    device = parts.device
    chunks = chunks.to(device)
    positions, visible = parts.encoder.offline_positions(chunks.shape[1], device)
    with torch.set_grad_enabled(encoder_grad and torch.is_grad_enabled()):
        enc = parts.encoder.forward_masked(chunks, positions, visible)  # [B, 4 N, D]
    vectors = parts.adapter.forward_full(enc)  # [B, 2 N, H]
    return [vectors[i, : VECTORS_PER_CHUNK * int(n)] for i, n in enumerate(counts)]


def augmented(utts: list[Utterance], mean: Tensor, config: Stage2Config,
              rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """The padded batch (`pad_chunks`) with SpecAugment's masks drawn from `rng` (none when both
    are off)."""
    chunks, counts = pad_chunks(utts)
    if config.freq_mask_bins > 0:
        chunks = freq_mask(chunks, mean, config.freq_mask_bins, rng)
    if config.time_masks > 0:
        chunks = time_mask(chunks, counts, mean, config.time_masks, config.time_mask_frames, rng)
    for i, n in enumerate(counts.tolist()):
        chunks[i, n:] = 0.0  # the frequency mask filled padding too; the adapter's BatchNorm sees it
    return chunks, counts


def build_stage2(init: Path, data_dir: Path, llm_dir: Path, seed: int,
                 device: torch.device = torch.device("cpu")):
    """(parts, previous, causal_lm, tokenizer, turns): the previous stage's modules (fresh LLM-side
    ones after stage 1) and the frozen LLM, all on `device`."""
    previous = load_result(init)
    causal_lm, tokenizer = load_frozen_llm(llm_dir)
    cfg = previous["train_yaml"]
    if "model_conf" not in cfg:
        cfg = with_llm(cfg, int(causal_lm.config.hidden_size), answer_role(data_dir))
    parts = AudioLlmParts.build(cfg, previous["cmvn"])
    parts.load_released(previous["state"])
    if previous["stage"] < 2:
        gen = torch.Generator().manual_seed(seed)
        table = causal_lm.get_input_embeddings().weight
        init_like_tokens(parts.heads.task_embeddings.weight, table, gen)
        init_like_tokens(parts.heads.prompt_embeddings.weight, table, gen)
    parts.to(device)
    causal_lm.to(device)
    layout = ChatLayout.from_template(cfg["model_conf"]["chat_template"], tokenizer)
    return parts, previous, causal_lm, tokenizer, TurnLayout(causal_lm, tokenizer, layout)


def transcribe_items(parts: AudioLlmParts, padded: tuple[Tensor, Tensor], targets: list[list[int]],
                     encoder_grad: bool = True) -> list[TurnItem]:
    """Transcription turns of a padded batch (`augmented`)."""
    lead = parts.heads.task_embeddings.weight[TRANSCRIBE_TASK_ID:TRANSCRIBE_TASK_ID + 1]  # [1, H]
    vectors = padded_audio_vectors(parts, *padded, encoder_grad)
    return [TurnItem(audio=v, lead=lead, answer_ids=t) for v, t in zip(vectors, targets)]


def train_stage2(init: Path, data_dir: Path, llm_dir: Path, run_dir: Path, config: Stage2Config) -> dict:
    """Train encoder + adapter + transcribe vector; writes `run_dir/result.pt`."""
    torch.manual_seed(config.loop.seed)
    parts, previous, causal_lm, tokenizer, turns = build_stage2(init, data_dir, llm_dir, config.loop.seed,
                                                                config.loop.torch_device)
    train = [u for u in load_train_utterances(data_dir, TEXT_KINDS, config.extra_data, config.train_limit,
                                              config.speed_factors) if u.entry.text]
    train.sort(key=lambda u: u.chunks.shape[0])
    end_id = turns.layout.end_of_turn_id
    targets = [target_ids(tokenizer, u.entry.text, end_id, config.max_text_tokens) for u in train]
    for param in parts.heads.parameters():
        param.requires_grad_(False)
    parts.heads.task_embeddings.weight.requires_grad_(True)  # only its `transcribe` row gets gradients
    size = min(config.batch_utterances, len(train))
    mean, _ = cmvn_tensors(previous["cmvn"])
    logger.info("stage 2: %d utterances, LLM width %d", len(train), causal_lm.config.hidden_size)

    def step_fn(step: int) -> tuple[Tensor, dict[str, float]]:
        rng = batch_rng(config.loop.seed, step)
        start = int(rng.integers(0, len(train) - size + 1))
        index = range(start, start + size)
        padded = augmented([train[i] for i in index], mean, config, rng)
        batch = turns.lay_out(transcribe_items(parts, padded, [targets[i] for i in index],
                                               encoder_grad=step >= config.encoder_frozen_steps))
        loss = turns.token_loss(turns.hidden(batch), batch)
        return loss, {"text_loss": loss.item()}

    modules = {"encoder": parts.encoder, "adapter": parts.adapter, "heads": parts.heads}
    result = train_loop(run_dir, modules, step_fn, config.loop, frozen=[causal_lm],
                        title="stage 2: transcript loss")
    summary = {"steps": result.step, "finished": result.finished, "seconds": round(result.seconds, 1),
               "train_utterances": len(train),
               "train_audio_s": round(sum(u.entry.num_samples for u in train) / 16000, 1)}
    if result.finished:
        summary["final_text_loss"] = round(result.last_metrics.get("text_loss", float("nan")), 4)
        save_result(run_dir / RESULT_NAME, 2, parts, previous["cmvn"],
                    {"config": config_record(config), "summary": summary})
    logger.info("stage 2: %s", summary)
    return summary
