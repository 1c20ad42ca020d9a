"""Frozen text LLM wrapper: chat layout of Freeze-Omni, prompt embeddings and the state head.

The wrapped model is any Hugging Face causal LM whose trunk is reachable as `.model`
(Qwen2, Llama, SmolLM2 ...). Its weights are never modified. The pieces trained by
Freeze-Omni (`prompt_embeddings`, `predictor_head`, the unused `task_embeddings`) live
in `AudioLlmHeads`, whose state-dict keys equal those of `audiollm/final.pt`.

Spec §4: every user turn feeds `<eot>` + the user prefix tokens + the prompt vectors +
the first adapter vectors; later chunks feed only adapter vectors; speaking feeds the
assistant suffix tokens and then one sampled token per step.
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantized_models.errors import ModelLoadError

logger = logging.getLogger(__name__)

AUDIO_PLACEHOLDER = "<audio>"


@dataclass(frozen=True)
class AudioLlmDims:
    """Sizes of the trained LLM-side pieces, read from `audiollm/train.yaml`."""

    llm_embed_dim: int
    """Width of the frozen LLM's hidden states (3584 for Qwen2-7B)."""
    prompt_num: int
    """Number of trained prompt vectors inserted before every user turn's audio."""
    task_num: int
    """Rows of the (unused at inference) task embedding table."""
    state_classes: int
    """Outputs of the state head (4 in the release; only the first 3 are used)."""
    chat_template: str
    """Chat template with an `<audio>` placeholder for the user's speech."""

    @classmethod
    def from_train_yaml(cls, cfg: dict[str, Any], source: str) -> "AudioLlmDims":
        try:
            model_conf = cfg["model_conf"]
            dims = cls(
                llm_embed_dim=int(model_conf["llm_embed_dim"]),
                prompt_num=int(model_conf.get("prompt_num", 0)),
                task_num=int(model_conf.get("task_num", 0)),
                state_classes=int(model_conf["predict_usr_state"]),
                chat_template=str(model_conf["chat_template"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelLoadError(f"{source}: model_conf is missing or has a bad value: {err}") from err
        if dims.state_classes < 3:
            raise ModelLoadError(
                f"{source}: predict_usr_state={dims.state_classes}, but the dialogue needs at least "
                "3 state classes (continue, respond, ignore)"
            )
        if AUDIO_PLACEHOLDER not in dims.chat_template or "<|im_end|>" not in dims.chat_template:
            raise ModelLoadError(
                f"{source}: chat_template must contain '{AUDIO_PLACEHOLDER}' and '<|im_end|>'"
            )
        if model_conf.get("add_prompt_before", True) is not True:
            raise ModelLoadError(f"{source}: only add_prompt_before: true is supported")
        return dims


class AudioLlmHeads(nn.Module):
    """Trained additions around the frozen LLM; keys match `audiollm/final.pt`."""

    def __init__(self, dims: AudioLlmDims) -> None:
        super().__init__()
        self.task_embeddings = nn.Embedding(dims.task_num, dims.llm_embed_dim)
        self.prompt_embeddings = nn.Embedding(dims.prompt_num, dims.llm_embed_dim)
        self.predictor_head = nn.Linear(dims.llm_embed_dim, dims.state_classes)


@dataclass(frozen=True)
class ChatLayout:
    """Token ids of the fixed parts of the dialogue (spec §4.2–4.3)."""

    system_header: str
    """`<|im_start|>system\\n`: precedes the role text in the system prefill."""
    default_role: str
    """Role text of the template, used when no role is given."""
    end_of_turn_id: int
    """`<|im_end|>`: closes the previous turn at the start of a user turn; ends an answer."""
    user_prefix_ids: tuple[int, ...]
    """`\\n<|im_start|>user\\n`."""
    assistant_suffix_ids: tuple[int, ...]
    """`<|im_end|>\\n<|im_start|>assistant\\n`."""

    @classmethod
    def from_template(cls, template: str, tokenizer: Any) -> "ChatLayout":
        before_audio, after_audio = template.split(AUDIO_PLACEHOLDER, 1)
        system_part, user_prefix = before_audio.split("<|im_end|>", 1)
        header, _, role = system_part.partition("\n")
        end_ids = tokenizer.encode("<|im_end|>", add_special_tokens=False)
        if len(end_ids) != 1:
            raise ModelLoadError(
                "the tokenizer does not know '<|im_end|>' as a single token; "
                "this LLM does not use the ChatML layout the checkpoint was trained with"
            )
        return cls(
            system_header=header + "\n",
            default_role=role,
            end_of_turn_id=end_ids[0],
            user_prefix_ids=tuple(tokenizer.encode(user_prefix, add_special_tokens=False)),
            assistant_suffix_ids=tuple(tokenizer.encode(after_audio, add_special_tokens=False)),
        )


@dataclass
class LlmKvCache:
    """The session's LLM key/value cache (a transformers `DynamicCache`).

    Bounded by `FrozenLlm.max_context_tokens`: the engine checks `seq_length` before
    every call and refuses to grow past it.
    """

    past: Any = None
    """transformers Cache object, or None before the first call."""
    history_ids: list[int | None] = field(default_factory=list)
    """One entry per cached position: the token id, or None for a speech/prompt vector."""

    @property
    def seq_length(self) -> int:
        return 0 if self.past is None else int(self.past.get_seq_length())

    def crop(self, length: int) -> None:
        """Keep only the first `length` positions (used when an answer is cut)."""
        if self.past is not None and length < self.seq_length:
            # transformers 5 takes the (negative) number of positions to drop.
            self.past.crop(length - self.seq_length)
        del self.history_ids[length:]

    def reset(self) -> None:
        self.past = None
        self.history_ids.clear()


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which `model.forward` takes a KV cache.

    transformers 5.2x renamed `past_key_values` (argument and output) to `cache` and warns that
    5.40 drops the old name, while `setup.cfg` allows every 5.x: reading the model's own
    signature keeps both older and newer releases working.
    """
    return _cache_keyword_of(type(model))


@functools.cache
def _cache_keyword_of(model_type: type) -> str:  # once per class: the engine calls it every chunk
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def run_trunk(trunk: nn.Module, embeds: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
    """(last hidden states, KV cache) of `trunk(inputs_embeds=embeds)` after `past` (or none)."""
    kwargs = {} if past is None else {cache_keyword(trunk): past}
    out = trunk(inputs_embeds=embeds, use_cache=True, **kwargs)
    new_past = getattr(out, "cache", None)
    return out.last_hidden_state, out.past_key_values if new_past is None else new_past


class ContextFullError(RuntimeError):
    """The dialogue no longer fits the LLM's context window."""


class FrozenLlm(nn.Module):
    """A frozen causal LM plus Freeze-Omni's prompt vectors and state head.

    Args:
        causal_lm: a loaded Hugging Face causal LM (`.model` trunk, `.lm_head`).
        heads: the trained `AudioLlmHeads` (already loaded).
        layout: chat token ids.
    """

    def __init__(self, causal_lm: nn.Module, heads: AudioLlmHeads, layout: ChatLayout) -> None:
        super().__init__()
        self.causal_lm = causal_lm
        self.heads = heads
        self.layout = layout
        for param in self.causal_lm.parameters():
            param.requires_grad_(False)
        self.max_context_tokens = int(
            getattr(causal_lm.config, "max_position_embeddings", 32768)
        )

    @property
    def hidden_size(self) -> int:
        return int(self.heads.prompt_embeddings.embedding_dim)

    def embed_tokens(self, ids: list[int] | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Token embeddings [len(ids), H] from the LLM's own table."""
        table = self.causal_lm.get_input_embeddings()
        index = torch.tensor(list(ids), dtype=torch.long, device=like.device)
        return table(index).to(like.dtype)

    def _weight_like(self) -> torch.Tensor:
        return self.heads.prompt_embeddings.weight

    def run(
        self, embeds: torch.Tensor, cache: LlmKvCache, ids: list[int | None]
    ) -> torch.Tensor:
        """Feed `embeds` [T, H] after the cached context; returns last hidden states [T, H].

        The hidden states are taken after the trunk's final norm (spec §4.5).
        """
        new_len = cache.seq_length + embeds.shape[0]
        if new_len > self.max_context_tokens:
            raise ContextFullError(
                f"dialogue needs {new_len} positions but the LLM holds {self.max_context_tokens}"
            )
        if cache.past is None:
            from transformers import DynamicCache

            cache.past = DynamicCache(config=self.causal_lm.config)
        hidden, cache.past = run_trunk(self.causal_lm.model, embeds.unsqueeze(0), cache.past)  # (1, T, H)
        cache.history_ids.extend(ids)
        return hidden[0]  # (T, H)

    @torch.inference_mode()
    def prefill_system(self, role: str | None, tokenizer: Any, cache: LlmKvCache) -> list[int]:
        """Spec `pre`: `<|im_start|>system\\n` + role, without the closing `<|im_end|>`."""
        text_role = self.layout.default_role if role is None else role
        # Tokenized as one string, as the official code does, so BPE merges match.
        ids = tokenizer.encode(self.layout.system_header + text_role, add_special_tokens=False)
        self.run(self.embed_tokens(ids, self._weight_like()), cache, list(ids))
        return ids

    def user_turn_opening(self, like: torch.Tensor) -> torch.Tensor:
        """`<|im_end|>` + user prefix + prompt vectors: [1 + P + prompt_num, H]."""
        token_ids = [self.layout.end_of_turn_id, *self.layout.user_prefix_ids]
        return torch.cat(
            [self.embed_tokens(token_ids, like), self.heads.prompt_embeddings.weight.to(like.dtype)]
        )

    @torch.inference_mode()
    def listen(
        self, audio_vectors: torch.Tensor, first_of_turn: bool, cache: LlmKvCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one chunk's adapter vectors [n, H]; returns (state logits [C], probs [3]).

        The probabilities are a softmax over the first three state logits of the last
        position only; the 4th class of the release is allocated but never used.
        """
        if first_of_turn:
            opening = self.user_turn_opening(audio_vectors)
            embeds = torch.cat([opening, audio_vectors])
            ids: list[int | None] = [self.layout.end_of_turn_id, *self.layout.user_prefix_ids]
            ids += [None] * (embeds.shape[0] - len(ids))
        else:
            embeds = audio_vectors
            ids = [None] * embeds.shape[0]
        hidden = self.run(embeds, cache, ids)
        logits = self.heads.predictor_head(hidden[-1])  # (C,)
        probs = torch.softmax(logits[:3].float(), dim=-1)
        return logits, probs

    @torch.inference_mode()
    def start_answer(self, cache: LlmKvCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the assistant suffix; returns (next-token logits [V], hidden [H])."""
        ids = list(self.layout.assistant_suffix_ids)
        hidden = self.run(self.embed_tokens(ids, self._weight_like()), cache, list(ids))
        return self._next_token_logits(hidden[-1]), hidden[-1]

    @torch.inference_mode()
    def feed_token(self, token_id: int, cache: LlmKvCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one generated token; returns (next-token logits [V], hidden [H])."""
        hidden = self.run(self.embed_tokens([token_id], self._weight_like()), cache, [token_id])
        return self._next_token_logits(hidden[-1]), hidden[-1]

    def _next_token_logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        head = self.causal_lm.get_output_embeddings()
        return head(last_hidden.unsqueeze(0))[0]  # (V,)
