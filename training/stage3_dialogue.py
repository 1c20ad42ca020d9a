"""Stage 3: prompt embeddings for spoken dialogue, jointly with the chunk-level state head.

Encoder and adapter are frozen, so each utterance's adapter vectors are computed once. The
prompt vectors (inserted before every user turn's audio, spec §4.3) are trained on spoken
questions -> the frozen LLM's own answers (teacher forcing, loss on the answer tokens), and the
state head on chunk labels at the last adapter vector of each chunk (0 while the user talks or
pauses, 1 at the end of a question, 2 at the end of a non-query).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from training.common import RESULT_NAME, LoopConfig, batch_rng, config_record, freeze, train_loop
from training.features import ChunkLabel, Utterance, chunk_labels, load_train_utterances
from training.llm_sequence import LaidOutBatch, TurnItem, TurnLayout, state_loss
from training.model_config import AudioLlmParts, save_result
from training.stage2_connect import audio_vectors, build_stage2, target_ids

logger = logging.getLogger(__name__)

DIALOGUE_KINDS = ("question", "nonquery")


@dataclass(frozen=True)
class Stage3Config:
    """Stage-3 settings."""

    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=1000, lr=2e-3, warmup_steps=50))
    batch_utterances: int = 4
    max_answer_tokens: int = 32
    """Answers are cut to this many tokens (no closing `<|im_end|>` then)."""
    tail_chunks: int = 1
    """Silent chunks after each utterance, labelled like its last chunk (see `chunk_labels`)."""
    state_loss_weight: float = 1.0
    end_class_weight: float = 3.0
    """Cross-entropy weight of classes 1 and 2 (one chunk per turn) relative to class 0."""
    train_limit: int | None = None
    extra_data: tuple[Path, ...] = ()
    """More `train data` directories whose train turns are added (less the texts `--data` holds out)."""


@dataclass
class DialogueExample:
    """One precomputed training turn."""

    vectors: Tensor
    """[2 N, H] frozen adapter vectors (tail chunks included)."""
    labels: list[int]
    answer_ids: list[int] | None


def dialogue_item(parts: AudioLlmParts, example: DialogueExample) -> TurnItem:
    return TurnItem(audio=example.vectors, lead=parts.heads.prompt_embeddings.weight,
                    answer_ids=example.answer_ids, chunk_labels=example.labels)


def chunk_state_logits(parts: AudioLlmParts, turns: TurnLayout, utt_chunks: Tensor) -> Tensor:
    """[N, C] state logits of a fresh turn's chunks, computed in one training pass."""
    utt = Utterance(entry=None, chunks=utt_chunks)  # type: ignore[arg-type]
    vectors = audio_vectors(parts, [utt])[0]
    batch = turns.lay_out([TurnItem(audio=vectors, lead=parts.heads.prompt_embeddings.weight,
                                    chunk_labels=[0] * utt_chunks.shape[0])])
    return turns.state_logits(turns.hidden(batch), batch, parts.heads)


@torch.no_grad()
def precompute(parts: AudioLlmParts, utts: list[Utterance], tokenizer, end_id: int,
               config: Stage3Config) -> list[DialogueExample]:
    out = []
    for u in utts:
        vectors = audio_vectors(parts, [u])[0]
        answer = None
        if u.entry.kind == "question" and u.entry.answer:
            answer = target_ids(tokenizer, u.entry.answer, end_id, config.max_answer_tokens)
        out.append(DialogueExample(vectors, chunk_labels(u.entry, config.tail_chunks), answer))
    return out


def _losses(parts: AudioLlmParts, turns: TurnLayout, batch: LaidOutBatch,
            config: Stage3Config) -> tuple[Tensor, dict[str, float]]:
    hidden = turns.hidden(batch)
    weights = torch.tensor([1.0, config.end_class_weight, config.end_class_weight], device=hidden.device)
    logits = turns.state_logits(hidden, batch, parts.heads)
    s_loss = state_loss(logits, batch.state_targets, weights)
    metrics = {"state_loss": s_loss.item()}
    loss = config.state_loss_weight * s_loss
    if batch.token_targets.numel():
        a_loss = turns.token_loss(hidden, batch)
        loss = loss + a_loss
        metrics["answer_loss"] = a_loss.item()
    end = batch.state_targets != ChunkLabel.CONTINUE
    metrics["end_acc"] = (logits[end, :3].argmax(-1) == batch.state_targets[end]).float().mean().item()
    return loss, metrics


def train_stage3(init: Path, data_dir: Path, llm_dir: Path, run_dir: Path, config: Stage3Config) -> dict:
    """Train prompt embeddings + state head; writes `run_dir/result.pt`."""
    torch.manual_seed(config.loop.seed)
    parts, previous, causal_lm, tokenizer, turns = build_stage2(init, data_dir, llm_dir, config.loop.seed,
                                                                config.loop.torch_device)
    if previous["stage"] < 2:
        raise ValueError(f"{init}: stage 3 starts from a stage-2 result (found stage {previous['stage']})")
    freeze(parts.encoder)
    freeze(parts.adapter)
    utts = load_train_utterances(data_dir, DIALOGUE_KINDS, config.extra_data, config.train_limit,
                                 tail_chunks=config.tail_chunks)
    examples = precompute(parts, utts, tokenizer, turns.layout.end_of_turn_id, config)
    for name, param in parts.heads.named_parameters():
        param.requires_grad_(name.startswith(("prompt_embeddings", "predictor_head")))
    size = min(config.batch_utterances, len(examples))
    logger.info("stage 3: %d turns (%d answered)", len(examples),
                sum(e.answer_ids is not None for e in examples))

    def step_fn(step: int) -> tuple[Tensor, dict[str, float]]:
        index = batch_rng(config.loop.seed, step).choice(len(examples), size, replace=False)
        batch = turns.lay_out([dialogue_item(parts, examples[i]) for i in index])
        return _losses(parts, turns, batch, config)

    result = train_loop(run_dir, {"heads": parts.heads}, step_fn, config.loop,
                        frozen=[causal_lm, parts.encoder, parts.adapter],
                        title="stage 3: answer + state loss")
    summary = {"steps": result.step, "finished": result.finished, "seconds": round(result.seconds, 1),
               "train_turns": len(examples),
               "train_audio_s": round(sum(u.entry.num_samples for u in utts) / 16000, 1)}
    if result.finished:
        summary |= {k: round(v, 4) for k, v in result.last_metrics.items()}
        save_result(run_dir / RESULT_NAME, 3, parts, previous["cmvn"],
                    {"config": config_record(config), "summary": summary})
    logger.info("stage 3: %s", summary)
    return summary
