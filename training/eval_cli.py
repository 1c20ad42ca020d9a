"""`freeze-omni eval asr|states` and `freeze-omni transcribe`: argparse builders and handlers."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from training.eval import METRIC_KEYS, eval_asr, eval_states
from training.codec.cli import add_codec_eval_parser, run_codec_eval
from training.stages_cli import add_compute_args
from training.tts.cli import add_tts_eval_parser, run_eval_tts

logger = logging.getLogger(__name__)


def add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    """`eval asr|states` and `transcribe` subparsers of the main CLI."""
    ev = sub.add_parser("eval", help="evaluate a trained model on the data set's held-out test split")
    kinds = ev.add_subparsers(dest="eval_kind", required=True)
    for name, text in (("asr", "word error rate of the LLM's transcripts"),
                       ("states", "turn-end decisions of the state head"),
                       ("dialogue", "spoken questions answered as the same questions typed")):
        p = kinds.add_parser(name, help=text)
        _add_model_args(p)
        p.add_argument("--data", type=Path, required=True, help="data directory with manifest.jsonl")
        p.add_argument("--limit", type=int, default=None,
                       help="evaluate only N utterances, evenly spread over the test split")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        if name != "dialogue":
            p.add_argument("--by-voice", action="store_true",
                           help="also report each voice group (espeak accent, noise event) on its own "
                                "(JSON: the key `by_voice`)")
        if name == "asr":
            _add_beam_arg(p)
    add_tts_eval_parser(kinds)
    add_codec_eval_parser(kinds)
    p = sub.add_parser("transcribe", help="print the frozen LLM's transcript of a speech file")
    _add_model_args(p)
    p.add_argument("--input", type=Path, required=True, help="speech wav (any rate, any channels)")
    _add_beam_arg(p)


def _add_beam_arg(p: argparse.ArgumentParser) -> None:
    from training.transcribe import DEFAULT_BEAM_WIDTH, DEFAULT_CTC_NBEST

    p.add_argument("--beam-width", type=_positive_int, default=DEFAULT_BEAM_WIDTH,
                   help=f"beam search width of the LLM's transcript (1: greedy; default {DEFAULT_BEAM_WIDTH})")
    p.add_argument("--ctc-weight", type=_non_negative_float, default=None,
                   help="weight of the model directory's CTC head (ctc_head.pt) in the beam (0: the LLM "
                        "alone; default: the weight its TRAINING.json records)")
    p.add_argument("--ctc-nbest", type=_non_negative_int, default=DEFAULT_CTC_NBEST,
                   help="the CTC head's likeliest transcripts (of words one LLM token spells) that the LLM "
                        f"spells out as more candidates beside the beam's (0: none; default {DEFAULT_CTC_NBEST})")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, required=True, help="trained model directory (released layout)")
    p.add_argument("--llm-dir", type=Path, default=None, help="frozen LLM (default: the converted SmolLM2)")
    add_compute_args(p, bf16=False)


def _llm_dir(args: argparse.Namespace) -> Path:
    if args.llm_dir is not None:
        return args.llm_dir
    from quantized_models.smollm2 import prepare_smollm2

    return prepare_smollm2()


def _load(args: argparse.Namespace):
    import torch

    from quantized_models.model_dir import load_models
    from training.device import set_torch_threads, training_device

    set_torch_threads(args.threads)
    return load_models(args.model_dir, _llm_dir(args), training_device(args.device), torch.float32)


def run_eval(args: argparse.Namespace) -> int:
    if args.eval_kind == "tts":
        return run_eval_tts(args)
    if args.eval_kind == "codec":  # needs no model directory or LLM
        return run_codec_eval(args)
    models = _load(args)
    keys = METRIC_KEYS
    if args.eval_kind == "asr":
        from training.transcribe import model_ctc_decoding, model_no_speech_probability

        metrics = eval_asr(models, args.data, args.limit, args.beam_width,
                           model_no_speech_probability(args.model_dir),
                           model_ctc_decoding(args.model_dir, args.ctc_weight, args.ctc_nbest))
    elif args.eval_kind == "dialogue":
        from training.eval_dialogue import DIALOGUE_METRIC_KEYS, eval_dialogue

        metrics, keys = eval_dialogue(models, _llm_dir(args), args.data, args.limit), DIALOGUE_METRIC_KEYS
    else:
        from assistant.engine import Engine, EngineOptions

        metrics = eval_states(Engine(models, EngineOptions()), args.data, args.limit)
    report = {key: metrics.get(key) for key in keys}
    by_voice = metrics.get("by_voice") if getattr(args, "by_voice", False) else None
    if args.json:
        print(json.dumps(report if by_voice is None else report | {"by_voice": by_voice}))
        return 0
    _print_metrics(report)
    for group, group_metrics in (by_voice or {}).items():
        print(f"\n{group}")
        _print_metrics(group_metrics, indent="  ")
    return 0


def _print_metrics(metrics: dict, indent: str = "") -> None:
    for key, value in metrics.items():
        if value is not None:
            text = f"{value:.4f}" if isinstance(value, float) else f"{value}"
            print(f"{indent}{key:26s} {text}")


def run_transcribe(args: argparse.Namespace) -> int:
    from audio_io.constants import MODEL_INPUT_RATE_HZ
    from audio_io.wav_file import read_mono
    from training.transcribe import model_ctc_decoding, model_no_speech_probability, transcribe

    samples = np.asarray(read_mono(args.input, MODEL_INPUT_RATE_HZ), dtype=np.float32)
    if not _has_speech(samples, MODEL_INPUT_RATE_HZ):
        logger.warning("%s holds no speech (voice activity detection): no transcript", args.input)
        print("")
        return 0
    threshold = model_no_speech_probability(args.model_dir)
    ctc = model_ctc_decoding(args.model_dir, args.ctc_weight, args.ctc_nbest)
    print(transcribe(_load(args), samples, beam_width=args.beam_width, no_speech_end_probability=threshold,
                     ctc=ctc))
    return 0


def _has_speech(samples: np.ndarray, rate_hz: int) -> bool:
    """Whether webrtcvad finds speech anywhere in `samples`: the LLM writes a sentence for
    silence or a faint hiss (training/README.md), so such files are not sent to it."""
    from audio_io.vad import VadEventKind, VadGate

    gate = VadGate(sample_rate_hz=rate_hz)
    margin = np.zeros(rate_hz // 2, dtype=np.float32)  # the gate's settling time falls on silence
    events = gate.push(np.concatenate([margin, samples, margin]))
    return any(event.kind == VadEventKind.START for event in events)
