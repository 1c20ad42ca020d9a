"""`freeze-omni bench`: per-step timings of the engine and its components, side by side.

Every configuration (torch / onnxruntime backends, LLM precision) is measured in the same
run on the same inputs, so the ratios between columns are meaningful; absolute times are
only as good as the machine named in the table.
"""
from __future__ import annotations

import dataclasses
import logging
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from assistant.engine import Engine, EngineOptions
from assistant.progress import track
from assistant.segmentation import Segment
from quantized_models.adapter import AdapterCache
from quantized_models.encoder import EncoderCache
from quantized_models.frontend import CHUNK_SAMPLES, FrontendCache, frontend_step
from quantized_models.model_dir import FreezeOmniModels
from quantized_models.sampling import TextSamplingConfig
from quantized_models.speech_decoder import DecoderCache

logger = logging.getLogger(__name__)

CHUNK_MS = 160.0
MARK_BEGIN = "<!-- bench:{key}:begin -->"
MARK_END = "<!-- bench:{key}:end -->"
GREEDY = TextSamplingConfig(temperature=1.0, top_k=1, top_p=0.0)


@dataclass(frozen=True)
class BenchSizes:
    chunks: int = 40
    text_tokens: int = 32
    speech_steps: int = 60
    codec_window_tokens: int = 60
    repeats: int = 5


@dataclass
class Row:
    step: str
    per: str
    values_ms: dict[str, float]
    """Configuration label → median milliseconds."""
    budget_ms: float | None = None
    """Real-time budget of one step, when it has one."""


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times are real."""
    if device.type != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of `fn` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def _noise_fbank(models: FreezeOmniModels, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    cache = FrontendCache.zeros(models.n_mels)
    chunks = []
    for _ in range(n):
        fbank, cache = frontend_step(0.05 * torch.randn(CHUNK_SAMPLES, generator=gen), cache)
        chunks.append(fbank.to(device=models.device, dtype=models.dtype))
    return chunks


def time_speech_input(models: FreezeOmniModels, sizes: BenchSizes) -> float:
    """Mean ms per chunk of encoder + adapter over a stream of `sizes.chunks` chunks."""
    chunks = _noise_fbank(models, sizes.chunks)

    def stream() -> None:
        enc, ada = EncoderCache(), AdapterCache()
        for fbank in chunks:
            _, enc, ada = models.backends.speech_input.step(fbank, enc, ada)

    return _median_ms(stream, models.device, max(1, sizes.repeats // 2)) / sizes.chunks


def time_decoder(models: FreezeOmniModels, sizes: BenchSizes) -> tuple[float, float]:
    """(prefill ms for a 12-token segment, mean ms per AR step)."""
    idim, dev = models.decoder.dims.idim, models.device
    rows = models.llm.hidden_size // idim
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(12 * rows, idim, generator=gen).to(dev, models.dtype)
    prefix = torch.randn(12 * rows, idim, generator=gen).to(dev, models.dtype)
    backend = models.backends.decoder
    prefill = _median_ms(lambda: backend.prefill(text, prefix,
                                                 DecoderCache(max_new_tokens=sizes.speech_steps)),
                         dev, sizes.repeats)

    def ar_steps() -> None:
        cache = backend.prefill(text, prefix, DecoderCache(max_new_tokens=sizes.speech_steps))
        token = backend.dims.sos_id
        for i in range(sizes.speech_steps):
            _, cache = backend.step(token, cache)
            token = i % backend.dims.odim

    total = _median_ms(ar_steps, dev, max(1, sizes.repeats // 2))
    return prefill, (total - prefill) / sizes.speech_steps


def time_codec(models: FreezeOmniModels, sizes: BenchSizes) -> float:
    """ms to decode one codec window (10 + 40 + 10 tokens by default)."""
    n_codes = models.codec.dims.n_codes
    tokens = (torch.arange(sizes.codec_window_tokens) * 7 % n_codes).to(models.device)
    return _median_ms(lambda: models.backends.codec.decode(tokens), models.device, sizes.repeats)


def time_llm(models: FreezeOmniModels, sizes: BenchSizes) -> tuple[float, float]:
    """(mean ms per LLM listen step, mean ms per greedy text token), the LLM alone."""
    from quantized_models.llm import LlmKvCache

    llm, dev, cache = models.llm, models.device, LlmKvCache()
    llm.prefill_system(None, models.tokenizer, cache)
    like = llm.heads.prompt_embeddings.weight
    vectors = torch.randn(sizes.chunks, 2, llm.hidden_size, generator=torch.Generator().manual_seed(2))
    vectors = vectors.to(device=dev, dtype=like.dtype)
    _sync(dev)
    start = time.perf_counter()
    for i, chunk_vectors in enumerate(vectors):
        llm.listen(chunk_vectors, first_of_turn=(i == 0), cache=cache)
    _sync(dev)
    listen_ms = 1000.0 * (time.perf_counter() - start) / sizes.chunks
    logits, _ = llm.start_answer(cache)
    _sync(dev)
    start = time.perf_counter()
    for _ in range(sizes.text_tokens):
        logits, _ = llm.feed_token(int(logits.argmax()), cache)
    _sync(dev)
    return listen_ms, 1000.0 * (time.perf_counter() - start) / sizes.text_tokens


def time_engine_turn(models: FreezeOmniModels, sizes: BenchSizes) -> dict[str, float]:
    """Whole-engine step costs: listen chunk (front end to state head), text token, speech token."""
    engine = Engine(models, EngineOptions(text_sampling=GREEDY, speech_top_k=1,
                                          max_new_tokens=sizes.text_tokens,
                                          max_speech_tokens=sizes.speech_steps))
    state = engine.prefill_system(engine.new_session(seed=0))
    gen = torch.Generator().manual_seed(3)
    noise = [0.05 * torch.randn(CHUNK_SAMPLES, generator=gen) for _ in range(sizes.chunks)]
    dev = models.device
    _sync(dev)
    start = time.perf_counter()
    for chunk in noise:
        engine.listen_chunk(state, chunk, follow_decision=False)
    _sync(dev)
    listen_ms = 1000.0 * (time.perf_counter() - start) / sizes.chunks
    hidden = torch.zeros(models.llm.hidden_size, device=dev, dtype=models.dtype)
    engine.start_segment(state, Segment(text="Hello there, how are you today?", hidden_states=[hidden] * 8))
    steps = 0
    _sync(dev)
    start = time.perf_counter()
    while not state.speech.done:
        engine.speech_step(state)
        steps += 1
    _sync(dev)
    speech_ms = 1000.0 * (time.perf_counter() - start) / max(1, steps)
    return {"listen": listen_ms, "speech": speech_ms}


def component_rows(configs: dict[str, FreezeOmniModels], sizes: BenchSizes) -> list[Row]:
    """One row per component, one column per configuration."""
    rows = [
        Row("speech input (encoder + adapter)", "160 ms chunk", {}, CHUNK_MS),
        Row("speech decoder prefill (12-token segment)", "segment", {}),
        Row("speech decoder AR step", "codec token (25 ms)", {}, 25.0),
        Row(f"codec window ({sizes.codec_window_tokens} tokens)", "window", {}),
        Row("whole listen step (fbank → state head)", "160 ms chunk", {}, CHUNK_MS),
        Row("whole speech step (AR + codec windows)", "codec token (25 ms)", {}, 25.0),
    ]
    for label, models in track(configs.items(), "benchmark: components", name=lambda item: item[0]):
        rows[0].values_ms[label] = time_speech_input(models, sizes)
        rows[1].values_ms[label], rows[2].values_ms[label] = time_decoder(models, sizes)
        rows[3].values_ms[label] = time_codec(models, sizes)
        engine_times = time_engine_turn(models, sizes)
        rows[4].values_ms[label] = engine_times["listen"]
        rows[5].values_ms[label] = engine_times["speech"]
    return rows


def llm_rows(configs: dict[str, FreezeOmniModels], sizes: BenchSizes) -> list[Row]:
    rows = [Row("LLM listen step (2 vectors + state head)", "160 ms chunk", {}, CHUNK_MS),
            Row("LLM text token", "token", {})]
    for label, models in track(configs.items(), "benchmark: LLM", name=lambda item: item[0]):
        rows[0].values_ms[label], rows[1].values_ms[label] = time_llm(models, sizes)
    return rows


def render_table(title: str, rows: list[Row], notes: list[str]) -> str:
    labels = list(rows[0].values_ms)
    lines = [f"### {title}", "", *notes, "",
             "| step | per | " + " | ".join(f"{label} ms" for label in labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for row in rows:
        cells = []
        for label in labels:
            value = row.values_ms.get(label)
            if value is None:
                cells.append("–")
                continue
            cell = f"{value:.2f}"
            if row.budget_ms:
                cell += f" ({row.budget_ms / value:.1f}× rt)"
            cells.append(cell)
        lines.append(f"| {row.step} | {row.per} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def device_description(device: torch.device) -> str:
    if device.type != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


def write_section(path: Path, key: str, text: str) -> None:
    """Insert or replace the section `key` of the benchmark document."""
    begin, end = MARK_BEGIN.format(key=key), MARK_END.format(key=key)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text}{end}\n"
    if begin in body and end in body:
        head, rest = body.split(begin, 1)
        body = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        body = body.rstrip("\n") + "\n\n" + block
    path.write_text(body, encoding="utf-8")


def with_backends(models: FreezeOmniModels, backends) -> FreezeOmniModels:
    return dataclasses.replace(models, backends=backends)


def host_rss_mib() -> float:
    """Resident memory of this process (Linux), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _resolve_model(args) -> tuple[Path, Path, str]:
    if args.random_model:
        from quantized_models.random_model import PRESETS, build_random_model_dir

        spec = PRESETS[args.random_model]
        tokenizer_dir = args.tokenizer_dir or args.llm_dir
        if tokenizer_dir is None:
            raise ValueError("--random-model needs --tokenizer-dir (a folder with the Qwen2 tokenizer files)")
        root = args.cache_dir / f"random-{spec.name}"
        model_dir, llm_dir = build_random_model_dir(root, spec, tokenizer_dir)
        return model_dir, llm_dir, f"random {spec.name}-size model"
    if args.model_dir is None or args.llm_dir is None:
        raise ValueError("give --model-dir and --llm-dir, or --random-model")
    return args.model_dir, args.llm_dir, str(args.model_dir)


def _onnx_config(base: FreezeOmniModels, model_dir: Path, args) -> FreezeOmniModels:
    from quantized_models.onnx_export import export_onnx
    from quantized_models.onnx_runtime import load_onnx_backends

    onnx_dir = args.cache_dir / ("onnx-" + "-".join(model_dir.resolve().parts[-3:]))
    if not (onnx_dir / "speech_input.onnx").is_file():
        logger.info("exporting ONNX graphs to %s", onnx_dir)
        export_onnx(base, onnx_dir, model_dir=model_dir)
    return with_backends(base, load_onnx_backends(base, onnx_dir, threads=args.threads))


def run_bench(args) -> tuple[str, str]:
    """Entry point of `freeze-omni bench` (arguments from assistant.cli).

    Returns the rendered tables and the key of the section written to `args.out`.
    """
    from quantized_models.model_dir import load_models

    torch.set_num_threads(args.threads)
    model_dir, llm_dir, model_label = _resolve_model(args)
    device, dtype = args.device_obj, args.dtype_obj
    sizes = BenchSizes(chunks=args.chunks, repeats=args.repeats)
    rss_before = host_rss_mib()
    base = load_models(model_dir, llm_dir, device, dtype)
    memory = {str(dtype).replace("torch.", ""): host_rss_mib() - rss_before}
    configs = {"torch": base}
    if "onnx" in args.backends:
        configs["onnxruntime"] = _onnx_config(base, model_dir, args)
    llm_configs = {str(dtype).replace("torch.", ""): base}
    for mode in (q for q in args.quantization if q != "none"):
        before = host_rss_mib()
        try:
            llm_configs[mode] = load_models(model_dir, llm_dir, device, dtype, quantization=mode)
            memory[mode] = host_rss_mib() - before
        except (RuntimeError, ValueError) as err:
            logger.warning("%s LLM not measured: %s", mode, err)
    notes = [f"Model: {model_label}. Device: {device_description(device)}; torch {torch.__version__}; "
             f"dtype {dtype}. Medians; '× rt' = real-time budget / time (above 1 keeps up)."]
    text = render_table("Components: torch vs onnxruntime", component_rows(configs, sizes), notes)
    llm_notes = ["Host memory added by loading each configuration (MiB): "
                 + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()) + "."]
    text += "\n" + render_table("Frozen LLM: precision", llm_rows(llm_configs, sizes), llm_notes)
    key = f"{args.random_model or model_dir.resolve().parent.name}-{device.type}"
    write_section(args.out, key, text)
    return text, key
