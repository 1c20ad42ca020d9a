"""Command line of the speech output: `train tts-decoder|tts-prefix|tts-export`, `eval tts`, `say`.

Registered by one-line hooks in `training.cli` (STEP_PARSERS / TRAIN_HANDLERS),
`training.eval_cli` (`eval tts`) and `assistant.cli` (`say`). Heavy imports happen in handlers.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from training.stages_cli import add_compute_args, loop_config

DEFAULT_SAY_TOP_K = 2  # the released server.json decoder_top_k
DEFAULT_SEGMENT_CAP_S = 10.0  # a sentence longer than this is a decoder that failed to stop


def _add_loop_args(p: argparse.ArgumentParser, steps: int, lr: float, batch: int) -> None:
    p.add_argument("--data", type=Path, required=True,
                   help="part-1 data directory (its texts.json) or a texts.json bank")
    p.add_argument("--codec-dir", type=Path, required=True,
                   help="trained codec folder (model.json + final.pt)")
    p.add_argument("--llm-dir", type=Path, default=None, help="frozen LLM (default: the converted SmolLM2)")
    p.add_argument("--out", type=Path, required=True,
                   help="run directory (pairs, checkpoints, loss.csv, result.pt)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=batch, help="segments per step")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even if the run directory has a checkpoint")
    p.add_argument("--train-limit", type=int, default=None, help="use only N training texts (evenly spread)")
    p.add_argument("--max-codec-tokens", type=int, default=400, help="leave out longer segments")
    p.add_argument("--speech-cache", type=Path, default=None,
                   help="folder of piper renderings, shared between runs (default: OUT/speech)")
    p.add_argument("--pairs-from", type=Path, default=None,
                   help="kept pairs (tools/keep-pairs.py) to start with: only texts they lack are spoken; "
                        "refused unless they were encoded by --codec-dir's codec")
    p.add_argument("--own-input-rate", type=float, default=0.0,
                   help="share (0..1) of the input codec ids replaced by the decoder's own greedy "
                        "predictions (scheduled sampling: the engine feeds back its own ids; "
                        "default 0: teacher forcing)")
    p.add_argument("--own-input-passes", type=int, default=1,
                   help="prediction passes for those ids: each further pass predicts again from the "
                        "previous pass's mixed inputs (default 1)")
    add_compute_args(p)


def add_tts_decoder(steps: argparse._SubParsersAction) -> None:
    from training.tts.pairs import TARGETS  # light: no torch

    p = steps.add_parser("tts-decoder", help="train the speech decoder + pre-network on text -> codec ids")
    _add_loop_args(p, steps=3000, lr=1e-3, batch=16)
    p.add_argument("--targets", choices=TARGETS, default="speech",
                   help="codec ids of each text: the codec's encoding of piper's audio (speech), or, with "
                        "the piper-unit codec, the units the voice itself speaks from (voice-units, exact); "
                        "tts-prefix then uses the same")
    p.add_argument("--rows-per-vector", type=int, default=4,
                   help="decoder rows per LLM vector (576 = 4 x 144)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=576)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--init", type=Path, default=None,
                   help="continue from a tts-decoder result (run directory, result.pt or a kept artifact); "
                        "its sizes replace --rows-per-vector/--heads/--ffn/--blocks")
    p.add_argument("--extra-data", type=Path, nargs="+", default=(),
                   help="more banks or data directories (e.g. `train data --seed 1`) whose train texts are "
                        "added, less any text --data holds out for valid or test")
    p.add_argument("--neighbour-smoothing", type=float, default=0.0,
                   help="share (0..1) of each target id's probability spread over the ids whose codebook "
                        "vectors lie near it, so acoustically close guesses cost less (default 0: one-hot)")
    p.add_argument("--neighbour-temperature", type=float, default=1.0,
                   help="width of that spread, in median nearest-neighbour squared distances (default 1)")
    p.add_argument("--guided-heads", type=int, default=0,
                   help="pull the attention of the first N heads of every layer but the first from the "
                        "codec ids over the text toward the diagonal (guided attention; default 0: off)")
    p.add_argument("--guided-width", type=float, default=0.2,
                   help="width of that diagonal, as a fraction of text and speech length (default 0.2)")
    p.add_argument("--guided-weight", type=float, default=1.0,
                   help="weight of the guided-attention cost beside the cross-entropy (default 1)")
    p.add_argument("--transition-weight", type=float, default=1.0,
                   help="loss weight of the targets that change the codec id, against 1 for those that "
                        "repeat it (unit codecs hold an id for a whole phoneme; default 1: plain mean)")
    p.add_argument("--input-noise-rate", type=float, default=0.0,
                   help="share (0..1) of the AR input ids replaced by random codec ids, so the decoder "
                        "cannot just copy the previous id (default 0: none)")


def add_tts_prefix(steps: argparse._SubParsersAction) -> None:
    p = steps.add_parser("tts-prefix", help="train the NAR prefix decoder on the LLM's answer hidden states")
    p.add_argument("--init", type=Path, required=True, help="tts-decoder run directory (or its result.pt)")
    _add_loop_args(p, steps=1000, lr=5e-4, batch=16)


def add_tts_export(steps: argparse._SubParsersAction) -> None:
    p = steps.add_parser("tts-export", help="write decoder/ (and codec/) of a model directory")
    p.add_argument("--init", type=Path, required=True, help="tts-decoder or tts-prefix run directory")
    p.add_argument("--codec-dir", type=Path, default=None, help="codec folder to copy beside it")
    p.add_argument("--out", type=Path, required=True, help="model directory (an existing audiollm/ is kept)")


def _setup(args: argparse.Namespace):
    from training.device import set_torch_threads

    set_torch_threads(args.threads)
    from training.codec import load_codec_encoder

    llm_dir = args.llm_dir
    if llm_dir is None:
        from quantized_models.smollm2 import prepare_smollm2

        llm_dir = prepare_smollm2()
    return load_codec_encoder(args.codec_dir), llm_dir


def _seed_kept_pairs(args: argparse.Namespace, pairs_name: str, targets: str) -> None:
    """Start the run's pairs file `pairs_name` with `--pairs-from`'s pairs (of `targets`), if given."""
    if args.pairs_from is not None:
        from training.tts.kept_pairs import codec_fingerprint, seed_pairs

        seed_pairs(args.out / pairs_name, args.pairs_from, codec_fingerprint(args.codec_dir, targets))


def run_tts_decoder(args: argparse.Namespace) -> int:
    from training.tts.decoder_model import DecoderGeometry
    from training.tts.stage_decoder import PAIRS_NAME, TtsDecoderConfig, train_tts_decoder

    codec, llm_dir = _setup(args)
    _seed_kept_pairs(args, PAIRS_NAME, args.targets)
    geometry = DecoderGeometry(args.rows_per_vector, args.heads, args.ffn, args.blocks)
    config = TtsDecoderConfig(geometry=geometry, loop=loop_config(args), batch_pairs=args.batch,
                              max_codec_tokens=args.max_codec_tokens,
                              train_limit=args.train_limit, speech_cache=args.speech_cache, init=args.init,
                              extra_data=tuple(args.extra_data), own_input_rate=args.own_input_rate,
                              own_input_passes=args.own_input_passes,
                              neighbour_smoothing=args.neighbour_smoothing,
                              neighbour_temperature_nn=args.neighbour_temperature,
                              guided_heads=args.guided_heads, guided_width=args.guided_width,
                              guided_weight=args.guided_weight, targets=args.targets,
                              transition_weight=args.transition_weight,
                              input_noise_rate=args.input_noise_rate)
    print(json.dumps(train_tts_decoder(args.data, codec, llm_dir, args.out, config)))
    return 0


def run_tts_prefix(args: argparse.Namespace) -> int:
    from training.tts.decoder_model import load_decoder_result
    from training.tts.stage_prefix import PAIRS_NAME, TtsPrefixConfig, train_tts_prefix, trained_targets

    codec, llm_dir = _setup(args)
    targets = trained_targets(load_decoder_result(args.init))  # the prefix learns the ids its decoder learned
    _seed_kept_pairs(args, PAIRS_NAME, targets)
    config = TtsPrefixConfig(loop=loop_config(args), batch_pairs=args.batch,
                             max_codec_tokens=args.max_codec_tokens,
                             train_limit=args.train_limit, speech_cache=args.speech_cache,
                             own_input_rate=args.own_input_rate,
                             own_input_passes=args.own_input_passes, targets=targets)
    print(json.dumps(train_tts_prefix(args.init, args.data, codec, llm_dir, args.out, config)))
    return 0


def run_tts_export(args: argparse.Namespace) -> int:
    from training.tts.export import export_decoder

    print(f"wrote {export_decoder(args.init, args.out, args.codec_dir)}")
    return 0


TTS_PARSERS = {"tts-decoder": add_tts_decoder, "tts-prefix": add_tts_prefix, "tts-export": add_tts_export}
"""Step name -> function adding its subparser (merged into `training.cli.STEP_PARSERS`)."""
TTS_HANDLERS = {"tts-decoder": run_tts_decoder, "tts-prefix": run_tts_prefix, "tts-export": run_tts_export}
"""Step name -> handler (merged into `training.cli.TRAIN_HANDLERS`)."""


def _add_speech_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, required=True, help="model directory (released layout)")
    p.add_argument("--llm-dir", type=Path, default=None, help="frozen LLM (default: the converted SmolLM2)")
    p.add_argument("--max-speech-tokens", type=int, default=None,
                   help=f"codec ids per text segment at most (default: {DEFAULT_SEGMENT_CAP_S:g} s of speech "
                        "at the model's codec rate: 500 WORLD ids, 858 piper-unit ids)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_compute_args(p, bf16=False)


def add_say_parser(sub: argparse._SubParsersAction) -> None:
    """`freeze-omni say --text ... --output speech.wav`."""
    p = sub.add_parser("say", help="speak a text through the speech decoder and codec (kiosk announcements)")
    p.add_argument("--text", required=True, help="what to say (spoken as the assistant's answer)")
    p.add_argument("--output", type=Path, required=True, help="wav to write (the codec's rate, 16-bit mono)")
    p.add_argument("--top-k", type=int, default=DEFAULT_SAY_TOP_K, help="speech-decoder top-k sampling")
    p.add_argument("--segmentation", choices=["sentence", "eager"], default="sentence")
    _add_speech_model_args(p)


def add_tts_eval_parser(kinds: argparse._SubParsersAction) -> None:
    """`freeze-omni eval tts`."""
    p = kinds.add_parser("tts", help="pocketsphinx WER of the speech output vs. piper on held-out answers")
    p.add_argument("--data", type=Path, required=True, help="part-1 data directory (texts.json) or a bank")
    p.add_argument("--limit", type=int, default=30, help="held-out answers to speak")
    p.add_argument("--top-k", default="1,2,3,4,5", help="comma-separated speech-decoder top-k values")
    p.add_argument("--prefix", choices=["both", "on", "off"], default="both")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--speech-cache", type=Path, default=None, help="folder of piper renderings to reuse")
    _add_speech_model_args(p)


def default_segment_cap(codec_dims) -> int:
    """Codec ids in DEFAULT_SEGMENT_CAP_S of speech at a codec's rate (its `dims`)."""
    return math.ceil(DEFAULT_SEGMENT_CAP_S * codec_dims.sampling_rate / codec_dims.samples_per_token)


def _engine(args: argparse.Namespace, top_k: int):
    import torch

    from assistant.engine import Engine, EngineOptions
    from assistant.segmentation import SegmentationRule
    from quantized_models.model_dir import load_models

    llm_dir = args.llm_dir
    if llm_dir is None:
        from quantized_models.smollm2 import prepare_smollm2

        llm_dir = prepare_smollm2()
    from training.device import set_torch_threads, training_device

    set_torch_threads(args.threads)
    models = load_models(args.model_dir, llm_dir, training_device(args.device), getattr(torch, args.dtype))
    rule = SegmentationRule(getattr(args, "segmentation", "sentence"))
    cap = default_segment_cap(models.codec.dims) if args.max_speech_tokens is None else args.max_speech_tokens
    return Engine(models, EngineOptions(speech_top_k=top_k, max_speech_tokens=cap, segmentation=rule))


def run_say(args: argparse.Namespace) -> int:
    from training.tts.speak import codec_rate_hz, say_to_wav

    engine = _engine(args, args.top_k)
    spoken = say_to_wav(engine, args.text, args.output, seed=args.seed)
    for seg in spoken.segments:
        print(f"  {len(seg['codec_tokens']):4d} codec ids ({seg['end_reason']}): {seg['tts_text']}")
    print(f"wrote {args.output} ({spoken.pcm.size / codec_rate_hz(engine):.2f} s)")
    return 0


def run_eval_tts(args: argparse.Namespace) -> int:
    from training.tts.eval_tts import METRIC_KEYS, eval_tts

    try:
        top_ks = [int(k) for k in args.top_k.split(",") if k.strip()]
    except ValueError as err:
        raise ValueError(f"--top-k takes comma-separated integers, got {args.top_k!r}") from err
    prefixes = {"both": (True, False), "on": (True,), "off": (False,)}[args.prefix]
    report = eval_tts(_engine(args, top_ks[0]), args.data, top_ks, prefixes, args.limit, args.seed,
                      speech_cache=args.speech_cache)
    if args.json:
        print(json.dumps(report))
        return 0
    for key in METRIC_KEYS:
        print(f"{key:14s} {report[key]}")
    print("top_k prefix   wer     ratio   eos_rate")
    for row in report["table"]:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        eos = "-" if row["eos_rate"] is None else f"{row['eos_rate']:.3f}"
        print(f"{row['top_k']:5d} {str(row['prefix']):6s} {row['wer']:.4f}  {ratio:7s} {eos}")
    return 0
