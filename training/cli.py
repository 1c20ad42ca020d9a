"""`freeze-omni train <step>`: the `train` subcommand and its steps.

`assistant/cli.py` calls `add_train_parsers(sub)` to create the `train` subparser and
`run_train(args)` to run it. A step registers itself in two places: a function that adds its
arguments to `add_train_parsers`' step subparsers (`STEP_PARSERS`) and a handler in
`TRAIN_HANDLERS`; both are keyed by the step's name. Heavy imports happen inside handlers.
"""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path

from training.data.config import VALID_VOICES

logger = logging.getLogger(__name__)


def _add_data(steps: argparse._SubParsersAction) -> None:
    p = steps.add_parser("data", help="synthesize the speech data set (texts, LLM answers, audio, manifest)")
    p.add_argument("--out", type=Path, required=True, help="output directory (a second run resumes it)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--size", choices=["small", "full"], default="small",
                   help="small: a handful of espeak utterances (CI); full: the training set")
    p.add_argument("--llm-dir", type=Path, default=None,
                   help="frozen LLM folder for texts and answers (full default: the converted SmolLM2; "
                        "small default: templates only)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="processes rendering the audio (default: one per CPU this process may use)")
    p.add_argument("--valid-voices", choices=VALID_VOICES, default="training",
                   help="voices of the valid split: training (train's voices) or unheard (espeak voices "
                        "of neither train nor test, so choices made on valid are judged on new voices; "
                        "train and test stay the same)")


def run_data(args: argparse.Namespace) -> int:
    from training.data.synthesize import synthesize

    llm_dir = args.llm_dir
    if llm_dir is None and args.size == "full":
        from quantized_models.smollm2 import prepare_smollm2

        llm_dir = prepare_smollm2()
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    meta = synthesize(args.out, args.seed, args.size, llm_dir, args.workers, args.valid_voices)
    counts, times = meta["counts"], meta["times_s"]
    print(f"{counts['utterances']} utterances, {counts['audio_hours']:.2f} h of audio in {args.out} "
          f"({times['total']:.0f} s; {times['reused_wavs']} wavs reused)")
    for key, value in counts["per_split_kind"].items():
        print(f"  {key:20s} {value}")
    return 0


STEP_PARSERS: dict[str, Callable[[argparse._SubParsersAction], None]] = {"data": _add_data}
"""Step name → function adding the step's subparser."""
TRAIN_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {"data": run_data}
"""Step name → handler returning the exit status."""

from training.stages_cli import STAGE_HANDLERS, STAGE_PARSERS  # noqa: E402  (stage1..3, export)

STEP_PARSERS.update(STAGE_PARSERS)
TRAIN_HANDLERS.update(STAGE_HANDLERS)
from training.codec.cli import CODEC_STEP_HANDLERS, CODEC_STEP_PARSERS  # noqa: E402  (codec)

STEP_PARSERS.update(CODEC_STEP_PARSERS)
TRAIN_HANDLERS.update(CODEC_STEP_HANDLERS)
from training.tts.cli import TTS_HANDLERS, TTS_PARSERS  # noqa: E402  (tts-decoder, tts-prefix, tts-export)

STEP_PARSERS.update(TTS_PARSERS)
TRAIN_HANDLERS.update(TTS_HANDLERS)


def add_train_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `train` and one subparser per registered step to the main CLI's subparsers."""
    train = sub.add_parser("train", help="train the speech-input stages (data, stage1, ...)")
    steps = train.add_subparsers(dest="train_step", required=True)
    for add in STEP_PARSERS.values():
        add(steps)


def run_train(args: argparse.Namespace) -> int:
    """Run the chosen step; its library loggers report progress at INFO."""
    for name in ("training", "quantized_models.smollm2"):
        if logging.getLogger(name).getEffectiveLevel() > logging.INFO:
            logging.getLogger(name).setLevel(logging.INFO)
    return TRAIN_HANDLERS[args.train_step](args)
