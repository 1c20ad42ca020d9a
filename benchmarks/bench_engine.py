"""Engine speed: per-chunk listen time, per-token text time, per-token speech time.

Prints a table and writes it to docs/BENCHMARKS.md (section replaced in place).

    python3 benchmarks/bench_engine.py                       # shared tiny fixture, CPU
    python3 benchmarks/bench_engine.py --model-dir D --llm-dir L --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from assistant.engine import Engine, EngineOptions
from quantized_models.frontend import CHUNK_SAMPLES
from quantized_models.model_dir import load_models
from quantized_models.sampling import TextSamplingConfig

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "freeze-omni-tiny"
CHUNK_MS = 160.0
MARK_BEGIN = "<!-- bench_engine:begin -->"
MARK_END = "<!-- bench_engine:end -->"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    """Run `fn()`; returns (its result, elapsed milliseconds)."""
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, 1000.0 * (time.perf_counter() - start)


def measure(engine: Engine, n_chunks: int, n_tokens: int, n_speech: int) -> dict[str, list[float]]:
    device = engine.models.device
    state = engine.prefill_system(engine.new_session(seed=0))
    noise = torch.randn(n_chunks, CHUNK_SAMPLES, generator=torch.Generator().manual_seed(0)) * 0.05
    listen = [_timed(lambda c=c: engine.listen_chunk(state, c, follow_decision=False), device)[1]
              for c in noise]
    (token_result, state), _ = _timed(lambda: engine.start_speaking(state), device)
    text = []
    while not token_result.finished and len(text) < n_tokens - 1:
        (token_result, state), elapsed = _timed(lambda: engine.next_token(state), device)
        text.append(elapsed)
    engine.start_segment(state, _any_segment(engine))
    speech = []
    while not state.speech.done and len(speech) < n_speech:
        speech.append(_timed(lambda: engine.speech_step(state), device)[1])
    # The first chunk pays one-off costs (allocations); it is reported by the CLI instead.
    return {"listen": listen[1:], "text": text, "speech": speech}


def _any_segment(engine: Engine):
    from assistant.segmentation import Segment

    hidden = torch.zeros(engine.models.llm.hidden_size, device=engine.models.device, dtype=engine.models.dtype)
    return Segment(text="Hello there, how are you today?", hidden_states=[hidden] * 8)


def table(results: dict[str, list[float]], device_name: str, label: str) -> str:
    def row(name: str, unit: str, values: list[float], budget_ms: float | None) -> str:
        med = statistics.median(values)
        # Throughput uses the mean: codec windows make a few steps slow and most fast.
        rt = f"{budget_ms / statistics.mean(values):.1f}× real time" if budget_ms else ""
        return f"| {name} | {unit} | {len(values)} | {med:.2f} | {statistics.mean(values):.2f} | {max(values):.2f} | {rt} |"

    lines = [
        f"### {label}",
        "",
        f"Device: {device_name}; torch {torch.__version__}; threads {torch.get_num_threads()}.",
        "",
        "| step | per | n | median ms | mean ms | max ms | note |",
        "|---|---|---|---|---|---|---|",
        row("listen (fbank → encoder → adapter → LLM → state head)", "160 ms chunk", results["listen"], CHUNK_MS),
        row("text token (LLM decode + sampling)", "token", results["text"], None),
        row("speech token (decoder AR step + codec windows)", "codec token (25 ms)", results["speech"], 25.0),
    ]
    return "\n".join(lines) + "\n"


def write_doc(section: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    block = f"{MARK_BEGIN}\n{section}{MARK_END}\n"
    if MARK_BEGIN in body and MARK_END in body:
        head, rest = body.split(MARK_BEGIN, 1)
        body = head + block + rest.split(MARK_END, 1)[1].lstrip("\n")
    else:
        body += "\n" + block
    path.write_text(body, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=FIXTURE / "checkpoints")
    parser.add_argument("--llm-dir", type=Path, default=FIXTURE / "llm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chunks", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--speech-tokens", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default="Shared tiny fixture (official layout, random weights)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = load_models(args.model_dir, args.llm_dir, device, getattr(torch, args.dtype))
    options = EngineOptions(text_sampling=TextSamplingConfig(temperature=1.0, top_k=1, top_p=0.0),
                            speech_top_k=1, max_new_tokens=args.tokens, max_speech_tokens=args.speech_tokens)
    results = measure(Engine(models, options), args.chunks, args.tokens, args.speech_tokens)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    section = table(results, name, f"{args.label} — {args.dtype}")
    print(section)
    write_doc(section, args.out)


if __name__ == "__main__":
    main()
