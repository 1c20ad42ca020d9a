"""Training aids for codecs whose ids repeat while a sound holds (the piper-unit codec).

Most unit ids repeat the one before (one code per phoneme, held for its frames: 61 % of the
voice-unit targets). Under teacher forcing, copying the previous id is then right most of the
time, and a decoder that learned mostly that holds each sound too long and skips phonemes when
it runs on its own ids (measured on 40 held-out pairs: 38.5 % as many runs of equal ids as
piper's; single runs of up to 66 ids). Two remedies, both off by default:

- `transition_weights`: the cross-entropy counts the targets that change the id (and EOS) W times,
  so the positions that decide when and to what the sound changes outweigh the copies.
- `noisy_inputs`: a share of the AR input ids is replaced by random codec ids, so the previous id
  is not always there to copy and the decoder must read the text (as Tacotron's always-on
  pre-net dropout does for the previous frame).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def check_transition_settings(weight: float, noise_rate: float) -> None:
    """ValueError unless the weight is at least 1 and the noise rate a share below 1."""
    if weight < 1.0:
        raise ValueError(f"transition weight multiplies the loss of changing ids: give 1 or more, not {weight}")
    if not 0.0 <= noise_rate < 1.0:
        raise ValueError(f"input noise rate is a share of the input ids: give a value in [0, 1), not {noise_rate}")


def transition_weights(tokens: Tensor, token_lengths: list[int], weight: float) -> Tensor:
    """[K] loss weights in `teacher_forced_logits`' target order ([y1 .. yL, EOS] per sequence):
    `weight` where the target differs from the id before it (y1 after SOS and EOS count), 1 where
    it repeats it."""
    out = []
    for b, n_tok in enumerate(token_lengths):
        ids = tokens[b, :n_tok]
        changes = torch.ones(n_tok + 1, dtype=torch.bool)
        changes[1:n_tok] = ids[1:] != ids[:-1]
        out.append(torch.where(changes, weight, 1.0))
    return torch.cat(out)


def noisy_inputs(inputs: Tensor, token_lengths: list[int], rate: float, n_codes: int,
                 rng: np.random.Generator) -> Tensor:
    """A copy of the [B, L] AR inputs with a share `rate` of each sequence's ids replaced by
    uniformly drawn codec ids (padding untouched)."""
    noisy = inputs.clone()
    for b, n_tok in enumerate(token_lengths):
        swap = torch.from_numpy(rng.random(n_tok) < rate)
        drawn = torch.from_numpy(rng.integers(0, n_codes, n_tok)).to(noisy.dtype)
        noisy[b, :n_tok] = torch.where(swap.to(noisy.device), drawn.to(noisy.device), noisy[b, :n_tok])
    return noisy
