"""Which WORLD VQ codec settings keep the most words? Fits one k-means codebook per variant on the
same analysed frames and prints pocketsphinx's WER on the held-out sentences of `eval codec`.

    python tools/codec-variants.py --corpus RUN/corpus-train.npz --speech-cache HELD.npz \
        [--codec-dir training/artifacts/codec] [--frames CACHE.npz] VARIANT...

VARIANT is `committed` (the codec in --codec-dir as it is) or `NAME:key=value,...` with keys
`frames` (WORLD frames per id; the 5 ms frame stays, so samples per id change with it), `groups`
(groups_per_token), `codes`, `prosody` (weight of log f0, voicing and aperiodicity), `pitch`
(`constant`: ids do not code f0, `constant_pitch`) and `seed` (k-means), e.g. `f3:frames=3`,
`flat:pitch=constant` or `base-seed1:seed=1`. --corpus is the piper renderings a
`freeze-omni train codec` run keeps (`OUT/corpus-train.npz`); --speech-cache the rendering
`freeze-omni eval codec --speech-cache` keeps, so every variant hears the same audio. The WORLD
analysis of the corpus is done once and kept in --frames. Prints one JSON line per variant.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from quantized_models.world_codec import WorldCodec, WorldCodecConfig, load_world_codec, normalised_vectors
from training.codec.asr import Recognizer
from training.codec.corpus import load_or_render, pick_sentences
from training.codec.evaluate import EVAL_SEED_OFFSET, PAD_S
from training.codec.fit import empty_codec, kmeans, normalisation

KMEANS_ITERS = 30


def analysed_frames(analyser: WorldCodec, corpus: Path, cache: Path) -> list[np.ndarray]:
    """WORLD frames [F_u, frame_dims] of every corpus sentence, analysed once into `cache`."""
    if cache.is_file():
        with np.load(cache) as data:
            return np.split(data["frames"].astype(np.float64), np.cumsum(data["lens"])[:-1])
    with np.load(corpus) as data:
        audio = np.split(data["audio"], np.cumsum(data["lengths"])[:-1])
    frames = [analyser.frame_features(a.astype(np.float64)) for a in audio]
    np.savez(cache, frames=np.concatenate(frames).astype(np.float32), lens=[len(f) for f in frames])
    return frames


def whole_ids(codec: WorldCodec, frames: np.ndarray) -> np.ndarray:
    """Frames padded (last frame repeated, `WorldCodec.token_frames`) to a whole number of ids."""
    return codec.token_frames(frames, len(frames) * codec.dims.frame_samples)


def variant_config(base: WorldCodecConfig, spec: str) -> tuple[str, WorldCodecConfig, int]:
    name, _, settings = spec.partition(":")
    values = dict(item.split("=") for item in settings.split(",") if item)
    frames = int(values.get("frames", base.frames_per_token))
    prosody = float(values.get("prosody", base.weights[1]))
    pitch = values.get("pitch", "coded")
    if pitch not in ("coded", "constant"):
        raise SystemExit(f"{spec}: pitch is `coded` or `constant`, not {pitch!r}")
    config = dataclasses.replace(
        base, frames_per_token=frames, samples_per_token=base.frame_samples * frames,
        groups_per_token=int(values.get("groups", 1)), n_codes=int(values.get("codes", base.n_codes)),
        weights=(base.weights[0], prosody, prosody, prosody),
        constant_pitch=pitch == "constant")
    config.validate(spec)
    return name, config, int(values.get("seed", 0))


def fitted(config: WorldCodecConfig, frames: list[np.ndarray], seed: int) -> WorldCodec:
    analyser = empty_codec(config)
    padded = [whole_ids(analyser, f) for f in frames]
    mean, scale = normalisation(config, padded)
    x = torch.from_numpy(np.concatenate([normalised_vectors(config, f, mean, scale) for f in padded])).float()
    return WorldCodec(config, kmeans(x, config.n_codes, KMEANS_ITERS, seed).double().numpy(), mean, scale)


def held_out_wer(codec: WorldCodec, texts: list[str], frames: list[np.ndarray],
                 recognizer: Recognizer) -> float:
    cfg = codec.dims
    pad = np.zeros(int(PAD_S * cfg.sampling_rate), dtype=np.float32)
    errors = words = 0
    for text, f in zip(texts, frames):
        ids = codec.quantize(codec.frame_vectors(whole_ids(codec, f)))
        pcm = np.asarray(codec.decode_ids(ids), dtype=np.float32)
        e, n = recognizer.errors(np.concatenate([pad, pcm, pad]), cfg.sampling_rate, text)
        errors, words = errors + e, words + n
    return errors / max(1, words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--speech-cache", type=Path, required=True)
    parser.add_argument("--codec-dir", type=Path, default=Path("training/artifacts/codec"))
    parser.add_argument("--frames", type=Path, default=Path("codec-variant-frames.npz"))
    parser.add_argument("--limit", type=int, default=100, help="held-out sentences (as eval codec --limit)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    committed = load_world_codec(args.codec_dir).eval()
    texts = pick_sentences("test", args.limit, EVAL_SEED_OFFSET)
    held = load_or_render(args.speech_cache, texts, committed.dims.sampling_rate, "piper (held out)")
    held_frames = [committed.frame_features(np.asarray(a, np.float64)) for a in held.audio]
    train_frames = None
    recognizer = Recognizer()
    for spec in args.variants:
        start = time.monotonic()
        if spec == "committed":
            name, codec = spec, committed
        else:
            if train_frames is None:
                train_frames = analysed_frames(committed, args.corpus, args.frames)
            name, config, seed = variant_config(committed.dims, spec)
            codec = fitted(config, train_frames, seed)
        wer = held_out_wer(codec, texts, held_frames, recognizer)
        print(json.dumps({"variant": name, "wer": round(wer, 4),
                          "ids_per_s": round(codec.dims.tokens_per_s, 2), "n_codes": codec.dims.n_codes,
                          "seconds": round(time.monotonic() - start)}), flush=True)


if __name__ == "__main__":
    main()
