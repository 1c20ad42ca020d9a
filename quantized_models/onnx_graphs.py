"""The ONNX graph contract: file names, tensor names, and the export wrapper modules.

Each wrapper takes and returns plain tensors (ONNX has no dataclasses) and runs the library
modules' own code, so an exported graph cannot drift from the torch step it replaces:
- `SpeechInputGraph`: one 160 ms chunk through `_Block.step` of every encoder block and
  `Adapter.step`, with every cache a named input and output;
- `DecoderPrefillGraph`: `SpeechDecoder.prefill` itself, on a cache without spare rows;
- `DecoderStepGraph`: one AR step through the same `DecoderLayer`s and `KvSlot` writes;
- `CodecWindowGraph`: codebook lookup + `CodecGenerator` for one window of ids.
The runtime (`onnx_runtime.py`) builds its feeds from the names defined here.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from quantized_models.adapter import Adapter, AdapterCache, AdapterDims
from quantized_models.codec import CodecDecoder
from quantized_models.encoder import SpeechEncoder, sinusoid_table
from quantized_models.frontend import CHUNK_FEATURE_ROWS
from quantized_models.speech_decoder import DecoderCache, KvSlot, SpeechDecoder

if TYPE_CHECKING:
    from quantized_models.model_dir import FreezeOmniModels

GRAPH_FORMAT_VERSION = "1"
"""Bumped whenever a graph's inputs or outputs change; older exports are then refused."""
METADATA_PREFIX = "freeze_omni."
"""Prefix of our keys in each file's `metadata_props`."""

SPEECH_INPUT_FILE = "speech_input.onnx"
DECODER_PREFILL_FILE = "decoder_prefill.onnx"
DECODER_PREFILL_NO_PREFIX_FILE = "decoder_prefill_no_prefix.onnx"
"""Only for decoders with a hidden-state prefix: prefill when no prefix rows are given."""
DECODER_STEP_FILE = "decoder_step.onnx"
CODEC_WINDOW_FILE = "codec_window.onnx"

COMPONENTS = ("speech_input", "decoder", "codec")
PROBE_RTOL = 1e-2
"""Weight probes match within this: bfloat16 rounding (2^-9) passes, other weights do not."""
PROBE_ATOL = 1e-6


def component_modules(models: Any, component: str) -> list[nn.Module]:
    """The torch modules whose weights a component's graphs carry.

    Args:
        models: `FreezeOmniModels` or anything with `encoder`, `adapter`, `decoder`, `codec`.
    """
    if component == "speech_input":
        return [models.encoder, models.adapter]
    return [models.decoder] if component == "decoder" else [models.codec]


def component_dims(models: FreezeOmniModels, component: str) -> dict[str, Any]:
    """The geometry a component's graphs are exported for, as plain JSON data."""
    dims = {type(m).__name__: asdict(m.dims) for m in component_modules(models, component)}
    return json.loads(json.dumps(dims))  # tuples -> lists, as read back from a file


def weights_probe(module_list: list[nn.Module]) -> list[float]:
    """First element of every floating tensor of the state dicts: a cheap fingerprint.

    Unlike a file checksum it survives a dtype change (bfloat16 on the GPU), yet tells two
    checkpoints of equal shapes apart, so stale exports are refused.
    """
    firsts = [
        t.reshape(-1)[0].float() for module in module_list for t in module.state_dict().values()
        if t.is_floating_point() and t.numel()
    ]
    return torch.stack(firsts).cpu().tolist()  # one device sync, not one per tensor


def probe_mismatch(exported: list[float], current: list[float]) -> str | None:
    """None when the probes agree, else a short description of the first difference."""
    if len(exported) != len(current):
        return f"{len(exported)} probed tensors in the export, {len(current)} in the loaded model"
    for i, (a, b) in enumerate(zip(exported, current)):
        if abs(a - b) > PROBE_RTOL * max(abs(a), abs(b)) + PROBE_ATOL:
            return f"tensor {i} starts with {a:.6g} in the export but {b:.6g} in the loaded model"
    return None


def encoder_cache_names(num_blocks: int, prefix: str = "") -> list[str]:
    """`{prefix}encoder_key_0, {prefix}encoder_value_0, ...`, block-major."""
    return [f"{prefix}encoder_{kind}_{i}" for i in range(num_blocks) for kind in ("key", "value")]


def decoder_cache_names(num_layers: int, prefix: str = "") -> list[str]:
    """`{prefix}key_0, {prefix}value_0, ...`, layer-major."""
    return [f"{prefix}{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def adapter_cache_names(two_convs: bool, prefix: str = "") -> list[str]:
    """Adapter convolution caches: `adapter_conv1` (two-conv branch only), `adapter_conv2`."""
    return [f"{prefix}adapter_conv{j}" for j in ((1, 2) if two_convs else (2,))]


def adapter_cache_widths(dims: AdapterDims) -> list[int]:
    """Channels of the caches named by `adapter_cache_names` (each holds kernel_size - 1 frames)."""
    return [dims.enc_out_dim, 2 * dims.enc_out_dim] if dims.two_convs else [dims.enc_out_dim]


@dataclass
class GraphSpec:
    """Everything `torch.onnx.export` needs for one graph."""

    file_name: str
    component: str
    module: nn.Module
    example: tuple[Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


class SpeechInputGraph(nn.Module):
    """Encoder + adapter for one chunk: `SpeechEncoder.step` then `Adapter.step`, tensors only.

    Inputs: fbank [1, 19, n_mels]; pe_index [] int64; adapter caches [1, C, k - 1] (zeros
    stand for a first chunk, as the official left padding); per block key and value
    [1, heads, L, d_k], L in 0..cache_frames (0 on the first chunk).
    Outputs: vectors [1, 2, llm_dim]; pe_index + chunk_frames; the adapter caches; per block
    key and value [1, heads, min(L + chunk_frames, cache_frames), d_k].
    """

    def __init__(self, encoder: SpeechEncoder, adapter: Adapter) -> None:
        super().__init__()
        self.encoder, self.adapter = encoder, adapter

    def positions(self, pe_index: Tensor, cached_frames: int) -> Tensor:
        """Tensor form of `encoder.step_positions` (spec §2.3 lag and wrap): [L + chunk] rows."""
        dims = self.encoder.dims
        start = torch.clamp(pe_index % dims.pe_wrap - dims.full_window_frames, min=0)
        return start + torch.arange(cached_frames + dims.chunk_frames)  # traced: L stays dynamic

    def forward(self, fbank: Tensor, pe_index: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        encoder, dims = self.encoder, self.encoder.dims
        n_adapter = len(adapter_cache_names(self.adapter.dims.two_convs))
        adapter_in, kv = caches[:n_adapter], caches[n_adapter:]
        transformer = encoder.enc[1]
        x = encoder._embed(encoder.subsample(fbank))  # [1, chunk_frames, D]
        pos_emb = sinusoid_table(self.positions(pe_index, kv[0].shape[2]), dims.model_dim)
        kept: list[Tensor] = []
        for i, block in enumerate(transformer.encoders):
            x, keys, values = block.step(x, pos_emb, kv[2 * i], kv[2 * i + 1])
            kept += [keys[:, :, -dims.cache_frames:], values[:, :, -dims.cache_frames:]]
        adapter_cache = AdapterCache(*adapter_in) if n_adapter == 2 else AdapterCache(None, adapter_in[0])
        vectors, adapter_cache = self.adapter.step(transformer.after_norm(x), adapter_cache)
        adapter_out = [adapter_cache.before_conv2]
        if n_adapter == 2:
            adapter_out.insert(0, adapter_cache.before_conv1)
        return (vectors, pe_index + dims.chunk_frames, *adapter_out, *kept)


class DecoderPrefillGraph(nn.Module):
    """`SpeechDecoder.prefill` → per-layer key and value [heads, rows, head_dim].

    Inputs: hidden_rows [4n, idim] and, when `with_prefix`, prefix_rows [4k, idim] (k >= 1).
    rows = 4k + 4n + 1 (prefix, BOS, text); the runtime copies them into a `DecoderCache`
    with room for the AR steps.
    """

    def __init__(self, decoder: SpeechDecoder, with_prefix: bool) -> None:
        super().__init__()
        self.decoder, self.with_prefix = decoder, with_prefix

    def forward(self, hidden_rows: Tensor, prefix_rows: Tensor | None = None) -> tuple[Tensor, ...]:
        prefix = prefix_rows if self.with_prefix else None
        cache = self.decoder.prefill(hidden_rows, prefix, DecoderCache(max_new_tokens=0))
        return tuple(t for pair in zip(cache.keys, cache.values) for t in pair)


class DecoderStepGraph(nn.Module):
    """One AR step, as `SpeechDecoder.step`, with the cache as plain tensors.

    Inputs: token [1] int64; position [] int64 (cache length minus prefix rows); per layer
    past key and value [heads, S, head_dim]. Outputs: logits [vocab]; per layer the new
    key and value row [heads, 1, head_dim] (the runtime appends them to its cache).
    """

    def __init__(self, decoder: SpeechDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, token: Tensor, position: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        decoder = self.decoder
        x = decoder.embedding(token)  # [1, D]
        cos, sin = decoder.rotary(position, 1, x)
        new_rows: list[Tensor] = []
        for i, layer in enumerate(decoder.layers):
            keys, values = past[2 * i], past[2 * i + 1]  # [H, S, hd]
            start = keys.shape[1]
            spare = keys.new_zeros(keys.shape[0], 1, keys.shape[2])  # [H, 1, hd], row S
            slot = KvSlot(torch.cat([keys, spare], 1), torch.cat([values, spare], 1), start)
            x = layer(x, cos, sin, slot)
            new_rows += [slot.keys[:, start:], slot.values[:, start:]]
        return (decoder.out_fnn(decoder.norm(x))[0], *new_rows)


class CodecWindowGraph(nn.Module):
    """`CodecDecoder.decode` without its id check: tokens [T] int64 → pcm [T * samples_per_token]."""

    def __init__(self, codec: CodecDecoder) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, tokens: Tensor) -> Tensor:
        codec = self.codec
        emb = codec.quantizer.quantizer_modules[0].embedding(tokens)  # [T, 512]
        x = emb.transpose(0, 1).unsqueeze(0)  # [T, 512] -> [1, 512, T]
        return codec.generator(x, codec.global_vector()).reshape(-1)  # [1, 1, S] -> [S]


def speech_input_spec(encoder: SpeechEncoder, adapter: Adapter) -> GraphSpec:
    dims, adims = encoder.dims, adapter.dims
    cached = 2 * dims.chunk_frames  # any length traces the same graph; avoid 0, 1 and the cap
    kv = [torch.zeros(1, dims.attention_heads, cached, dims.head_dim) for _ in range(2 * dims.num_blocks)]
    adapter_in = [torch.zeros(1, width, adims.cache_frames) for width in adapter_cache_widths(adims)]
    kv_in, kv_out = encoder_cache_names(dims.num_blocks), encoder_cache_names(dims.num_blocks, "next_")
    fbank = torch.zeros(1, CHUNK_FEATURE_ROWS, dims.n_mels)
    return GraphSpec(
        file_name=SPEECH_INPUT_FILE, component="speech_input",
        module=SpeechInputGraph(encoder, adapter),
        example=(fbank, torch.tensor(cached, dtype=torch.int64), *adapter_in, *kv),
        input_names=["fbank", "pe_index", *adapter_cache_names(adims.two_convs), *kv_in],
        output_names=["vectors", "next_pe_index", *adapter_cache_names(adims.two_convs, "next_"), *kv_out],
        dynamic_axes={**{n: {2: "cached_frames"} for n in kv_in}, **{n: {2: "kept_frames"} for n in kv_out}},
    )


def decoder_specs(decoder: SpeechDecoder) -> list[GraphSpec]:
    """Prefill (with prefix when the model uses one), prefill without prefix, and AR step."""
    dims = decoder.dims
    out_names = decoder_cache_names(dims.num_blocks)
    rows_axes = {n: {1: "rows"} for n in out_names}
    hidden, prefix = torch.zeros(12, dims.idim), torch.zeros(8, dims.idim)
    variants = [(DECODER_PREFILL_FILE, dims.kv_cache_prefix_finetune)]
    if dims.kv_cache_prefix_finetune:
        variants.append((DECODER_PREFILL_NO_PREFIX_FILE, False))
    specs = []
    for file_name, with_prefix in variants:
        inputs = ["hidden_rows", "prefix_rows"] if with_prefix else ["hidden_rows"]
        specs.append(GraphSpec(
            file_name=file_name, component="decoder", module=DecoderPrefillGraph(decoder, with_prefix),
            example=(hidden, prefix) if with_prefix else (hidden,),
            input_names=inputs, output_names=out_names,
            dynamic_axes={"hidden_rows": {0: "text_rows"}, "prefix_rows": {0: "prefix_rows"}, **rows_axes},
        ))
    past = [torch.zeros(dims.num_heads, 9, dims.head_dim) for _ in range(2 * dims.num_blocks)]
    past_names = decoder_cache_names(dims.num_blocks, "past_")
    specs.append(GraphSpec(
        file_name=DECODER_STEP_FILE, component="decoder", module=DecoderStepGraph(decoder),
        example=(torch.tensor([dims.sos_id]), torch.tensor(5, dtype=torch.int64), *past),
        input_names=["token", "position", *past_names],
        output_names=["logits", *decoder_cache_names(dims.num_blocks, "new_")],
        dynamic_axes={n: {1: "past_rows"} for n in past_names},
    ))
    return specs


def codec_spec(codec: CodecDecoder) -> GraphSpec:
    if not isinstance(codec, CodecDecoder):  # the WORLD VQ codec synthesises with pyworld, not torch
        raise ValueError(f"the {type(codec).__name__} codec has no ONNX graph; only the released TiCodec "
                         "generator can be exported")
    return GraphSpec(
        file_name=CODEC_WINDOW_FILE, component="codec", module=CodecWindowGraph(codec),
        example=(torch.arange(7, dtype=torch.int64) % codec.dims.n_codes,),
        input_names=["tokens"], output_names=["pcm"],
        dynamic_axes={"tokens": {0: "tokens"}, "pcm": {0: "samples"}},
    )
