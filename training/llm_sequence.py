"""Teacher-forced frozen-LLM passes laid out exactly like the engine's streaming calls.

One training sequence is what the engine feeds over a fresh session, concatenated:
system header + role (`prefill_system`), then `<|im_end|>` + user prefix + lead vectors +
adapter vectors (`listen`; the lead is the prompt embeddings for dialogue or the `transcribe`
task embedding for transcription), then, for an answered turn, the assistant suffix and the
answer tokens (`start_answer` / `feed_token`). Because the LLM is causal, the hidden state at
the last adapter vector of chunk k equals the engine's hidden state after its k-th `listen`,
which is what the state head is trained on.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantized_models.adapter import DOWNSAMPLE_STRIDE
from quantized_models.errors import ModelLoadError
from quantized_models.llm import AudioLlmHeads, ChatLayout, run_trunk

VECTORS_PER_CHUNK = 4 // DOWNSAMPLE_STRIDE  # 4 encoder frames per chunk -> 2 adapter vectors


def load_frozen_llm(llm_dir: Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(causal LM in eval mode with no trainable parameter, tokenizer), local files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(llm_dir) / "config.json").is_file():
        raise ModelLoadError(f"{llm_dir} is not a Hugging Face model directory (no config.json)")
    causal_lm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    causal_lm.eval()
    for param in causal_lm.parameters():
        param.requires_grad_(False)
    return causal_lm, tokenizer


@dataclass
class TurnItem:
    """One user turn to lay out.

    Attributes:
        audio: [2 * chunks, H] adapter vectors of the turn.
        lead: [n, H] vectors between the user prefix and the audio (prompts or task row).
        answer_ids: target tokens after the assistant suffix, the closing end-of-turn id
            included when the answer is whole; None: the sequence stops after the audio
            (a turn that gets no answer).
        chunk_labels: state target per chunk, or None for no state loss.
    """

    audio: Tensor
    lead: Tensor
    answer_ids: list[int] | None = None
    chunk_labels: list[int] | None = None


@dataclass
class LaidOutBatch:
    """Right-padded input embeddings and where the losses read the hidden states."""

    embeds: Tensor
    """[B, L, H] after the system prefix (zeros after each sequence's end)."""
    token_rows: Tensor
    """[K, 2] (batch row, position) whose hidden state predicts `token_targets`."""
    token_targets: Tensor
    """[K] target token ids."""
    state_rows: Tensor
    """[S, 2] (batch row, position) of every chunk's last adapter vector."""
    state_targets: Tensor
    """[S] chunk labels."""
    lengths: list[int] = field(default_factory=list)


class TurnLayout:
    """Token ids of the fixed parts and the frozen embedding table."""

    def __init__(self, causal_lm: nn.Module, tokenizer: Any, layout: ChatLayout,
                 role: str | None = None) -> None:
        self.causal_lm = causal_lm
        self.layout = layout
        text_role = layout.default_role if role is None else role
        # One string, as `FrozenLlm.prefill_system` tokenizes it, so the BPE merges match.
        self.system_ids = tokenizer.encode(layout.system_header + text_role, add_special_tokens=False)
        self.opening_ids = [layout.end_of_turn_id, *layout.user_prefix_ids]
        self.suffix_ids = list(layout.assistant_suffix_ids)
        self._system_cache: Any = None

    def embed(self, ids: list[int]) -> Tensor:
        table = self.causal_lm.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long, device=table.weight.device))  # [n, H]

    def lay_out(self, items: list[TurnItem]) -> LaidOutBatch:
        """Concatenate and right-pad every item's sequence (see the module docstring)."""
        sequences, token_rows, token_targets, state_rows, state_targets = [], [], [], [], []
        head = self.embed(self.opening_ids)  # [h, H]; the system part is a shared cached prefix
        for row, item in enumerate(items):
            parts = [head, item.lead.to(head.dtype), item.audio.to(head.dtype)]
            audio_start = head.shape[0] + item.lead.shape[0]
            if item.chunk_labels is not None:
                n = item.audio.shape[0] // VECTORS_PER_CHUNK
                if len(item.chunk_labels) != n:
                    raise ValueError(f"{len(item.chunk_labels)} chunk labels for {n} chunks")
                for k, label in enumerate(item.chunk_labels):
                    state_rows.append((row, audio_start + VECTORS_PER_CHUNK * (k + 1) - 1))
                    state_targets.append(label)
            if item.answer_ids is not None:
                targets = list(item.answer_ids)
                # The last suffix position predicts the first answer token, and so on.
                first = audio_start + item.audio.shape[0] + len(self.suffix_ids) - 1
                parts += [self.embed(self.suffix_ids), self.embed(targets[:-1])]
                token_rows += [(row, first + j) for j in range(len(targets))]
                token_targets += targets
            sequences.append(torch.cat(parts))
        lengths = [s.shape[0] for s in sequences]
        device = head.device
        embeds = torch.zeros(len(items), max(lengths), head.shape[1], dtype=head.dtype, device=device)
        for row, seq in enumerate(sequences):
            embeds[row, : seq.shape[0]] = seq
        longs = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return LaidOutBatch(embeds, longs(token_rows).reshape(-1, 2), longs(token_targets),
                            longs(state_rows).reshape(-1, 2), longs(state_targets), lengths)

    def _system_prefix(self, rows: int) -> Any:
        """KV cache of the system header + role (as `prefill_system` leaves it), for `rows` rows."""
        if self._system_cache is None:
            with torch.no_grad():
                system = self.embed(self.system_ids).unsqueeze(0)  # [1, s, H]
                _, self._system_cache = run_trunk(self.causal_lm.model, system, None)
        cache = copy.deepcopy(self._system_cache)
        cache.batch_repeat_interleave(rows)
        return cache

    def hidden(self, batch: LaidOutBatch) -> Tensor:
        """[B, L, H] last hidden states (after the final norm, as the engine reads them).

        The system prefix is computed once and its KV cache reused by every batch.
        """
        # Right padding needs no mask: causal attention never lets a real position see it.
        prefix = self._system_prefix(batch.embeds.shape[0])
        hidden, _ = run_trunk(self.causal_lm.model, batch.embeds, prefix)
        return hidden

    def token_loss(self, hidden: Tensor, batch: LaidOutBatch) -> Tensor:
        """Mean cross-entropy of the target tokens (the LM head only at those positions)."""
        picked = hidden[batch.token_rows[:, 0], batch.token_rows[:, 1]]  # [K, H]
        logits = self.causal_lm.get_output_embeddings()(picked)  # [K, V]
        return nn.functional.cross_entropy(logits.float(), batch.token_targets)

    @staticmethod
    def state_logits(hidden: Tensor, batch: LaidOutBatch, heads: AudioLlmHeads) -> Tensor:
        """[S, C] state-head logits at the last adapter vector of every chunk."""
        picked = hidden[batch.state_rows[:, 0], batch.state_rows[:, 1]]  # [S, H]
        return heads.predictor_head(picked)


def state_loss(logits: Tensor, targets: Tensor, weights: Tensor | None = None) -> Tensor:
    """Cross-entropy over the first three classes, the ones the engine's softmax reads."""
    return nn.functional.cross_entropy(logits[:, :3].float(), targets, weight=weights)
