"""Feature decoder of the WORLD VQ codec: codec ids in context -> WORLD frame features.

A codebook centroid is the mean feature vector of everything its id stands for; neighbouring
ids say much more about what the frame really was (coarticulation, pitch movement). This small
convolutional net reads `2 * receptive_tokens + 1` ids around each position and predicts the
`frames_per_token` normalised frame features of that id, trained by regression on the
unquantised features. Its receptive field (`receptive_tokens`) stays below the engine's window
margins (10 ids), so a windowed decode keeps exactly the samples of a whole-segment decode
away from the window ends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FeatureDecoderDims:
    """`feature_decoder` entry of a WORLD codec's model.json."""

    n_codes: int
    """Codec vocabulary."""
    frames_per_token: int
    """Frames predicted per id."""
    frame_dims: int
    """Features per frame."""
    embed_dims: int = 128
    """Id embedding width."""
    channels: int = 192
    """Hidden width of the convolutions."""
    kernel: int = 5
    """Kernel (odd) of every convolution over ids."""
    layers: int = 3
    """Number of convolutions."""

    @property
    def receptive_tokens(self) -> int:
        """Ids on each side that influence one position."""
        return self.layers * (self.kernel // 2)

    def to_json(self) -> dict[str, int]:
        return {"embed_dims": self.embed_dims, "channels": self.channels, "kernel": self.kernel,
                "layers": self.layers}

    @classmethod
    def from_json(cls, cfg: dict[str, Any], n_codes: int, frames_per_token: int,
                  frame_dims: int) -> FeatureDecoderDims:
        dims = cls(n_codes, frames_per_token, frame_dims, int(cfg["embed_dims"]), int(cfg["channels"]),
                   int(cfg["kernel"]), int(cfg["layers"]))
        if dims.kernel % 2 != 1 or dims.layers < 1 or dims.channels < 1 or dims.embed_dims < 1:
            raise ValueError("feature_decoder needs an odd kernel and positive sizes")
        return dims


class FeatureDecoder(nn.Module):
    """ids [B, T] -> normalised frame features [B, T * frames_per_token, frame_dims]."""

    def __init__(self, dims: FeatureDecoderDims) -> None:
        super().__init__()
        self.dims = dims
        self.embed = nn.Embedding(dims.n_codes, dims.embed_dims)
        widths = [dims.embed_dims] + [dims.channels] * dims.layers
        self.convs = nn.ModuleList(
            nn.Conv1d(widths[i], widths[i + 1], dims.kernel, padding=dims.kernel // 2)
            for i in range(dims.layers)
        )
        self.out = nn.Conv1d(dims.channels, dims.frames_per_token * dims.frame_dims, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        x = self.embed(ids).transpose(1, 2)  # [B, T, E] -> [B, E, T]
        for i, conv in enumerate(self.convs):
            y = F.gelu(conv(x))
            x = y if i == 0 else x + y  # residual once the widths agree
        y = self.out(x)  # [B, F * D, T]
        d = self.dims
        return y.transpose(1, 2).reshape(b, t * d.frames_per_token, d.frame_dims)  # [B, T * F, D]
