"""Where a WORLD codec loses words: pocketsphinx WER of piper, of WORLD resynthesis frame by frame,
of each id's frame means (no quantisation) and of the codec, on the same held-out sentences.

    python tools/codec-loss-breakdown.py CODEC_DIR [--limit 100] [--speech-cache F.npz]

The sentences are `eval codec`'s (same seed, same test split); with the same `--speech-cache`
both score the same piper rendering. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from training.codec.api import load_codec_encoder
from training.codec.asr import Recognizer
from training.codec.corpus import load_or_render, pick_sentences, render
from training.codec.evaluate import EVAL_SEED_OFFSET, PAD_S


def _variants(codec, audio: np.ndarray) -> dict[str, np.ndarray]:
    """The four renderings of one piper utterance (all float pcm at the codec's rate)."""
    x = np.asarray(audio, dtype=np.float64)
    frames = codec.token_frames(codec.frame_features(x), x.size)  # one WORLD analysis for all three
    vectors = codec.frame_vectors(frames)
    return {"piper": np.asarray(audio, dtype=np.float32),
            "world_frames": codec.synthesize_frames(frames),
            "world_means": codec.synthesize_vectors(vectors),
            "codec": codec.decode_ids(codec.quantize(vectors))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("codec_dir", type=Path)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speech-cache", type=Path, default=None, help="an .npz of piper renderings")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    encoder = load_codec_encoder(args.codec_dir)
    rate_hz = encoder.sample_rate_hz
    texts = pick_sentences("test", args.limit, args.seed + EVAL_SEED_OFFSET)
    corpus = (load_or_render(args.speech_cache, texts, rate_hz, "piper") if args.speech_cache
              else render(texts, rate_hz, "piper"))
    recognizer, pad = Recognizer(), np.zeros(int(PAD_S * rate_hz), dtype=np.float32)
    errors: dict[str, int] = {}
    words = 0
    for text, audio in zip(texts, corpus.audio):
        for name, pcm in _variants(encoder.codec, audio).items():
            e, n = recognizer.errors(np.concatenate([pad, pcm, pad]), rate_hz, text)
            errors[name] = errors.get(name, 0) + e
        words += n
    wer = {name: e / max(1, words) for name, e in errors.items()}
    print(json.dumps({name: round(v, 4) for name, v in wer.items()}
                     | {f"{name}_ratio": round(v / wer["piper"], 3) for name, v in wer.items() if wer["piper"]}
                     | {"words": words, "n": len(texts)}))


if __name__ == "__main__":
    main()
