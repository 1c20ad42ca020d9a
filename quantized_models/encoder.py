"""Streaming speech encoder: CMVN -> Conv2d subsampling (x4) -> pre-LN rel-pos transformer.

Parameter names follow the official checkpoint with the `encoder.` prefix removed
(`global_cmvn.mean`, `enc.0.core.conv.0.weight`, `enc.1.encoders.0.self_attn.linear_q.weight`, ...).
The positional bookkeeping of the official streaming `infer` (spec section 2.3) is reproduced
exactly, including the 4-frame lag after 17 chunks and the wrap of `pe_index`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantized_models.errors import ModelLoadError
from quantized_models.frontend import CHUNK_FEATURE_ROWS, Cmvn

OFFICIAL_PE_MAX_LEN = 5000  # rows of the official sinusoid table; fixes where pe_index wraps
SUBSAMPLING_KERNEL = 3  # Conv2dSubsampling4: two 3x3 convolutions ...
SUBSAMPLING_STRIDE = 2  # ... with stride 2 each (time and frequency)
SUPPORTED_SUBSAMPLING_RATE = SUBSAMPLING_STRIDE * SUBSAMPLING_STRIDE

_TRANSFORMER = ("encoder_conf", "para_conf", "transformer")
_SUBSAMPLING = ("encoder_conf", "para_conf", "subsampling")
_OVERVIEW = ("encoder_conf", "overview_conf")
# Options this implementation supports, with the only value it accepts.
_REQUIRED_OPTIONS: tuple[tuple[tuple[str, ...], Any], ...] = (
    (_OVERVIEW + ("encoder-layer-config",), "subsampling-transformer"),
    (_TRANSFORMER + ("transformer-pos-enc-class",), "rel-enc"),
    (_TRANSFORMER + ("transformer-normalize-before",), True),
    (_TRANSFORMER + ("transformer-concat-after",), False),
    (_TRANSFORMER + ("transformer-positionwise-layer-type",), "linear"),
    (_TRANSFORMER + ("transformer-input-layer",), "linear"),
    (_SUBSAMPLING + ("subsampling-rate",), SUPPORTED_SUBSAMPLING_RATE),
)
# Widths that must all equal the model width, and inputs that must all equal `input_dim`.
_WIDTH_KEYS = (
    _OVERVIEW + ("encoder-output-dim",),
    _SUBSAMPLING + ("subsampling-output-dim",),
    _TRANSFORMER + ("transformer-input-dim",),
    _TRANSFORMER + ("transformer-attention-dim",),
    _TRANSFORMER + ("transformer-output-dim",),
)
_INPUT_KEYS = (_OVERVIEW + ("encoder-input-dim",), _SUBSAMPLING + ("subsampling-input-dim",))
_FIELD_KEYS = {  # EncoderDims field -> train.yaml key path
    "attention_heads": _TRANSFORMER + ("transformer-attention-heads",),
    "linear_units": _TRANSFORMER + ("transformer-linear-units",),
    "num_blocks": _TRANSFORMER + ("transformer-num-blocks",),
    "chunk_frames": _TRANSFORMER + ("transformer-chunk_size",),
    "left_chunks": _TRANSFORMER + ("transformer-left_chunks",),
}


def _config_value(cfg: dict, keys: tuple[str, ...], source: Path | str) -> Any:
    node: Any = cfg
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise ModelLoadError(f"{source}: missing key `{'.'.join(keys)}`.")
        node = node[key]
    return node


def _positive_int(cfg: dict, keys: tuple[str, ...], source: Path | str) -> int:
    value = _config_value(cfg, keys, source)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelLoadError(f"{source}: `{'.'.join(keys)}` must be a positive integer, got {value!r}.")
    return value


def conv_out_length(length: int) -> int:
    """Length after one unpadded SUBSAMPLING_KERNEL / SUBSAMPLING_STRIDE convolution."""
    return (length - SUBSAMPLING_KERNEL) // SUBSAMPLING_STRIDE + 1


@dataclass(frozen=True)
class EncoderDims:
    """Speech-encoder geometry read from train.yaml."""

    n_mels: int
    """Input feature bins (`input_dim`)."""
    model_dim: int
    """Width of subsampling output, attention and encoder output."""
    attention_heads: int
    linear_units: int
    """Hidden width of the ReLU feed-forward."""
    num_blocks: int
    chunk_frames: int
    """Encoder frames per streaming chunk (`transformer-chunk_size`)."""
    left_chunks: int
    """Past chunks every chunk attends to (`transformer-left_chunks`)."""

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.attention_heads

    @property
    def cache_frames(self) -> int:
        """K/V frames kept per block between calls (64 in the released model)."""
        return self.chunk_frames * self.left_chunks

    @property
    def full_window_frames(self) -> int:
        """Keys seen by a chunk in steady state: left chunks plus itself (68)."""
        return self.chunk_frames * (self.left_chunks + 1)

    @property
    def pe_wrap(self) -> int:
        """`pe_index` period of the official code: 4 * floor(5000 / 4) - 68 = 4932."""
        usable = self.chunk_frames * (OFFICIAL_PE_MAX_LEN // self.chunk_frames)
        return usable - self.full_window_frames

    @classmethod
    def from_train_yaml(cls, cfg: dict, source: Path | str = "train.yaml") -> EncoderDims:
        """Read and validate `encoder_conf` of a parsed train.yaml.

        Raises:
            ModelLoadError: a key is missing, inconsistent, or names an unsupported option.
        """
        for keys, wanted in _REQUIRED_OPTIONS:
            value = _config_value(cfg, keys, source)
            if value != wanted or type(value) is not type(wanted):
                raise ModelLoadError(
                    f"{source}: `{'.'.join(keys)}` is {value!r}; only {wanted!r} is supported."
                )
        n_mels = _positive_int(cfg, ("input_dim",), source)
        widths = {".".join(k): _positive_int(cfg, k, source) for k in _WIDTH_KEYS}
        inputs = {".".join(k): _positive_int(cfg, k, source) for k in _INPUT_KEYS}
        if len(set(widths.values())) != 1:
            raise ModelLoadError(f"{source}: encoder widths must all be equal, got {widths}.")
        if set(inputs.values()) != {n_mels}:
            raise ModelLoadError(f"{source}: encoder input dims {inputs} differ from input_dim {n_mels}.")
        dims = cls(
            n_mels=n_mels,
            model_dim=next(iter(widths.values())),
            **{name: _positive_int(cfg, keys, source) for name, keys in _FIELD_KEYS.items()},
        )
        dims._validate(source)
        return dims

    def _validate(self, source: Path | str) -> None:
        if self.model_dim % self.attention_heads:
            raise ModelLoadError(
                f"{source}: attention dim {self.model_dim} is not divisible by "
                f"{self.attention_heads} heads."
            )
        per_chunk = conv_out_length(conv_out_length(CHUNK_FEATURE_ROWS))
        if self.chunk_frames != per_chunk:
            raise ModelLoadError(
                f"{source}: transformer-chunk_size is {self.chunk_frames}, but each "
                f"{CHUNK_FEATURE_ROWS}-row feature chunk yields {per_chunk} encoder frames."
            )
        if conv_out_length(conv_out_length(self.n_mels)) <= 0:
            raise ModelLoadError(f"{source}: input_dim {self.n_mels} is too small to subsample.")


def step_positions(dims: EncoderDims, pe_index: int, cached_frames: int) -> tuple[int, int]:
    """Sinusoid rows used by one streaming call (spec section 2.3).

    Args:
        dims: encoder geometry.
        pe_index: the cache's counter before the call.
        cached_frames: K/V frames already cached in block 0.

    Returns:
        (start, length): rows [start, start + length) label the keys, oldest first.
    """
    start = max(0, pe_index % dims.pe_wrap - dims.full_window_frames)
    return start, cached_frames + dims.chunk_frames


def sinusoid_table(positions: Tensor, dim: int) -> Tensor:
    """Standard sinusoid rows (even dims sin, odd dims cos), computed in float32.

    Args:
        positions: [L] integer positions.
        dim: model width (even).

    Returns:
        [L, dim] float32 table on `positions.device`.
    """
    device = positions.device
    div_term = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * -(math.log(10000.0) / dim)
    )  # [dim / 2]
    angles = positions.to(torch.float32).unsqueeze(1) * div_term  # [L, dim / 2]
    table = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1)  # [L, dim / 2, 2]
    return table.reshape(positions.shape[0], dim)  # [L, dim]


@dataclass
class EncoderCache:
    """Streaming state of the encoder for one stream (reset at every user turn).

    Attributes:
        keys: per block, [B, heads, L, head_dim] projected keys of the last L <= 64 frames.
        values: per block, [B, heads, L, head_dim] projected values, same frames.
        pe_index: the official positional counter, +chunk_frames per call; only its value
            modulo `EncoderDims.pe_wrap` matters.
    """

    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    pe_index: int = 0

    def reset(self) -> None:
        """Forget all frames and restart positions at 0."""
        self.keys.clear()
        self.values.clear()
        self.pe_index = 0

    @property
    def cached_frames(self) -> int:
        """Frames currently held (block 0; all blocks hold the same count)."""
        return self.keys[0].shape[2] if self.keys else 0


class _SubsamplingCore(nn.Module):
    def __init__(self, dims: EncoderDims) -> None:
        super().__init__()
        d = dims.model_dim
        self.conv = nn.Sequential(
            nn.Conv2d(1, d, SUBSAMPLING_KERNEL, SUBSAMPLING_STRIDE),
            nn.ReLU(),
            nn.Conv2d(d, d, SUBSAMPLING_KERNEL, SUBSAMPLING_STRIDE),
            nn.ReLU(),
        )
        freq_out = conv_out_length(conv_out_length(dims.n_mels))
        self.out = nn.Sequential(nn.Linear(d * freq_out, d))

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, n_mels] -> [B, T'', D], T'' = conv_out_length twice (19 rows -> 4 frames)."""
        h = self.conv(x.unsqueeze(1))  # [B, D, T', F']
        b, c, t, f = h.shape
        h = h.transpose(1, 2).reshape(b, t, c * f)  # [B, T', D * F'] channel-major
        return self.out(h)


class _FeedForward(nn.Module):
    def __init__(self, dims: EncoderDims) -> None:
        super().__init__()
        self.w_1 = nn.Linear(dims.model_dim, dims.linear_units)
        self.w_2 = nn.Linear(dims.linear_units, dims.model_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(torch.relu(self.w_1(x)))


class RelPositionAttention(nn.Module):
    """Transformer-XL style attention *without* rel-shift (as the official code).

    score(i, j) = [(q_i + u) . k_j + (q_i + v) . W_pos PE(pos_j)] / sqrt(d_k): the positional
    term depends on the key's position label only.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.linear_q = nn.Linear(dim, dim)
        self.linear_k = nn.Linear(dim, dim)
        self.linear_v = nn.Linear(dim, dim)
        self.linear_out = nn.Linear(dim, dim)
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.head_dim))

    def _split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # [B, h, T, d_k]

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self._split(self.linear_q(x)), self._split(self.linear_k(x)), self._split(self.linear_v(x))

    def _pos_keys(self, pos_emb: Tensor) -> Tensor:
        return self._split(self.linear_pos(pos_emb).unsqueeze(0))  # [1, h, L, d_k]

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, pos_scores: Tensor, visible: Tensor | None
    ) -> Tensor:
        content = torch.matmul(q + self.pos_bias_u.unsqueeze(1), k.transpose(-2, -1))  # [B, h, Tq, Tk]
        scores = (content + pos_scores) / math.sqrt(self.head_dim)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, h, Tq, d_k]
        b, _, t, _ = out.shape
        return self.linear_out(out.transpose(1, 2).reshape(b, t, -1))  # [B, Tq, D]

    def step(
        self, x: Tensor, pos_emb: Tensor, past_k: Tensor | None, past_v: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Attend new frames to cached + new keys.

        Args:
            x: [B, T, D] normalised new frames.
            pos_emb: [L, D] sinusoid rows for the L = cached + T keys.
            past_k, past_v: [B, h, L - T, d_k] cached projections, or None.

        Returns:
            (out [B, T, D], keys [B, h, L, d_k], values [B, h, L, d_k]).
        """
        q, k, v = self._qkv(x)
        if past_k is not None and past_v is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # [B, h, L, d_k]
        q_v = q + self.pos_bias_v.unsqueeze(1)
        pos_scores = torch.matmul(q_v, self._pos_keys(pos_emb).transpose(-2, -1))  # [B, h, T, L]
        return self._attend(q, k, v, pos_scores, None), k, v

    def full(self, x: Tensor, pos_emb: Tensor, positions: Tensor, visible: Tensor) -> Tensor:
        """Whole-sequence attention where each query labels its keys with its own positions.

        Args:
            x: [B, T, D] normalised frames.
            pos_emb: [P, D] sinusoid rows 0..P-1.
            positions: [T, T] long, the row of `pos_emb` for (query, key).
            visible: [T, T] bool attention mask.

        Returns:
            [B, T, D].
        """
        q, k, v = self._qkv(x)
        q_v = q + self.pos_bias_v.unsqueeze(1)
        every_row = torch.matmul(q_v, self._pos_keys(pos_emb).transpose(-2, -1))  # [B, h, T, P]
        index = positions.expand(*every_row.shape[:2], *positions.shape)  # [B, h, T, T]
        return self._attend(q, k, v, every_row.gather(-1, index), visible)


class _Block(nn.Module):
    """Pre-LN block: x + MHA(LN1(x)), then x + FFN(LN2(x))."""

    def __init__(self, dims: EncoderDims) -> None:
        super().__init__()
        self.self_attn = RelPositionAttention(dims.model_dim, dims.attention_heads)
        self.feed_forward = _FeedForward(dims)
        self.norm1 = nn.LayerNorm(dims.model_dim)
        self.norm2 = nn.LayerNorm(dims.model_dim)

    def _feed(self, x: Tensor) -> Tensor:
        return x + self.feed_forward(self.norm2(x))

    def step(
        self, x: Tensor, pos_emb: Tensor, past_k: Tensor | None, past_v: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """[B, T, D] -> [B, T, D] plus the uncropped keys/values (see RelPositionAttention.step)."""
        attended, keys, values = self.self_attn.step(self.norm1(x), pos_emb, past_k, past_v)
        return self._feed(x + attended), keys, values

    def full(self, x: Tensor, pos_emb: Tensor, positions: Tensor, visible: Tensor) -> Tensor:
        """[B, T, D] -> [B, T, D] (see RelPositionAttention.full)."""
        return self._feed(x + self.self_attn.full(self.norm1(x), pos_emb, positions, visible))


class _Transformer(nn.Module):
    def __init__(self, dims: EncoderDims) -> None:
        super().__init__()
        d = dims.model_dim
        # Index 2 is the official (inference-inactive) dropout slot; kept so keys line up.
        self.embed = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.Identity(), nn.ReLU())
        self.encoders = nn.ModuleList(_Block(dims) for _ in range(dims.num_blocks))
        self.after_norm = nn.LayerNorm(d)
        self.xscale = math.sqrt(d)  # positions are not added to x, only scaled


class SpeechEncoder(nn.Module):
    """Freeze-Omni speech encoder with the official streaming semantics.

    Args:
        dims: geometry from train.yaml.
        cmvn: global CMVN (e.g. from `load_json_cmvn`); identity statistics when omitted.
            Values in the checkpoint loaded afterwards replace these (spec 14.6).
    """

    def __init__(self, dims: EncoderDims, cmvn: Cmvn | None = None) -> None:
        super().__init__()
        self.dims = dims
        self.global_cmvn = cmvn if cmvn is not None else Cmvn(dims.n_mels)
        # `enc.0.core.*` / `enc.1.*` mirror the official module tree so checkpoint keys map 1:1.
        self.enc = nn.ModuleList([nn.ModuleDict({"core": _SubsamplingCore(dims)}), _Transformer(dims)])

    def subsample(self, chunks: Tensor) -> Tensor:
        """CMVN then Conv2d subsampling: [B, 19, n_mels] -> [B, chunk_frames, D]."""
        return self.enc[0]["core"](self.global_cmvn(chunks))

    def _embed(self, frames: Tensor) -> Tensor:
        transformer = self.enc[1]
        return transformer.embed(frames) * transformer.xscale

    def step(self, chunk: Tensor, cache: EncoderCache) -> tuple[Tensor, EncoderCache]:
        """Encode one feature chunk, updating the caches like the official `infer`.

        Args:
            chunk: [B, 19, n_mels] raw log-mel rows (CMVN is applied here).
            cache: per-block K/V and `pe_index`; updated in place.

        Returns:
            (out [B, chunk_frames, D], cache).
        """
        dims, transformer = self.dims, self.enc[1]
        x = self._embed(self.subsample(chunk))  # [B, 4, D]
        start, length = step_positions(dims, cache.pe_index, cache.cached_frames)
        positions = torch.arange(start, start + length, device=x.device)
        pos_emb = sinusoid_table(positions, dims.model_dim).to(x.dtype)  # [L, D]
        first_call = not cache.keys
        for i, block in enumerate(transformer.encoders):
            past = (None, None) if first_call else (cache.keys[i], cache.values[i])
            x, keys, values = block.step(x, pos_emb, *past)
            keys, values = keys[:, :, -dims.cache_frames :], values[:, :, -dims.cache_frames :]
            if first_call:
                cache.keys.append(keys)
                cache.values.append(values)
            else:
                cache.keys[i], cache.values[i] = keys, values
        cache.pe_index += dims.chunk_frames
        return transformer.after_norm(x), cache

    def offline_positions(self, n_chunks: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Key positions and visibility that a fresh stream of `n_chunks` calls would use.

        Returns:
            (positions [T, T] long, visible [T, T] bool) with T = n_chunks * chunk_frames;
            row = query frame, column = key frame.
        """
        dims = self.dims
        c = dims.chunk_frames
        pe_index = torch.arange(n_chunks, device=device) * c  # [N]
        first_key = pe_index - torch.clamp(pe_index, max=dims.cache_frames)  # [N]
        start = torch.clamp(pe_index % dims.pe_wrap - dims.full_window_frames, min=0)  # [N]
        frame = torch.arange(n_chunks * c, device=device)  # [T]
        relative = frame.unsqueeze(0) - first_key.unsqueeze(1)  # [N, T]
        visible = (relative >= 0) & (frame.unsqueeze(0) < (pe_index + c).unsqueeze(1))  # [N, T]
        positions = torch.where(visible, start.unsqueeze(1) + relative, 0)  # [N, T]
        row_chunk = frame // c  # [T]
        return positions[row_chunk], visible[row_chunk]  # [T, T] each

    def forward_full(self, chunks: Tensor) -> Tensor:
        """Encode a whole fresh stream in one pass with a chunk mask (streaming == offline).

        Args:
            chunks: [N, 19, n_mels] consecutive feature chunks of one stream.

        Returns:
            [N, chunk_frames, D], equal to N successive `step` calls on a fresh cache.
        """
        n, transformer = chunks.shape[0], self.enc[1]
        x = self._embed(self.subsample(chunks))  # [N, 4, D]
        x = x.reshape(1, -1, self.dims.model_dim)  # [1, T, D]
        positions, visible = self.offline_positions(n, x.device)
        table_rows = torch.arange(int(positions.max()) + 1, device=x.device)
        pos_emb = sinusoid_table(table_rows, self.dims.model_dim).to(x.dtype)  # [P, D]
        for block in transformer.encoders:
            x = block.full(x, pos_emb, positions, visible)
        return transformer.after_norm(x).reshape(n, self.dims.chunk_frames, -1)  # [N, 4, D]

    def forward_masked(self, chunks: Tensor, positions: Tensor, visible: Tensor) -> Tensor:
        """Encode a padded batch of streams under any chunk mask (training, dynamic chunks).

        Args:
            chunks: [B, N, 19, n_mels] feature chunks, N per stream (padded at the end).
            positions: [T, T] long sinusoid row of each (query, key), T = N * chunk_frames.
            visible: [T, T] or [B, 1, T, T] bool attention mask.

        Returns:
            [B, T, D]; with `offline_positions(N)` each row equals `forward_full` of its stream.
        """
        b, n = chunks.shape[:2]
        transformer = self.enc[1]
        x = self._embed(self.subsample(chunks.flatten(0, 1)))  # [B * N, 4, D]
        x = x.reshape(b, n * self.dims.chunk_frames, self.dims.model_dim)  # [B, T, D]
        table_rows = torch.arange(int(positions.max()) + 1, device=x.device)
        pos_emb = sinusoid_table(table_rows, self.dims.model_dim).to(x.dtype)  # [P, D]
        for block in transformer.encoders:
            x = block.full(x, pos_emb, positions, visible)
        return transformer.after_norm(x)

    def forward(self, chunks: Tensor) -> Tensor:
        """Alias of `forward_full`."""
        return self.forward_full(chunks)
