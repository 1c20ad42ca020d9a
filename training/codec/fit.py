"""Fitting the WORLD VQ codec: feature statistics, k-means codebook, feature decoder.

1. WORLD analysis of every training sentence (`WorldCodec.frame_features`).
2. Per-feature normalisation: each feature group (envelope, log f0, voicing, aperiodicity)
   is divided by its pooled standard deviation and multiplied by its weight, so the k-means
   distance spends its bits on the spectral envelope, which carries the words.
3. k-means (Lloyd, on torch, seeded random init) of the token vectors into one codebook.
4. The feature decoder (`quantized_models.world_codec_net`) learns to predict each id's frames
   from the ids around it, by mean-squared error on the normalised unquantised frames.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from quantized_models.world_codec import WorldCodec, WorldCodecConfig, normalised_vectors
from quantized_models.world_codec_net import FeatureDecoder, FeatureDecoderDims

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitSettings:
    """Training settings of one codec."""

    kmeans_iters: int = 30
    """Lloyd iterations."""
    net_steps: int = 1500
    """Feature-decoder optimiser steps (0: no feature decoder, centroids are decoded)."""
    net_batch: int = 32
    """Crops per step."""
    net_crop_tokens: int = 48
    """Ids per crop."""
    net_lr: float = 2e-3
    """Peak AdamW learning rate (cosine decay to 10 %)."""


def empty_codec(config: WorldCodecConfig) -> WorldCodec:
    """A codec with identity normalisation: analysis only."""
    d = config.vector_dims
    return WorldCodec(config, np.zeros((config.n_codes, d)), np.zeros(d), np.ones(d))


def analyse(config: WorldCodecConfig, audio: list[np.ndarray]) -> list[np.ndarray]:
    """Frame features [F_u, frame_dims] of every utterance, padded to whole tokens."""
    codec = empty_codec(config)
    out = []
    for samples in tqdm(audio, desc="WORLD analysis", unit="sentence", mininterval=2.0):
        out.append(codec.token_frames(codec.frame_features(samples.astype(np.float64)), samples.size))
    return out


def normalisation(config: WorldCodecConfig, frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) [vector_dims] so that normalised = (raw - mean) / scale, group-weighted."""
    allf = np.concatenate(frames)  # [N, frame_dims]
    mean = allf.mean(axis=0)
    sp = config.sp_dims
    groups = [slice(0, sp), slice(sp, sp + 1), slice(sp + 1, sp + 2), slice(sp + 2, config.frame_dims)]
    scale = np.ones(config.frame_dims)
    for group, weight in zip(groups, config.weights):
        scale[group] = max(float((allf[:, group] - mean[group]).std()), 1e-6) / weight
    return np.tile(mean, config.groups_per_token), np.tile(scale, config.groups_per_token)


def kmeans(x: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Lloyd's k-means. x: [N, D] float32 -> centroids [k, D]; empty clusters are re-seeded."""
    gen = torch.Generator().manual_seed(seed)
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least {k} vectors, got {x.shape[0]}: train on more sentences")
    centroids = x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()
    for it in tqdm(range(iters), desc="k-means", unit="iter", mininterval=2.0):
        assign = ((centroids * centroids).sum(1)[None, :] - 2.0 * x @ centroids.T).argmin(1)  # [N]
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        reseed = x[torch.randint(x.shape[0], (k,), generator=gen)]
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], reseed)
        if it == iters - 1:
            logger.info("k-means: %d of %d codes used in the last assignment", int((counts > 0).sum()), k)
    return centroids


def train_feature_decoder(config: WorldCodecConfig, ids: list[np.ndarray], targets: list[np.ndarray],
                          settings: FitSettings, seed: int) -> tuple[FeatureDecoder, list[float]]:
    """Regression ids -> normalised frames. ids[u]: [T_u]; targets[u]: [T_u * F, frame_dims].

    Returns the net (eval mode) and the loss of every 50th step.
    """
    assert config.feature_decoder is not None
    dims = FeatureDecoderDims.from_json(config.feature_decoder, config.n_codes, config.frames_per_token,
                                        config.frame_dims)
    torch.manual_seed(seed)
    net = FeatureDecoder(dims)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.net_lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    crop, fpt = settings.net_crop_tokens, config.frames_per_token
    lengths = np.array([len(u) for u in ids])
    usable = np.flatnonzero(lengths >= crop)
    if usable.size == 0:
        raise ValueError(f"no training sentence has {crop} tokens")
    curve: list[float] = []
    bar = tqdm(range(settings.net_steps), desc="feature decoder", unit="step", mininterval=2.0)
    for step in bar:
        batch_ids, batch_targets = [], []
        for u in rng.choice(usable, settings.net_batch):
            start = int(rng.integers(0, lengths[u] - crop + 1))
            batch_ids.append(ids[u][start: start + crop])
            batch_targets.append(targets[u][start * fpt: (start + crop) * fpt])
        x = torch.from_numpy(np.stack(batch_ids))  # [B, crop]
        y = torch.from_numpy(np.stack(batch_targets)).float()  # [B, crop * F, frame_dims]
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            progress = step / max(1, settings.net_steps - 1)
            group["lr"] = settings.net_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))
        opt.step()
        if step % 50 == 0 or step == settings.net_steps - 1:
            curve.append(float(loss.detach()))
            bar.set_postfix(loss=f"{curve[-1]:.3f}")
    return net.eval(), curve


def fit_codec(config: WorldCodecConfig, audio: list[np.ndarray], settings: FitSettings,
              seed: int) -> tuple[WorldCodec, dict]:
    """Fit codebook (and feature decoder) on utterances [S_u] at config.sampling_rate.

    Returns the codec and a report (times, losses, code usage).
    """
    times: dict[str, float] = {}
    t0 = time.monotonic()
    frames = analyse(config, audio)
    times["analysis_s"] = time.monotonic() - t0
    mean, scale = normalisation(config, frames)
    vectors = [normalised_vectors(config, f, mean, scale) for f in frames]
    t0 = time.monotonic()
    x = torch.from_numpy(np.concatenate(vectors)).float()
    codebook = kmeans(x, config.n_codes, settings.kmeans_iters, seed).double().numpy()
    times["kmeans_s"] = time.monotonic() - t0
    codec = WorldCodec(config, codebook, mean, scale)
    ids = [codec.quantize(v) for v in vectors]
    distortion = float(np.mean([((v - codebook[i]) ** 2).sum(1).mean() for v, i in zip(vectors, ids)]))
    report: dict = {"tokens": int(x.shape[0]), "kmeans_distortion": distortion,
                    "codes_used": int(np.unique(np.concatenate(ids)).size)}
    if config.feature_decoder is not None and settings.net_steps > 0:
        t0 = time.monotonic()
        f_mean, f_scale = codec.frame_mean_scale()
        targets = [(f - f_mean) / f_scale for f in frames]
        net, curve = train_feature_decoder(config, ids, targets, settings, seed)
        times["feature_decoder_s"] = time.monotonic() - t0
        report["feature_decoder_loss"] = curve
        codec = WorldCodec(config, codebook, mean, scale, net)
    report["times"] = times
    return codec.eval(), report
