"""Command line: `freeze-omni respond ...` (one spoken turn from a wav file)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from assistant.config_cli import add_config_parser, run_config
from training.cli import add_train_parsers, run_train
from training.eval_cli import add_eval_parsers, run_eval, run_transcribe
from training.tts.cli import add_say_parser, run_say

EXIT_BAD_INPUT = 2
OUTPUT_RATE_HZ = 24_000  # the codec's rate; checked against the loaded model
INPUT_RATE_HZ = 16_000  # the speech encoder's rate (Kaldi fbank at 16 kHz)

logger = logging.getLogger("freeze_omni")


def _add_respond(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("respond", help="answer one spoken question from a wav file")
    _add_model_args(p, required=False)  # default: the embedded model
    p.add_argument("--input", type=Path, required=True, help="question audio (any rate, any channels)")
    p.add_argument("--output", type=Path, required=True, help="answer wav (24 kHz mono PCM16)")
    p.add_argument("--turn-end", choices=["file", "model"], default="model",
                   help="file: the whole input is the turn; model: stop when the state head decides")
    p.add_argument("--text-top-k", type=int, default=20)
    p.add_argument("--text-top-p", type=float, default=0.8)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--speech-top-k", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-speech-tokens", type=int, default=1000, help="per text segment")
    p.add_argument("--segmentation", choices=["sentence", "eager"], default="sentence")
    p.add_argument("--role", default=None, help="system role text (default: the checkpoint's)")
    p.add_argument("--trace", type=Path, default=None, help="write the turn's trace JSON here")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time each component side by side; writes docs/BENCHMARKS.md")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--llm-dir", type=Path, default=None)
    p.add_argument("--random-model", choices=["mid", "official"], default=None,
                   help="build (once) and measure a random-weight model of this size instead")
    p.add_argument("--tokenizer-dir", type=Path, default=None,
                   help="Qwen2 tokenizer files for --random-model")
    p.add_argument("--backends", type=lambda s: s.split(","), default=["torch", "onnx"])
    p.add_argument("--quantization", type=lambda s: s.split(","), default=["none", "int8", "nf4"])
    p.add_argument("--chunks", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "freeze-omni")
    p.add_argument("--out", type=Path, default=Path("docs/BENCHMARKS.md"))
    _add_device_args(p)


def _add_bench_sessions(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-sessions",
                       help="sessions served in real time vs. executors; writes docs/BENCHMARKS.md")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--llm-dir", type=Path, default=None)
    p.add_argument("--random-model", choices=["mid", "official"], default=None,
                   help="build (once) and measure a random-weight model of this size instead")
    p.add_argument("--tokenizer-dir", type=Path, default=None, help="Qwen2 tokenizer for --random-model")
    p.add_argument("--executors", type=lambda s: tuple(int(x) for x in s.split(",")), default=(1, 2))
    p.add_argument("--sessions", type=lambda s: tuple(int(x) for x in s.split(",")), default=(1, 2, 4, 8, 16))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (executors run at once)")
    p.add_argument("--repeats", type=int, default=2, help="runs per trial; the best is kept")
    p.add_argument("--note", default="", help="a sentence about the machine, added under the table")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "freeze-omni")
    p.add_argument("--out", type=Path, default=Path("docs/BENCHMARKS.md"))
    _add_device_args(p)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-onnx", help="export encoder+adapter, speech decoder and codec to ONNX")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--llm-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    _add_device_args(p)


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    default = "" if required else " (default: the embedded small model)"
    p.add_argument("--model-dir", type=Path, required=required,
                   help="Freeze-Omni checkpoint directory" + default)
    p.add_argument("--llm-dir", type=Path, required=required,
                   help="local Hugging Face LLM directory" + default)
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="run encoder+adapter, speech decoder and codec on torch or onnxruntime")
    p.add_argument("--onnx-dir", type=Path, default=None, help="graphs written by `freeze-omni export-onnx`")
    p.add_argument("--quantization", choices=["none", "int8", "nf4"], default="none",
                   help="load the frozen LLM quantized with bitsandbytes")
    p.add_argument("--seed", type=int, default=None)
    _add_device_args(p)


def _add_run(sub: argparse._SubParsersAction) -> None:
    from assistant.run_daemon import add_run_arguments

    p = sub.add_parser("run", help="the full-duplex assistant on the local microphone and speaker")
    _add_model_args(p, required=False)  # `run` may take them from the config files instead
    add_run_arguments(p)
    sub.add_parser("devices", help="list audio devices (choose them by name substring)")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from assistant.serve import add_serve_arguments

    p = sub.add_parser("serve", help="the models and the session server for network clients, headless")
    _add_model_args(p, required=False)
    add_serve_arguments(p)


def _add_client(sub: argparse._SubParsersAction) -> None:
    from assistant.client import add_client_arguments

    p = sub.add_parser("client", help="microphone and speaker on a remote `freeze-omni serve` (PyAudio)")
    add_client_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freeze-omni", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="verbose logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_respond(sub)
    _add_export(sub)
    _add_bench(sub)
    _add_bench_sessions(sub)
    _add_run(sub)
    _add_serve(sub)
    _add_client(sub)
    add_train_parsers(sub)
    add_eval_parsers(sub)
    add_say_parser(sub)
    add_config_parser(sub)
    return parser


def _pick_device_and_dtype(device_arg: str, dtype_arg: str):
    import torch

    if device_arg == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device_arg} requested but no CUDA device is available")
    if dtype_arg == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, dtype_arg)
    return device, dtype


def _engine_options(args: argparse.Namespace, server_settings: dict):
    from assistant.engine import EngineOptions, SpeechEmission
    from assistant.segmentation import SegmentationRule
    from quantized_models.sampling import TextSamplingConfig

    eager = args.segmentation == "eager"
    return EngineOptions(
        text_sampling=TextSamplingConfig(
            temperature=args.temperature, top_k=args.text_top_k, top_p=args.text_top_p
        ),
        speech_top_k=args.speech_top_k,
        max_new_tokens=args.max_new_tokens,
        max_speech_tokens=args.max_speech_tokens,
        segmentation=SegmentationRule.EAGER if eager else SegmentationRule.SENTENCE,
        emission=SpeechEmission.from_server_json(server_settings) if eager else SpeechEmission(),
    )


def _print_turn(result, out_path: Path) -> None:
    print("state timeline (p_respond / p_ignore per 160 ms chunk):")
    for i, chunk in enumerate(result.chunks):
        print(f"  {i * 160:6d} ms  p1={chunk.probs[1]:.3f} p2={chunk.probs[2]:.3f}  {chunk.decision.value}")
    if not result.answered:
        print("decision: ignore (no answer)")
    else:
        print(f"answer ({len(result.tokens)} tokens, {result.end_reason}): {result.text}")
    t = result.times
    per_chunk_ms = 1000 * t.listen_s / max(1, t.listen_chunks)
    per_token_ms = 1000 * t.text_s / max(1, t.text_tokens)
    print("time per stage:")
    print(f"  system prefill   {1000 * t.system_prefill_s:9.1f} ms")
    print(f"  listening        {1000 * t.listen_s:9.1f} ms  "
          f"({t.listen_chunks} chunks, {per_chunk_ms:.1f} ms/chunk)")
    print(f"  text generation  {1000 * t.text_s:9.1f} ms  "
          f"({t.text_tokens} tokens, {per_token_ms:.1f} ms/token)")
    print(f"  speech synthesis {1000 * t.speech_s:9.1f} ms  ({len(result.segments)} segments)")
    if t.first_pcm_after_turn_end_s is not None:
        print(f"  turn end → first audio {1000 * t.first_pcm_after_turn_end_s:.1f} ms")
    print(f"wrote {out_path} ({len(result.pcm) / OUTPUT_RATE_HZ:.2f} s)")


def run_respond(args: argparse.Namespace) -> int:
    from assistant.engine import Engine
    from assistant.respond import TurnEnd, run_turn
    from audio_io.wav_file import read_mono, write_pcm16
    from quantized_models.embedded_model import resolve_model_paths
    from quantized_models.model_dir import check_model_dir

    if args.model_dir is not None:
        check_model_dir(args.model_dir)  # fail fast, before reading audio or loading the LLM
    samples = read_mono(args.input, INPUT_RATE_HZ)
    args.model_dir, args.llm_dir = resolve_model_paths(args.model_dir, args.llm_dir)
    models = _load_for_dialogue(args)
    if models.codec.dims.sampling_rate != OUTPUT_RATE_HZ:
        logger.warning("codec rate is %d Hz", models.codec.dims.sampling_rate)
    engine = Engine(models, _engine_options(args, models.server_settings))
    result = run_turn(engine, samples, TurnEnd(args.turn_end), args.seed, args.role)
    write_pcm16(args.output, result.pcm, models.codec.dims.sampling_rate)
    if args.trace is not None:
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        args.trace.write_text(json.dumps(result.trace(models.codec.dims.sampling_rate),
                                         ensure_ascii=False, indent=1), encoding="utf-8")
    _print_turn(result, args.output)
    return 0


def _load_for_dialogue(args: argparse.Namespace):
    from quantized_models.model_dir import load_models

    if args.backend == "onnx" and args.onnx_dir is None:
        raise ValueError("--backend onnx needs --onnx-dir (write it with `freeze-omni export-onnx`)")
    device, dtype = _pick_device_and_dtype(args.device, args.dtype)
    models = load_models(args.model_dir, args.llm_dir, device, dtype, quantization=args.quantization)
    if args.backend == "onnx":
        from quantized_models.onnx_runtime import load_onnx_backends

        models.backends = load_onnx_backends(models, args.onnx_dir)
    return models


def run_run(args: argparse.Namespace) -> int:
    from assistant.config import ConfigError
    from assistant.config_cli import print_problems
    from assistant.observability import configure_logging
    from assistant.run_daemon import EXIT_NO_AUDIO_DEVICE, check_devices, load_run_config, run_daemon
    from assistant.sd_notify import under_systemd
    from audio_io.devices import NoAudioDeviceError

    try:
        config = load_run_config(args).config
    except ConfigError as err:
        print_problems(err)
        return EXIT_BAD_INPUT
    configure_logging(logging.DEBUG if args.debug else config.observability.log_level.upper(),
                      under_systemd())
    try:
        check_devices(config.daemon_settings())
    except NoAudioDeviceError as err:
        print(f"freeze-omni: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_NO_AUDIO_DEVICE

    return run_daemon(config, _load_from_config, reload_config=lambda: load_run_config(args).config,
                      debug_logging=args.debug)


def _load_from_config(config):
    """The dialogue models that `config.models` names, or the embedded ones (for `run` and `serve`)."""
    from quantized_models.embedded_model import resolve_model_paths

    models = config.models
    model_dir, llm_dir = resolve_model_paths(*(None if value is None else Path(value).expanduser()
                                               for value in (models.model_dir, models.llm_dir)))
    return _load_for_dialogue(argparse.Namespace(
        model_dir=model_dir, llm_dir=llm_dir,
        backend=models.backend, onnx_dir=models.onnx_dir and Path(models.onnx_dir).expanduser(),
        quantization=models.quantization, device=models.device, dtype=models.dtype))


def _run_benchmark(run, args: argparse.Namespace) -> int:
    """Run a benchmark writing a section of `args.out`; print its table."""
    args.device_obj, args.dtype_obj = _pick_device_and_dtype(args.device, args.dtype)
    text, key = run(args)
    print(text)
    print(f"wrote section {key!r} of {args.out}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from assistant.serve import run_serve_command

    return run_serve_command(args, _load_from_config)


def run_devices() -> int:
    from assistant.run_daemon import EXIT_NO_AUDIO_DEVICE
    from audio_io.devices import NoAudioDeviceError, list_devices

    try:
        devices = list_devices()
    except NoAudioDeviceError as err:
        print(f"freeze-omni: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_NO_AUDIO_DEVICE
    if not devices:
        print("freeze-omni: no audio devices found", file=sys.stderr)
        return EXIT_NO_AUDIO_DEVICE
    for device in devices:
        print(device.describe())
    return 0


def run_export(args: argparse.Namespace) -> int:
    from quantized_models.model_dir import load_models
    from quantized_models.onnx_export import export_onnx

    from assistant.progress import Progress

    device, dtype = _pick_device_and_dtype(args.device, args.dtype)
    with Progress(2, "export-onnx") as progress:
        progress.step("loading models")
        models = load_models(args.model_dir, args.llm_dir, device, dtype)
        progress.advance()
        progress.step("tracing and checking graphs")
        paths = export_onnx(models, args.out, model_dir=args.model_dir)
        progress.advance()
    for path in paths:
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # bitsandbytes logs a cast warning on every int8 matmul with float inputs.
    logging.getLogger("bitsandbytes").setLevel(logging.DEBUG if args.debug else logging.ERROR)
    from audio_io.wav_file import AudioFileError
    from quantized_models.errors import ModelLoadError

    try:
        if args.command == "respond":
            return run_respond(args)
        if args.command == "run":
            return run_run(args)
        if args.command == "serve":
            return run_serve(args)
        if args.command == "bench-sessions":
            from assistant.bench_sessions import run_from_args

            return _run_benchmark(run_from_args, args)
        if args.command == "client":
            from assistant.client import run_client_command

            return run_client_command(args)
        if args.command == "devices":
            return run_devices()
        if args.command == "config":
            return run_config(args)
        if args.command == "export-onnx":
            return run_export(args)
        if args.command == "train":
            return run_train(args)
        if args.command == "eval":
            return run_eval(args)
        if args.command == "transcribe":
            return run_transcribe(args)
        if args.command == "say":
            return run_say(args)
        if args.command == "bench":
            from assistant.bench import run_bench

            return _run_benchmark(run_bench, args)
    except (ModelLoadError, AudioFileError, ValueError, OSError) as err:
        if args.debug:
            logger.exception("failed")
        message = " ".join(str(err).split())  # always one line, whatever the library said
        print(f"freeze-omni: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
