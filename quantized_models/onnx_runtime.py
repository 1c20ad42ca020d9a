"""Step backends on onnxruntime: the torch step contract served by the exported graphs.

`OnnxSpeechInput`, `OnnxSpeechDecoder` and `OnnxCodec` implement the protocols of
`backends.py`. They take and return the same cache dataclasses as the torch modules
(`EncoderCache`, `AdapterCache`, `DecoderCache`) and keep no per-stream state: every cache
is converted to graph inputs on the way in and written back from the graph outputs. Caches
filled by these backends hold float32 tensors (the graphs' dtype) on the models' device.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from quantized_models.adapter import DOWNSAMPLE_STRIDE, AdapterCache, AdapterDims
from quantized_models.backends import Backends
from quantized_models.codec import CodecDims
from quantized_models.encoder import EncoderCache, EncoderDims
from quantized_models.errors import ModelLoadError
from quantized_models.onnx_graphs import (
    CODEC_WINDOW_FILE,
    COMPONENTS,
    DECODER_PREFILL_FILE,
    DECODER_PREFILL_NO_PREFIX_FILE,
    DECODER_STEP_FILE,
    SPEECH_INPUT_FILE,
    adapter_cache_names,
    adapter_cache_widths,
    decoder_cache_names,
    encoder_cache_names,
)
from quantized_models.onnx_session import GraphOpener, OrtGraph, export_hint
from quantized_models.speech_decoder import DecoderCache, DecoderDims

if TYPE_CHECKING:
    from quantized_models.model_dir import FreezeOmniModels

logger = logging.getLogger(__name__)

GRAPH_DTYPE = torch.float32


def required_files(component: str, decoder_dims: DecoderDims) -> tuple[str, ...]:
    """Graph files a component needs in the export directory."""
    if component == "speech_input":
        return (SPEECH_INPUT_FILE,)
    if component == "codec":
        return (CODEC_WINDOW_FILE,)
    extra = (DECODER_PREFILL_NO_PREFIX_FILE,) if decoder_dims.kv_cache_prefix_finetune else ()
    return (DECODER_PREFILL_FILE, DECODER_STEP_FILE, *extra)


class OnnxSpeechInput:
    """Encoder + adapter for one 160 ms chunk on `speech_input.onnx`."""

    def __init__(self, graph: OrtGraph, encoder: EncoderDims, adapter: AdapterDims, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.graph, self.encoder_dims, self.adapter_dims = graph, encoder, adapter
        self.device, self.dtype = device, dtype

    def _adapter_inputs(self, cache: AdapterCache) -> list[torch.Tensor]:
        """Cached conv inputs, or zeros on a first chunk (the official left padding)."""
        dims = self.adapter_dims
        cached = [cache.before_conv1, cache.before_conv2] if dims.two_convs else [cache.before_conv2]
        return [
            c.to(GRAPH_DTYPE) if c is not None else torch.zeros(1, w, dims.cache_frames, device=self.device)
            for c, w in zip(cached, adapter_cache_widths(dims))
        ]

    def _encoder_inputs(self, cache: EncoderCache) -> list[torch.Tensor]:
        dims = self.encoder_dims
        if not cache.keys:  # first chunk: zero cached frames
            empty = torch.zeros(1, dims.attention_heads, 0, dims.head_dim, device=self.device)
            return [empty] * (2 * dims.num_blocks)
        return [t.to(GRAPH_DTYPE) for pair in zip(cache.keys, cache.values) for t in pair]

    def _outputs(self, cached_frames: int, adapter_in: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        dims, g = self.encoder_dims, self.graph
        kept = min(cached_frames + dims.chunk_frames, dims.cache_frames)
        out = {
            "vectors": g.empty(1, dims.chunk_frames // DOWNSAMPLE_STRIDE, self.adapter_dims.llm_embed_dim),
            "next_pe_index": g.empty(dtype=torch.int64),
        }
        for name, tensor in zip(adapter_cache_names(self.adapter_dims.two_convs, "next_"), adapter_in):
            out[name] = g.empty(*tensor.shape)
        for name in encoder_cache_names(dims.num_blocks, "next_"):
            out[name] = g.empty(1, dims.attention_heads, kept, dims.head_dim)
        return out

    @torch.inference_mode()
    def step(
        self, fbank: torch.Tensor, encoder: EncoderCache, adapter: AdapterCache
    ) -> tuple[torch.Tensor, EncoderCache, AdapterCache]:
        """fbank [1, 19, n_mels] → LLM input vectors [1, 2, llm_dim]; caches updated in place."""
        dims, two = self.encoder_dims, self.adapter_dims.two_convs
        adapter_in = self._adapter_inputs(adapter)
        pe_index = torch.tensor(encoder.pe_index, dtype=torch.int64)
        feeds = {"fbank": fbank.to(GRAPH_DTYPE), "pe_index": pe_index}
        feeds.update(zip(adapter_cache_names(two), adapter_in))
        feeds.update(zip(encoder_cache_names(dims.num_blocks), self._encoder_inputs(encoder)))
        out = {k: v.to(self.device) for k, v in
               self.graph.run(feeds, self._outputs(encoder.cached_frames, adapter_in)).items()}
        encoder.keys = [out[f"next_encoder_key_{i}"] for i in range(dims.num_blocks)]
        encoder.values = [out[f"next_encoder_value_{i}"] for i in range(dims.num_blocks)]
        encoder.pe_index = int(out["next_pe_index"])
        adapter.before_conv2 = out["next_adapter_conv2"]
        if two:
            adapter.before_conv1 = out["next_adapter_conv1"]
        return out["vectors"].to(self.dtype), encoder, adapter


class OnnxSpeechDecoder:
    """Speech decoder on `decoder_prefill*.onnx` (NAR pass) and `decoder_step.onnx` (AR steps)."""

    def __init__(self, prefill: OrtGraph, step: OrtGraph, open_no_prefix: Callable[[], OrtGraph] | None,
                 dims: DecoderDims, device: torch.device) -> None:
        self.prefill_graph, self.step_graph, self.dims, self.device = prefill, step, dims, device
        self._open_no_prefix = open_no_prefix
        self._no_prefix: OrtGraph | None = None
        """Opened on first use: the engine always passes a prefix, so it usually never is."""

    def _prefill_graph(self, use_prefix: bool) -> OrtGraph:
        if use_prefix or not self.dims.kv_cache_prefix_finetune:
            return self.prefill_graph
        if self._no_prefix is None:
            assert self._open_no_prefix is not None, "prefix decoders are built with a no-prefix opener"
            self._no_prefix = self._open_no_prefix()
        return self._no_prefix

    @torch.inference_mode()
    def prefill(
        self, hidden_rows: torch.Tensor, prefix_rows: torch.Tensor | None, cache: DecoderCache
    ) -> DecoderCache:
        """Pre-network, prefix layers and NAR pass over [4n, idim] / [4k, idim] rows; fills `cache`."""
        cache.reset()
        dims = self.dims
        # Zero prefix rows mean no prefix (the graph cannot take an empty prefix).
        used = prefix_rows is not None and prefix_rows.shape[0] > 0 and dims.kv_cache_prefix_finetune
        prefix = prefix_rows if used else None
        feeds = {"hidden_rows": hidden_rows.to(GRAPH_DTYPE)}
        if prefix is not None:
            feeds["prefix_rows"] = prefix.to(GRAPH_DTYPE)
        prefix_len = 0 if prefix is None else prefix.shape[0]
        rows = prefix_len + hidden_rows.shape[0] + 1  # prefix, BOS, text rows
        graph = self._prefill_graph(prefix is not None)
        names = decoder_cache_names(dims.num_blocks)
        out = graph.run(feeds, {n: graph.empty(dims.num_heads, rows, dims.head_dim) for n in names})
        shape = (dims.num_heads, rows + cache.max_new_tokens, dims.head_dim)
        for i in range(dims.num_blocks):
            for store, name in ((cache.keys, f"key_{i}"), (cache.values, f"value_{i}")):
                full = torch.zeros(shape, dtype=GRAPH_DTYPE, device=self.device)
                full[:, :rows] = out[name]
                store.append(full)
        cache.length, cache.prefix_len = rows, prefix_len
        return cache

    @torch.inference_mode()
    def step(self, token_id: int, cache: DecoderCache) -> tuple[torch.Tensor, DecoderCache]:
        """One AR step: feed `token_id`, return logits [vocab] (float32) for the next id."""
        cache.check_room()
        dims, g, length = self.dims, self.step_graph, cache.length
        feeds = {"token": torch.tensor([token_id], dtype=torch.int64),
                 "position": torch.tensor(length - cache.prefix_len, dtype=torch.int64)}
        for i in range(dims.num_blocks):
            feeds[f"past_key_{i}"] = cache.keys[i][:, :length]
            feeds[f"past_value_{i}"] = cache.values[i][:, :length]
        outputs = {"logits": g.empty(dims.vocab_size)}
        outputs.update({n: g.empty(dims.num_heads, 1, dims.head_dim)
                        for n in decoder_cache_names(dims.num_blocks, "new_")})
        out = g.run(feeds, outputs)
        for i in range(dims.num_blocks):
            cache.keys[i][:, length] = out[f"new_key_{i}"][:, 0]
            cache.values[i][:, length] = out[f"new_value_{i}"][:, 0]
        cache.length += 1
        cache.generated += 1
        return out["logits"].to(self.device), cache


class OnnxCodec:
    """Codec window decoder on `codec_window.onnx`."""

    def __init__(self, graph: OrtGraph, dims: CodecDims, device: torch.device) -> None:
        self.graph, self.dims, self.device = graph, dims, device

    @property
    def samples_per_token(self) -> int:
        return self.dims.samples_per_token

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codec ids [T] → PCM [T * samples_per_token] (float32) in (-1, 1)."""
        if tokens.numel() == 0:
            return torch.zeros(0, device=self.device)
        if not 0 <= int(tokens.min()) <= int(tokens.max()) < self.dims.n_codes:
            raise ValueError(f"codec ids must lie in [0, {self.dims.n_codes}), got {tokens.tolist()}.")
        pcm = self.graph.empty(tokens.numel() * self.samples_per_token)
        out = self.graph.run({"tokens": tokens.to(torch.int64).reshape(-1)}, {"pcm": pcm})
        return out["pcm"].to(self.device)


def _check_files(onnx_dir: Path, components: set[str], decoder_dims: DecoderDims) -> None:
    if not onnx_dir.is_dir():
        raise ModelLoadError(f"ONNX directory {onnx_dir} does not exist; {export_hint(onnx_dir)}")
    missing = [name for c in sorted(components) for name in required_files(c, decoder_dims)
               if not (onnx_dir / name).is_file()]
    if missing:
        raise ModelLoadError(f"{onnx_dir} lacks {', '.join(missing)}; {export_hint(onnx_dir)}")


def _speech_input(opener: GraphOpener, models: FreezeOmniModels) -> OnnxSpeechInput:
    graph = opener.open(SPEECH_INPUT_FILE, "speech_input")
    return OnnxSpeechInput(graph, models.encoder.dims, models.adapter.dims, models.device, models.dtype)


def _decoder(opener: GraphOpener, models: FreezeOmniModels) -> OnnxSpeechDecoder:
    dims = models.decoder.dims
    no_prefix = None
    if dims.kv_cache_prefix_finetune:
        no_prefix = opener.opener(DECODER_PREFILL_NO_PREFIX_FILE, "decoder")
    prefill, step = opener.open(DECODER_PREFILL_FILE, "decoder"), opener.open(DECODER_STEP_FILE, "decoder")
    return OnnxSpeechDecoder(prefill, step, no_prefix, dims, models.device)


def _codec(opener: GraphOpener, models: FreezeOmniModels) -> OnnxCodec:
    return OnnxCodec(opener.open(CODEC_WINDOW_FILE, "codec"), models.codec.dims, models.device)


def load_onnx_backends(
    models: FreezeOmniModels, onnx_dir: Path, components: set[str] | None = None, threads: int | None = None
) -> Backends:
    """Backends with the chosen components on onnxruntime and the others as in `models.backends`.

    Args:
        models: the loaded stack; the graphs' metadata must match its dims and weights.
        onnx_dir: the `export-onnx` output directory.
        components: among "speech_input", "decoder", "codec"; all three when None.
        threads: intra-op threads per session (onnxruntime's default when None).

    Returns:
        A new `Backends`; assign it to `models.backends` to use it.

    Raises:
        ValueError: an unknown component name.
        ModelLoadError: onnxruntime missing, files missing, or files exported for other
            dimensions or weights (the message says which `export-onnx` command to run).
    """
    chosen = set(COMPONENTS) if components is None else set(components)
    unknown = sorted(chosen - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown ONNX components {unknown}; choose from {', '.join(COMPONENTS)}")
    onnx_dir = Path(onnx_dir)
    _check_files(onnx_dir, chosen, models.decoder.dims)
    opener = GraphOpener(models, onnx_dir, threads)
    base = models.backends
    backends = Backends(
        speech_input=_speech_input(opener, models) if "speech_input" in chosen else base.speech_input,
        decoder=_decoder(opener, models) if "decoder" in chosen else base.decoder,
        codec=_codec(opener, models) if "codec" in chosen else base.codec,
        names={**base.names, **{c: "onnx" for c in chosen}},
    )
    logger.info("ONNX backends from %s: %s", onnx_dir, ", ".join(sorted(chosen)))
    return backends
