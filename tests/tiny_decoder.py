"""A tiny speech decoder and a short Adam loop for the tts training-option tests."""
from __future__ import annotations

from collections.abc import Callable

import torch

from quantized_models.speech_decoder import DecoderDims, SpeechDecoder


def tiny_decoder(seed: int) -> SpeechDecoder:
    """2 layers, 2 heads, width 16, 32 codec ids; seeded."""
    torch.manual_seed(seed)
    dims = DecoderDims(idim=16, odim=32, attention_dim=16, num_heads=2, linear_units=32, num_blocks=2,
                       kv_cache_prefix_finetune=False)
    return SpeechDecoder(dims)


def train_tiny(decoder: SpeechDecoder, step_fn: Callable[[int], tuple[torch.Tensor, dict[str, float]]],
               steps: int, lr: float = 1e-2) -> dict[str, float]:
    """`steps` Adam steps of `step_fn`; returns the last step's metrics."""
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    metrics: dict[str, float] = {}
    for step in range(steps):
        loss, metrics = step_fn(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return metrics
