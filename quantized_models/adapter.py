"""Adapter from encoder frames to LLM input vectors (official `CNNSubsampling`, key prefix `adpter.`).

Two branches exist in the official class (spec sections 3 and 14.1):
- single convolution, used when 4 * encoder width >= LLM width (the released model):
  Conv1d(k, stride 2, D -> 2D) -> LayerNorm(eps 1e-3) -> activation -> Linear(2D -> LLM);
- two convolutions otherwise: Conv1d(k, stride 1, D -> 2D) -> BatchNorm -> ReLU ->
  Conv1d(k, stride 2, 2D -> 4D) -> BatchNorm -> ReLU -> Linear(4D -> LLM); `norm` and
  `activation_func` are ignored there.
Every convolution is causal: it sees kernel_size - 1 cached frames before the new ones
(zeros on the first chunk), so streaming and offline runs agree exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantized_models.errors import ModelLoadError

NORM_EPS = 1e-3  # LayerNorm / BatchNorm eps of the official adapter
DOWNSAMPLE_STRIDE = 2  # the last convolution halves the frame rate (25 Hz -> 12.5 Hz)
SINGLE_CONV_WIDENING = 4  # single-conv branch iff 4 * enc_out_dim >= llm_embed_dim
_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


def _model_conf(cfg: dict, key: str, source: Path | str) -> Any:
    conf = cfg.get("model_conf") if isinstance(cfg, dict) else None
    if not isinstance(conf, dict) or key not in conf:
        raise ModelLoadError(f"{source}: missing key `model_conf.{key}`.")
    return conf[key]


def _positive_int(cfg: dict, key: str, source: Path | str) -> int:
    value = _model_conf(cfg, key, source)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelLoadError(f"{source}: `model_conf.{key}` must be a positive integer, got {value!r}.")
    return value


@dataclass(frozen=True)
class AdapterDims:
    """Adapter geometry and options read from train.yaml `model_conf`."""

    enc_out_dim: int
    """Encoder output width D."""
    llm_embed_dim: int
    """LLM input embedding width."""
    kernel_size: int
    """Temporal kernel of every convolution; the causal cache holds kernel_size - 1 frames."""
    activation: str
    """`activation_func` of the single-conv branch (`gelu` = exact erf GELU, or `relu`)."""
    norm: str
    """`norm` of the single-conv branch; only `layer` is supported."""

    @property
    def two_convs(self) -> bool:
        """True for the two-convolution branch (4 * D < LLM width)."""
        return SINGLE_CONV_WIDENING * self.enc_out_dim < self.llm_embed_dim

    @property
    def cache_frames(self) -> int:
        return self.kernel_size - 1

    @classmethod
    def from_train_yaml(cls, cfg: dict, source: Path | str = "train.yaml") -> AdapterDims:
        """Read and validate the adapter options of a parsed train.yaml.

        Raises:
            ModelLoadError: a key is missing or names an unsupported option.
        """
        kind = _model_conf(cfg, "adpter_type", source)
        if kind != "subsampling":
            raise ModelLoadError(
                f"{source}: `model_conf.adpter_type` is {kind!r}; only 'subsampling' is supported."
            )
        dims = cls(
            enc_out_dim=_positive_int(cfg, "enc_out_dim", source),
            llm_embed_dim=_positive_int(cfg, "llm_embed_dim", source),
            kernel_size=_positive_int(cfg, "kernel_size", source),
            activation=str(_model_conf(cfg, "activation_func", source)),
            norm=str(_model_conf(cfg, "norm", source)),
        )
        if dims.kernel_size <= DOWNSAMPLE_STRIDE:
            raise ModelLoadError(f"{source}: `model_conf.kernel_size` must exceed {DOWNSAMPLE_STRIDE}.")
        if not dims.two_convs and dims.activation not in _ACTIVATIONS:
            raise ModelLoadError(
                f"{source}: `model_conf.activation_func` {dims.activation!r} is not one of "
                f"{sorted(_ACTIVATIONS)}."
            )
        if not dims.two_convs and dims.norm != "layer":
            raise ModelLoadError(
                f"{source}: `model_conf.norm` {dims.norm!r} is not supported (only 'layer')."
            )
        return dims


@dataclass
class AdapterCache:
    """Causal-convolution caches of one stream (None until the first chunk, reset per turn).

    Attributes:
        before_conv1: [B, D, kernel_size - 1] last inputs of `conv1d1` (two-conv branch only).
        before_conv2: [B, C, kernel_size - 1] last inputs of `conv1d2` (C = D or 2D).
    """

    before_conv1: Tensor | None = None
    before_conv2: Tensor | None = None

    def reset(self) -> None:
        """Forget the cached frames (the next chunk is left-padded with zeros)."""
        self.before_conv1 = None
        self.before_conv2 = None


def _causal_input(x: Tensor, cached: Tensor | None, context: int) -> Tensor:
    """[B, C, T] -> [B, C, context + T]: cached frames, or zeros on a first chunk, in front."""
    if cached is None:
        return nn.functional.pad(x, (context, 0))
    return torch.cat([cached, x], dim=2)


class Adapter(nn.Module):
    """Official `CNNSubsampling` adapter; parameter names match `adpter.*` minus the prefix."""

    def __init__(self, dims: AdapterDims) -> None:
        super().__init__()
        self.dims = dims
        d, k = dims.enc_out_dim, dims.kernel_size
        if dims.two_convs:
            self.conv1d1 = nn.Conv1d(d, 2 * d, k, stride=1)
            self.bn1 = nn.BatchNorm1d(2 * d, eps=NORM_EPS)
            self.conv1d2 = nn.Conv1d(2 * d, 4 * d, k, stride=DOWNSAMPLE_STRIDE)
            self.bn2 = nn.BatchNorm1d(4 * d, eps=NORM_EPS)
            self.project = nn.Linear(4 * d, dims.llm_embed_dim)
        else:
            self.conv1d2 = nn.Conv1d(d, 2 * d, k, stride=DOWNSAMPLE_STRIDE)
            self.bn2 = nn.LayerNorm(2 * d, eps=NORM_EPS)
            self.activation = _ACTIVATIONS[dims.activation]()
            self.project = nn.Linear(2 * d, dims.llm_embed_dim)

    def _first_conv(self, x: Tensor) -> Tensor:
        """Two-conv branch: [B, D, k - 1 + T] -> [B, 2D, T]."""
        return torch.relu(self.bn1(self.conv1d1(x)))

    def _head(self, x: Tensor) -> Tensor:
        """Last conv, norm, activation, projection: [B, C, k - 1 + T] -> [B, T / 2, LLM]."""
        h = self.conv1d2(x)  # [B, C', T / 2]
        if self.dims.two_convs:
            h = torch.relu(self.bn2(h)).transpose(1, 2)  # [B, T / 2, 4D]
        else:
            h = self.activation(self.bn2(h.transpose(1, 2)))  # [B, T / 2, 2D], norm over channels
        return self.project(h)

    def step(self, enc_out: Tensor, cache: AdapterCache) -> tuple[Tensor, AdapterCache]:
        """Map one chunk of encoder frames to LLM vectors.

        Args:
            enc_out: [B, T, D] encoder frames of this chunk (T even; 4 in Freeze-Omni).
            cache: convolution caches, updated in place.

        Returns:
            ([B, T / 2, llm_embed_dim], cache).
        """
        if enc_out.shape[1] % DOWNSAMPLE_STRIDE:
            raise ValueError(f"adapter chunks need an even frame count, got {enc_out.shape[1]}")
        context = self.dims.cache_frames
        x = enc_out.transpose(1, 2)  # [B, D, T]
        if self.dims.two_convs:
            x = _causal_input(x, cache.before_conv1, context)  # [B, D, k - 1 + T]
            cache.before_conv1 = x[:, :, -context:]
            x = self._first_conv(x)  # [B, 2D, T]
        x = _causal_input(x, cache.before_conv2, context)  # [B, C, k - 1 + T]
        cache.before_conv2 = x[:, :, -context:]
        return self._head(x), cache

    def forward_full(self, enc_out: Tensor) -> Tensor:
        """Whole sequence at once: [B, T, D] -> [B, T / 2, llm_embed_dim] (== chunked `step`)."""
        context = self.dims.cache_frames
        x = enc_out.transpose(1, 2)  # [B, D, T]
        if self.dims.two_convs:
            x = self._first_conv(_causal_input(x, None, context))  # [B, 2D, T]
        return self._head(_causal_input(x, None, context))

    def forward(self, enc_out: Tensor) -> Tensor:
        """Alias of `forward_full`."""
        return self.forward_full(enc_out)
