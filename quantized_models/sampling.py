"""Text-token sampling of the answer LLM (spec §4.6, official `_post_decode`).

The official sampler differs from the common Hugging Face one in its nucleus rule: it keeps only
the tokens whose cumulative probability is *at most* `top_p` and drops the token that crosses
the threshold (spec §12 item 17). Everything here reproduces that rule, so that a distribution
computed here equals the one the official code hands to `torch.multinomial`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextSamplingConfig:
    """Sampling settings for answer text tokens (defaults: the official CLI defaults)."""

    temperature: float = 0.7
    """Logit divisor, > 0; exactly 1.0 skips the division, as the official code does."""
    top_k: int = 5
    """Number of most probable tokens kept, >= 0; 0 disables top-k, 1 is greedy decoding."""
    top_p: float = 0.8
    """Strict nucleus threshold in [0, 1]; 0 disables it. Tokens whose cumulative probability
    exceeds it are dropped, but the most probable token is always kept."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0.0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (math.isfinite(self.top_p) and 0.0 <= self.top_p <= 1.0):
            raise ValueError(f"top_p must lie in [0, 1] (0 disables it), got {self.top_p!r}")


def _keep_top_k(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Zero all but the `top_k` largest probabilities and renormalise. probs: [V] -> [V]."""
    # A k beyond the vocabulary keeps everything (the official code would raise instead).
    k = min(top_k, probs.shape[-1])
    top_probs, top_indices = torch.topk(probs, k)  # [k], [k]
    kept = torch.zeros_like(probs).scatter_(0, top_indices, top_probs)  # [V]
    return kept / kept.sum()


def _keep_strict_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Drop every token whose descending cumulative probability exceeds `top_p`; renormalise.

    probs: [V] -> [V]. When even the most probable token exceeds `top_p` on its own, only
    that token is kept (the official code shifts its removal mask right by one in that case;
    the cumulative sum is monotone, so the shift leaves exactly the top token).
    """
    sorted_probs, sorted_indices = torch.sort(probs, descending=True)  # [V], [V]
    remove_sorted = torch.cumsum(sorted_probs, dim=-1) > top_p  # [V] bool, in sorted order
    remove_sorted[0] = False
    kept = probs.clone()
    kept[sorted_indices[remove_sorted]] = 0.0
    return kept / kept.sum()


def text_sampling_probs(logits: torch.Tensor, cfg: TextSamplingConfig) -> torch.Tensor:
    """The distribution the official sampler hands to `torch.multinomial`.

    Args:
        logits: [V] next-token logits, any floating dtype. The temperature division runs in
            this dtype (bfloat16 on the official GPU path), the softmax in float32.
        cfg: Sampling settings.

    Returns:
        [V] float32 probabilities that sum to 1, with zeros for filtered tokens.
    """
    if logits.dim() != 1:
        raise ValueError(f"logits must be a 1-D [V] tensor, got shape {tuple(logits.shape)}")
    scaled = logits / cfg.temperature if cfg.temperature != 1.0 else logits
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float32)  # [V]
    if cfg.top_k > 0:
        probs = _keep_top_k(probs, cfg.top_k)
    if cfg.top_p > 0.0:
        probs = _keep_strict_top_p(probs, cfg.top_p)
    return probs


def sample_text_token(
    logits: torch.Tensor,
    cfg: TextSamplingConfig,
    generator: torch.Generator | None = None,
) -> int:
    """Sample one token id from `logits` with the official rules.

    Args:
        logits: [V] next-token logits.
        cfg: Sampling settings.
        generator: RNG for `torch.multinomial` (on the logits' device); None uses the global one.

    Returns:
        The sampled token id. With `top_k == 1` it is the arg-max of `logits` and no random
        number is drawn, so greedy decoding never depends on RNG state or tie order.
    """
    if cfg.top_k == 1:
        if logits.dim() != 1:
            raise ValueError(f"logits must be a 1-D [V] tensor, got shape {tuple(logits.shape)}")
        return int(torch.argmax(logits))
    probs = text_sampling_probs(logits, cfg)
    return int(torch.multinomial(probs, 1, generator=generator))
