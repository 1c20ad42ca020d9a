"""`eval_codec`: pocketsphinx WER on codec resyntheses of held-out piper sentences vs. the originals.

Both the original piper audio (resampled to the codec's rate) and its resynthesis
`decode(encode(audio))` get the same 0.3 s of silence on each side (pocketsphinx needs some
leading silence for its noise estimate) and go through one recognizer.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.codec.api import load_codec_encoder
from training.codec.asr import Recognizer
from training.codec.corpus import load_or_render, pick_sentences, render

logger = logging.getLogger(__name__)

PAD_S = 0.3  # silence around every utterance given to the recognizer
EVAL_SEED_OFFSET = 1  # held-out sentences are drawn with seed + 1 (independent of training's draw)


def eval_codec(codec_dir: Path, limit: int, seed: int = 0, speech_cache: Path | None = None) -> dict:
    """Keys: wer, reference_wer, ratio (wer / reference_wer), n (sentences), words.

    piper samples its speech afresh on every call, which moves `reference_wer` by a few points
    from run to run; `speech_cache` (an .npz, written on first use) keeps one rendering.
    """
    if speech_cache is not None and speech_cache.suffix != ".npz":
        raise ValueError(f"--speech-cache must name an .npz file, got {speech_cache}")
    codec = load_codec_encoder(codec_dir)  # before piper, so a bad folder fails fast
    texts = pick_sentences("test", limit, seed + EVAL_SEED_OFFSET)
    if speech_cache is None:
        corpus = render(texts, codec.sample_rate_hz, "piper (held out)")
    else:
        corpus = load_or_render(speech_cache, texts, codec.sample_rate_hz, "piper (held out)")
    recognizer = Recognizer()
    pad = np.zeros(int(PAD_S * codec.sample_rate_hz), dtype=np.float32)
    errors = ref_errors = words = 0
    for text, audio in tqdm(list(zip(texts, corpus.audio)), desc="eval codec", unit="sentence",
                            mininterval=2.0):
        resynth = codec.decode(codec.encode_wav(audio, codec.sample_rate_hz))
        e, n = recognizer.errors(np.concatenate([pad, resynth, pad]), codec.sample_rate_hz, text)
        e0, _ = recognizer.errors(np.concatenate([pad, audio, pad]), codec.sample_rate_hz, text)
        errors, ref_errors, words = errors + e, ref_errors + e0, words + n
    wer, reference_wer = errors / max(1, words), ref_errors / max(1, words)
    ratio = wer / reference_wer if reference_wer > 0 else (1.0 if wer == 0 else float("inf"))
    logger.info("codec WER %.3f, piper WER %.3f, ratio %.2f over %d sentences", wer, reference_wer, ratio,
                len(texts))
    return {"wer": wer, "reference_wer": reference_wer, "ratio": ratio, "n": len(texts), "words": words}
