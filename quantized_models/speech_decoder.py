"""Speech decoder `LLM2TTSCodecAR`: LLM embeddings/hidden states -> codec token ids.

Three stacks of Llama-style layers share one geometry (spec section 7):
`layers_pre_nn` (pre-network over the re-tokenised text embeddings), `layers_prefix`
(turns the segment's LLM hidden states into a per-layer KV prefix) and `layers`
(NAR pass = prefill, then AR steps = generate, same weights). Everything runs on one
stream, so tensors carry no batch dimension: rows are `[T, D]`.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantized_models.checkpoint_file import read_checkpoint
from quantized_models.errors import ModelLoadError
from quantized_models.strict_load import load_strict

logger = logging.getLogger(__name__)

RMS_NORM_EPS = 1e-6  # fixed by the official LlamaConfig, not in model.json
ROPE_THETA = 10000.0  # transformers' Llama default, used unchanged by the official code
NUM_SPECIAL_IDS = 4  # BOS, SOS, EOS, PAD appended after the codec vocabulary


@dataclass(frozen=True)
class DecoderDims:
    """Geometry of the speech decoder, read from `decoder/model.json` (`[idim, odim, args]`)."""

    idim: int
    """Width of the input rows (LLM vectors are split into rows of this width)."""
    odim: int
    """Codec vocabulary size; ids >= odim are specials."""
    attention_dim: int
    """Hidden width of every layer (equals idim: there is no input projection)."""
    num_heads: int
    """Attention heads; KV heads are the same (no GQA)."""
    linear_units: int
    """Width of the SiLU-gated MLP."""
    num_blocks: int
    """Layers of the NAR/AR stack and of the prefix stack; the pre-net has half."""
    kv_cache_prefix_finetune: bool
    """Whether the LLM hidden-state prefix is used."""
    rms_norm_eps: float = RMS_NORM_EPS
    rope_theta: float = ROPE_THETA

    @property
    def bos_id(self) -> int:
        return self.odim

    @property
    def sos_id(self) -> int:
        return self.odim + 1

    @property
    def eos_id(self) -> int:
        return self.odim + 2

    @property
    def pad_id(self) -> int:
        return self.odim + 3

    @property
    def vocab_size(self) -> int:
        return self.odim + NUM_SPECIAL_IDS

    @property
    def num_pre_layers(self) -> int:
        return self.num_blocks // 2

    @property
    def head_dim(self) -> int:
        return self.attention_dim // self.num_heads

    @classmethod
    def from_model_json(cls, path_or_list: Path | str | list) -> DecoderDims:
        """Parse `[idim, odim, {args}]` from a file path or the already-loaded list."""
        source = "decoder model.json" if isinstance(path_or_list, list) else str(path_or_list)
        try:
            data = path_or_list
            if not isinstance(data, list):
                data = json.loads(Path(path_or_list).read_text(encoding="utf-8"))
            idim, odim, args = data
            dims = cls(
                idim=int(idim),
                odim=int(odim),
                attention_dim=int(args["transformer_attention_dim"]),
                num_heads=int(args["transformer_attention_heads"]),
                linear_units=int(args["transformer_linear_units"]),
                num_blocks=int(args["transformer_num_blocks"]),
                kv_cache_prefix_finetune=bool(args.get("kv_cache_prefix_finetune", 0)),
            )
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ModelLoadError(
                f"{source}: expected a JSON list [idim, odim, {{transformer_* args}}] ({exc!r})."
            ) from exc
        dims._validate(source)
        return dims

    def _validate(self, source: str) -> None:
        problems = []
        if self.idim != self.attention_dim:
            problems.append(f"idim {self.idim} != transformer_attention_dim {self.attention_dim}")
        if min(self.odim, self.num_heads, self.linear_units, self.num_blocks) < 1:
            problems.append("odim, heads, linear units and blocks must be positive")
        elif self.attention_dim % self.num_heads or self.head_dim % 2:
            problems.append(
                f"attention dim {self.attention_dim} must split into {self.num_heads} heads "
                "of even width (rotary embedding)"
            )
        if problems:
            raise ModelLoadError(f"{source}: unusable speech-decoder config: {'; '.join(problems)}.")


def split_llm_rows(x: torch.Tensor, idim: int) -> torch.Tensor:
    """Split each LLM vector into consecutive decoder rows (the "896 surprise").

    Args:
        x: [m, llm_dim] LLM embeddings or hidden states.
        idim: decoder row width.
    Returns:
        [m * llm_dim / idim, idim]; row-major, so vector j gives rows j*r .. j*r + r-1.
    """
    if x.dim() != 2:
        raise ValueError(f"split_llm_rows expects [m, llm_dim], got shape {tuple(x.shape)}.")
    if x.shape[1] % idim:
        raise ValueError(
            f"LLM width {x.shape[1]} is not a multiple of the speech decoder width {idim}; "
            "this decoder only fits LLMs whose width is a multiple of its idim."
        )
    return x.reshape(-1, idim)  # [m, llm_dim] -> [m * llm_dim / idim, idim]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, scaled in the input dtype (as Llama)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE; `inv_freq` is derived, so not in the state dict."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)

    def forward(self, start: int, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns cos, sin: [length, head_dim] for positions start .. start+length-1."""
        pos = torch.arange(start, start + length, device=self.inv_freq.device).float()
        freqs = torch.outer(pos, self.inv_freq.float())  # [length, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [length, head_dim]
        return emb.cos().to(like.dtype), emb.sin().to(like.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class KvSlot:
    """One layer's preallocated key/value store and where the new rows go."""

    keys: torch.Tensor  # [heads, capacity, head_dim], RoPE already applied
    values: torch.Tensor  # [heads, capacity, head_dim]
    start: int  # index of the first row written by this call


class SelfAttention(nn.Module):
    """Multi-head attention without biases; eager softmax in float32."""

    def __init__(self, dims: DecoderDims) -> None:
        super().__init__()
        d, self.heads, self.head_dim = dims.attention_dim, dims.num_heads, dims.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.heads, self.head_dim).transpose(0, 1)  # [T, D] -> [H, T, hd]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot: KvSlot | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [T, D]; cos/sin: [T, hd]; mask: additive [T, S] or None. Returns [T, D].

        With a slot, the new K/V are written at rows start..start+T-1 and the queries see
        rows 0..start+T-1 (no causal mask: the official NAR and AR passes use none).
        """
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if slot is not None:
            end = slot.start + x.shape[0]
            slot.keys[:, slot.start : end] = k
            slot.values[:, slot.start : end] = v
            k, v = slot.keys[:, :end], slot.values[:, :end]  # [H, S, hd]
        scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(self.head_dim)  # [H, T, S]
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v)  # [H, T, hd]
        return self.o_proj(out.transpose(0, 1).reshape(x.shape[0], self.heads * self.head_dim))  # -> [T, D]


class GatedMlp(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dims: DecoderDims) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dims.attention_dim, dims.linear_units, bias=False)
        self.up_proj = nn.Linear(dims.attention_dim, dims.linear_units, bias=False)
        self.down_proj = nn.Linear(dims.linear_units, dims.attention_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dims: DecoderDims) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dims)
        self.mlp = GatedMlp(dims)
        self.input_layernorm = RMSNorm(dims.attention_dim, dims.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(dims.attention_dim, dims.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot: KvSlot | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [T, D] -> [T, D]."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, slot, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class DecoderCache:
    """Per-segment KV cache of the NAR/AR layers, preallocated at prefill (bounded).

    Row layout per layer: [prefix (prefix_len) | BOS + pre-net rows | AR steps].
    """

    max_new_tokens: int
    """Capacity for AR steps; `step` raises once it is used up."""
    keys: list[torch.Tensor] = field(default_factory=list)
    """Per layer [heads, capacity, head_dim], RoPE applied."""
    values: list[torch.Tensor] = field(default_factory=list)
    """Per layer [heads, capacity, head_dim]."""
    length: int = 0
    """Rows filled so far (prefix + conditioning + AR steps)."""
    prefix_len: int = 0
    """Rows written by the prefix layers (4k); AR positions do not count them."""
    generated: int = 0
    """AR steps taken (SOS included)."""

    def reset(self) -> None:
        self.keys, self.values = [], []
        self.length = self.prefix_len = self.generated = 0

    def get_seq_length(self) -> int:
        return self.length

    def check_room(self) -> None:
        """Raise before an AR step that would overrun the preallocated rows."""
        if self.generated >= self.max_new_tokens:
            raise RuntimeError(
                f"speech decoder cache is full ({self.max_new_tokens} AR steps); "
                "create the DecoderCache with a larger max_new_tokens."
            )

    def slot(self, layer: int) -> KvSlot:
        return KvSlot(self.keys[layer], self.values[layer], self.length)


class SpeechDecoder(nn.Module):
    """LLM2TTSCodecAR with parameter names equal to `decoder/final.pt['model']`."""

    def __init__(self, dims: DecoderDims) -> None:
        super().__init__()
        self.dims = dims
        self.embedding = nn.Embedding(dims.vocab_size, dims.attention_dim)
        self.layers_pre_nn = nn.ModuleList(DecoderLayer(dims) for _ in range(dims.num_pre_layers))
        self.layers = nn.ModuleList(DecoderLayer(dims) for _ in range(dims.num_blocks))
        self.layers_prefix = nn.ModuleList(DecoderLayer(dims) for _ in range(dims.num_blocks))
        self.norm = RMSNorm(dims.attention_dim, dims.rms_norm_eps)
        self.out_fnn = nn.Linear(dims.attention_dim, dims.vocab_size)
        # The three official rotary modules are identical, so one is shared.
        self.rotary = RotaryEmbedding(dims.head_dim, dims.rope_theta)

    def _embed(self, token_id: int) -> torch.Tensor:
        ids = torch.tensor([token_id], device=self.embedding.weight.device)
        return self.embedding(ids)  # [1, D]

    def _alloc(self, cache: DecoderCache, rows: int, like: torch.Tensor) -> None:
        shape = (self.dims.num_heads, rows, self.dims.head_dim)
        cache.keys = [like.new_zeros(shape) for _ in self.layers]
        cache.values = [like.new_zeros(shape) for _ in self.layers]

    @torch.no_grad()
    def prefill(
        self, hidden_rows: torch.Tensor, prefix_rows: torch.Tensor | None, cache: DecoderCache
    ) -> DecoderCache:
        """Pre-net + prefix layers + NAR pass; fills `cache` (reset first).

        Args:
            hidden_rows: [4n, idim] split embeddings of the re-tokenised segment text.
            prefix_rows: [4k, idim] split LLM hidden states of the segment, or None.
            cache: filled in place and returned.
        """
        cache.reset()
        x = hidden_rows.to(self.embedding.weight.dtype)
        cos, sin = self.rotary(0, x.shape[0], x)
        for layer in self.layers_pre_nn:
            x = layer(x, cos, sin)  # bidirectional: the official all-zero mask adds nothing
        x = torch.cat((self._embed(self.dims.bos_id), x), dim=0)  # [4n + 1, D]
        use_prefix = prefix_rows is not None and self.dims.kv_cache_prefix_finetune
        prefix_len = prefix_rows.shape[0] if use_prefix else 0
        self._alloc(cache, prefix_len + x.shape[0] + cache.max_new_tokens, x)
        if use_prefix:
            p = prefix_rows.to(x.dtype)
            cos, sin = self.rotary(0, prefix_len, p)
            for i, layer in enumerate(self.layers_prefix):
                p = layer(p, cos, sin, cache.slot(i))  # layer i's K/V become layers[i]'s prefix
            cache.length = cache.prefix_len = prefix_len
        cos, sin = self.rotary(0, x.shape[0], x)  # positions restart at 0 after the prefix
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.slot(i))
        cache.length += x.shape[0]
        return cache

    @torch.no_grad()
    def step(self, token_id: int, cache: DecoderCache) -> tuple[torch.Tensor, DecoderCache]:
        """One AR step: feed `token_id`, return logits [vocab] for the next id."""
        cache.check_room()
        x = self._embed(token_id)  # [1, D]
        cos, sin = self.rotary(cache.length - cache.prefix_len, 1, x)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.slot(i))
        cache.length += 1
        cache.generated += 1
        return self.out_fnn(self.norm(x))[0], cache  # [vocab]

    def mask_non_codec(self, logits: torch.Tensor) -> torch.Tensor:
        return mask_non_codec(logits, self.dims)


def mask_non_codec(logits: torch.Tensor, dims: DecoderDims) -> torch.Tensor:
    """Set BOS/SOS/PAD logits to -inf so only codec ids or EOS can be sampled.

    The official code does not do this and would crash in the codec lookup if a special
    were sampled. Masking before the softmax only rescales the other probabilities, which
    the top-k renormalisation undoes, so the distribution is unchanged whenever no special
    is in the top k (always the case in the recorded fixture).
    """
    out = logits.clone()
    out[..., [dims.bos_id, dims.sos_id, dims.pad_id]] = float("-inf")
    return out


def speech_top_k_probs(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Official speech sampler distribution: softmax over all logits, keep top k, renormalise.

    Args:
        logits: [..., vocab].
    Returns:
        [..., vocab] probabilities, zero outside the top k.
    """
    probs = F.softmax(logits.float(), dim=-1)
    top, idx = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))


def sample_speech_token(
    logits: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> int:
    """Draw one id from `speech_top_k_probs`; k == 1 is the exact arg-max (no RNG used)."""
    if k < 1:
        raise ValueError(f"speech top-k must be >= 1, got {k}.")
    if k == 1:
        return int(torch.argmax(logits))
    probs = speech_top_k_probs(logits, k)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate_codec_tokens(
    decoder: SpeechDecoder,
    hidden_rows: torch.Tensor,
    prefix_rows: torch.Tensor | None,
    top_k: int,
    max_tokens: int,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield codec ids for one segment until EOS (not yielded) or `max_tokens` ids."""
    cache = decoder.prefill(hidden_rows, prefix_rows, DecoderCache(max_new_tokens=max_tokens))
    token = decoder.dims.sos_id
    for count in range(1, max_tokens + 1):
        logits, cache = decoder.step(token, cache)
        token = sample_speech_token(decoder.mask_non_codec(logits), top_k, generator)
        if token == decoder.dims.eos_id:
            return
        yield token
        if count == max_tokens:
            return


def load_speech_decoder(ckpt_path: Path | str, dims: DecoderDims) -> SpeechDecoder:
    """Build the decoder on CPU/float32 and strictly load `final.pt` (its `model` entry if any)."""
    state = read_checkpoint(ckpt_path, "speech-decoder checkpoint")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    decoder = SpeechDecoder(dims)
    load_strict(decoder, state, ckpt_path)
    return decoder.eval()

