"""`freeze-omni train codec` and `freeze-omni eval codec`: argparse builders and handlers.

Registered from `training/cli.py` (CODEC_STEP_PARSERS / CODEC_STEP_HANDLERS) and
`training/eval_cli.py` (`add_codec_eval_parser`, `run_codec_eval`).
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_SENTENCES = 480
DEFAULT_HELDOUT_SENTENCES = 100


def _add_train_codec(steps: argparse._SubParsersAction) -> None:
    p = steps.add_parser("codec", help="fit the WORLD VQ codec on piper's joe voice (writes OUT/codec/)")
    p.add_argument("--out", type=Path, required=True,
                   help="output directory (OUT/codec/ is the model's codec folder)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sentence choice, k-means and the feature decoder")
    p.add_argument("--sentences", type=int, default=DEFAULT_TRAIN_SENTENCES,
                   help="training sentences (from the text bank's train split)")
    p.add_argument("--codes", type=int, default=1024, help="codebook size")
    p.add_argument("--net-steps", type=int, default=0,
                   help="feature-decoder steps (default 0: decode codebook centroids; "
                        "see training/README.md)")
    p.add_argument("--constant-pitch", action="store_true",
                   help="ids do not code f0: speech is synthesised at the voice's mean pitch, and the "
                        "codebook spends its codes on the spectral envelope (measured: no gain over coded "
                        "pitch; see training/README.md)")


def run_train_codec(args: argparse.Namespace) -> int:
    from training.codec.train import train_codec

    report = train_codec(args.out, args.seed, args.sentences, args.codes, args.net_steps,
                         constant_pitch=args.constant_pitch)
    print(f"codec written to {args.out / 'codec'}: {report['n_codes']} codes, "
          f"{report['tokens_per_s']:.0f} tokens/s, {report['sentences']} sentences "
          f"({report['audio_s']:.0f} s of audio) in {report['times']['total_s']:.0f} s")
    return 0


def _add_train_unit_codec(steps: argparse._SubParsersAction) -> None:
    p = steps.add_parser("unit-codec", help="fit the piper-unit codec on piper's joe voice (writes OUT/codec/)")
    p.add_argument("--out", type=Path, required=True,
                   help="output directory (OUT/codec/ is the model's codec folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sentence choice, k-means and the encoder")
    p.add_argument("--sentences", type=int, default=2400,
                   help="training sentences (the text bank's train split; 800 overfit the encoder)")
    p.add_argument("--codes", type=int, default=1024, help="codebook size")
    p.add_argument("--encoder-steps", type=int, default=3000, help="unit-encoder training steps (batch 16)")


def run_train_unit_codec(args: argparse.Namespace) -> int:
    from training.codec.units import UnitFitSettings, train_unit_codec

    report = train_unit_codec(args.out, UnitFitSettings(sentences=args.sentences, n_codes=args.codes,
                                                        encoder_steps=args.encoder_steps, seed=args.seed))
    print(f"codec written to {args.out / 'codec'}: {report['n_codes']} codes, "
          f"{report['tokens_per_s']:.1f} tokens/s, {report['sentences']} sentences "
          f"({report['audio_s']:.0f} s of audio) in {report['times']['total_s']:.0f} s")
    return 0


CODEC_STEP_PARSERS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "codec": _add_train_codec, "unit-codec": _add_train_unit_codec}
CODEC_STEP_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "codec": run_train_codec, "unit-codec": run_train_unit_codec}


def add_codec_eval_parser(kinds: argparse._SubParsersAction) -> None:
    """`eval codec` under the `eval` subcommand."""
    p = kinds.add_parser("codec", help="pocketsphinx WER of codec resyntheses vs. the original piper audio")
    p.add_argument("--codec-dir", type=Path, required=True, help="codec folder (model.json + final.pt)")
    p.add_argument("--limit", type=int, default=DEFAULT_HELDOUT_SENTENCES,
                   help="held-out sentences (from the text bank's test split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sentence choice")
    p.add_argument("--speech-cache", type=Path, default=None,
                   help="an .npz of piper's renderings to reuse (written on first use): piper samples "
                        "its speech afresh on every call, so only a shared cache compares codecs on "
                        "the same audio")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_codec_eval(args: argparse.Namespace) -> int:
    from training.codec.evaluate import eval_codec

    report = eval_codec(args.codec_dir, args.limit, args.seed, args.speech_cache)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:16s} {value:.4f}" if isinstance(value, float) else f"{key:16s} {value}")
    return 0
