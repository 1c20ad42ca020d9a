"""`train_codec`: render piper sentences, fit the WORLD VQ codec, write OUT/codec/ and a report."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from quantized_models.world_codec import WorldCodecConfig, save_world_codec
from training.codec.corpus import load_or_render, pick_sentences
from training.codec.fit import FitSettings, fit_codec

logger = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 24_000  # the engine's output rate, so the codec needs no resampling at run time
SAMPLES_PER_TOKEN = 480  # 20 ms: 50 ids/s (the released TiCodec: 600 samples, 40 ids/s)
FRAMES_PER_TOKEN = 4  # 5 ms WORLD frames
SP_DIMS = 40  # coded spectral envelope coefficients per frame
F0_RANGE_HZ = (60.0, 400.0)  # the joe voice speaks at about 90-200 Hz
WEIGHTS = (1.0, 0.25, 0.25, 0.25)  # envelope, log f0, voicing, aperiodicity in the k-means distance
FEATURE_DECODER = {"embed_dims": 96, "channels": 128, "kernel": 5, "layers": 3}  # +-6 ids of context


def default_config(n_codes: int, feature_decoder: bool, constant_pitch: bool = False) -> WorldCodecConfig:
    return WorldCodecConfig(
        sampling_rate=SAMPLE_RATE_HZ, samples_per_token=SAMPLES_PER_TOKEN,
        frames_per_token=FRAMES_PER_TOKEN, groups_per_token=1, n_codes=n_codes, sp_dims=SP_DIMS,
        f0_floor_hz=F0_RANGE_HZ[0], f0_ceil_hz=F0_RANGE_HZ[1], weights=WEIGHTS,
        feature_decoder=dict(FEATURE_DECODER) if feature_decoder else None, constant_pitch=constant_pitch,
    )


def train_codec(out: Path, seed: int, sentences: int, n_codes: int = 1024, net_steps: int = 0,
                constant_pitch: bool = False) -> dict:
    """Fit on `sentences` piper sentences of the bank's train split; write `out/codec/`.

    The rendered audio is kept in `out/corpus-train.npz`, so a second run with the same
    sentences skips piper. Returns the report also written to `out/codec-report.json`.
    """
    if sentences < 1:
        raise ValueError("--sentences must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    config = default_config(n_codes, feature_decoder=net_steps > 0, constant_pitch=constant_pitch)
    texts = pick_sentences("train", sentences, seed)
    corpus = load_or_render(out / "corpus-train.npz", texts, SAMPLE_RATE_HZ, "piper (train)")
    render_s = time.monotonic() - start
    logger.info("%d sentences, %.0f s of audio", len(texts), corpus.seconds)
    codec, report = fit_codec(config, corpus.audio, FitSettings(net_steps=net_steps), seed)
    save_world_codec(out / "codec", config, codec.codebook, codec.mean, codec.scale, codec.feature_decoder)
    report["times"]["render_s"] = render_s
    report["times"]["total_s"] = time.monotonic() - start
    report.update({"sentences": len(texts), "audio_s": corpus.seconds, "n_codes": n_codes,
                   "tokens_per_s": config.tokens_per_s, "samples_per_token": config.samples_per_token,
                   "seed": seed, "constant_pitch": constant_pitch})
    (out / "codec-report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    logger.info("codec written to %s (%.0f s)", out / "codec", report["times"]["total_s"])
    return report
