"""Where a speech decoder loses words: pocketsphinx WER of the codec's decode of piper's ids, of
the decoder's greedy guess at each position under teacher forcing, and of its free-running greedy
output (its own ids fed back, ended by EOS), on the held-out pairs of a kept pairs archive; and how
the free-running ids' runs of equal ids compare with piper's (`runs_ratio`, `run_error_rate`).

    python tools/decoder-drift.py DECODER [--codec-dir training/artifacts/codec]
        [--pairs training/artifacts/speech-output/pairs.jsonl.gz] [--limit 40] [--split train]

DECODER is a tts-decoder result (run directory, result.pt or a kept float16 artifact). A large gap
between the teacher-forced and the free-running WER means the decoder drifts on its own ids
(`train tts-decoder --own-input-rate`). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from quantized_models.smollm2 import prepare_smollm2
from quantized_models.speech_decoder import generate_codec_tokens, split_llm_rows
from training.codec.api import load_codec_encoder
from training.codec.asr import Recognizer
from training.eval import normalise_words, word_errors
from training.llm_sequence import load_frozen_llm
from training.tts.decoder_forward import teacher_forced_logits
from training.tts.decoder_model import DecoderExample, decoder_from_result, load_decoder_result, make_batch
from training.tts.kept_pairs import codec_fingerprint, read_kept_pairs
from training.tts.pairs import TARGETS
from training.tts.stage_decoder import examples_of


@torch.no_grad()
def free_running_ids(decoder, example: DecoderExample, embed, max_ids: int) -> list[int]:
    """The engine's greedy decode (`generate_codec_tokens`, top-k 1, no prefix) of the example's text."""
    rows = split_llm_rows(embed(torch.tensor(example.text_ids)).float(), decoder.dims.idim)
    return list(generate_codec_tokens(decoder, rows, None, top_k=1, max_tokens=max_ids))


def runs_of(ids: list[int]) -> list[int]:
    """One id per run of equal ids (unit codecs hold an id while a sound lasts)."""
    return [i for k, i in enumerate(ids) if k == 0 or ids[k - 1] != i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("decoder", type=Path)
    parser.add_argument("--codec-dir", type=Path, default=Path("training/artifacts/codec"))
    parser.add_argument("--pairs", type=Path, default=Path("training/artifacts/speech-output/pairs.jsonl.gz"))
    parser.add_argument("--limit", type=int, default=40, help="held-out pairs (the archive has 40)")
    parser.add_argument("--targets", choices=TARGETS, default="speech",
                        help="the archive's --targets (default speech)")
    parser.add_argument("--split", choices=("valid", "train"), default="valid",
                        help="held-out pairs (default) or pairs the decoder trained on: a decoder far "
                             "better on train than on valid is short of data, not of steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    codec = load_codec_encoder(args.codec_dir)
    kept = read_kept_pairs(args.pairs, codec_fingerprint(args.codec_dir, args.targets))
    pairs = [p for p in kept if p.split == args.split]
    causal_lm, tokenizer = load_frozen_llm(prepare_smollm2())
    embed = causal_lm.get_input_embeddings()
    decoder = decoder_from_result(load_decoder_result(args.decoder)).float().eval()
    recognizer, errors, words = Recognizer(), {"piper_ids": 0, "teacher_forced": 0, "free_running": 0}, 0
    runs = {"piper": 0, "free_running": 0, "run_errors": 0}
    for pair, example in list(zip(pairs, examples_of(pairs, tokenizer)))[:args.limit]:
        batch = make_batch([example], embed, decoder.dims.idim, decoder.dims.pad_id)
        with torch.no_grad():
            guesses = teacher_forced_logits(decoder, batch).logits[:-1, :decoder.dims.odim].argmax(-1)
        ids = {"piper_ids": example.tokens, "teacher_forced": guesses.tolist(),
               "free_running": free_running_ids(decoder, example, embed, 2 * len(example.tokens) + 20)}
        piper_runs, free_runs = runs_of(list(example.tokens)), runs_of(ids["free_running"])
        runs["piper"] += len(piper_runs)
        runs["free_running"] += len(free_runs)
        runs["run_errors"] += word_errors(free_runs, piper_runs)  # Levenshtein over ids
        reference = normalise_words(pair.text)
        words += len(reference)
        for key, sequence in ids.items():
            pcm = codec.decode(np.asarray(sequence or [0], dtype=np.int64)).astype(np.float32)
            heard = recognizer.transcribe(pcm, codec.sample_rate_hz)
            errors[key] += word_errors(normalise_words(heard), reference)
    print(json.dumps({key: round(value / max(1, words), 4) for key, value in errors.items()}
                     | {"words": words, "pairs": min(args.limit, len(pairs)),
                        # runs of equal ids, free-running against piper's, and the edit distance
                        # between the two run sequences per piper run (exact ids)
                        "runs_ratio": round(runs["free_running"] / max(1, runs["piper"]), 3),
                        "run_error_rate": round(runs["run_errors"] / max(1, runs["piper"]), 3)}))


if __name__ == "__main__":
    main()
