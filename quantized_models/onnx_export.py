"""Export the streaming components of a loaded stack to ONNX (`freeze-omni export-onnx`).

Writes, into one directory: `speech_input.onnx` (encoder + adapter for one chunk, every cache
a named input and output), `decoder_prefill.onnx` (+ `decoder_prefill_no_prefix.onnx` for
decoders with a hidden-state prefix), `decoder_step.onnx` and `codec_window.onnx`. The graph
contract is in `onnx_graphs.py`; `onnx_runtime.load_onnx_backends` loads the files back.

Exporter choice: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. It traces the
library's own Python step code unchanged, honours `dynamic_axes` (including an encoder cache
of length 0 on the first chunk) and exports the tiny fixture in about a second. The dynamo
exporter (torch 2.13's default) also produced correct graphs here, but needs `onnxscript`,
took about 25x longer, and its prefill graph crashed onnxruntime with SIGFPE when fed an
empty prefix, where the TorchScript graph fails with a clean error; we never feed one.
Each file carries `freeze_omni.*` metadata (dims, opset, checksums, exporter, a weights
probe) and passes `onnx.checker.check_model(full_check=True)`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quantized_models.onnx_graphs import (
    GRAPH_FORMAT_VERSION,
    METADATA_PREFIX,
    GraphSpec,
    codec_spec,
    component_dims,
    component_modules,
    decoder_specs,
    speech_input_spec,
    weights_probe,
)

if TYPE_CHECKING:
    from quantized_models.model_dir import FreezeOmniModels

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17  # first opset with LayerNormalization; onnxruntime >= 1.14 runs it
SOURCE_FILES = {  # per component: the model-directory files its weights and dims come from
    "speech_input": ("audiollm/final.pt", "audiollm/train.yaml", "audiollm/global_cmvn"),
    "decoder": ("decoder/final.pt", "decoder/model.json"),
    "codec": ("codec/final.pt", "codec/model.json"),
}
_HASH_BLOCK_BYTES = 1 << 20


@dataclass
class _ExportModules:
    """CPU float32 modules to trace (copies when the stack runs elsewhere)."""

    encoder: nn.Module
    adapter: nn.Module
    decoder: nn.Module
    codec: nn.Module


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as err:
        raise RuntimeError("ONNX export needs the onnx package: pip install 'onnx>=1.16'") from err
    return onnx


def _export_modules(models: FreezeOmniModels) -> _ExportModules:
    cpu = torch.device("cpu")
    modules = {name: getattr(models, name) for name in ("encoder", "adapter", "decoder", "codec")}
    if models.device != cpu or models.dtype != torch.float32:
        if models.dtype != torch.float32:
            logger.warning("exporting %s weights; load the models in float32 for an exact export",
                           models.dtype)
        modules = {k: copy.deepcopy(m).to(device=cpu, dtype=torch.float32) for k, m in modules.items()}
    return _ExportModules(**{k: m.eval() for k, m in modules.items()})


def _graph_specs(modules: _ExportModules) -> list[GraphSpec]:
    return [
        speech_input_spec(modules.encoder, modules.adapter),
        *decoder_specs(modules.decoder),
        codec_spec(modules.codec),
    ]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_sha256(model_dir: Path | None, component: str, memo: dict[str, str]) -> dict[str, str]:
    if model_dir is None:
        return {}
    for name in SOURCE_FILES[component]:
        if name not in memo:
            memo[name] = file_sha256(Path(model_dir) / name)
    return {name: memo[name] for name in SOURCE_FILES[component]}


def _trace(spec: GraphSpec, path: Path, opset: int) -> None:
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        # Expected here: the legacy-exporter deprecation notice and tracer notes about
        # constants (the BOS id, the adapter's even-frame check) that are constant anyway.
        warnings.simplefilter("always")
        torch.onnx.export(
            spec.module.eval(), spec.example, str(path), input_names=spec.input_names,
            output_names=spec.output_names, dynamic_axes=spec.dynamic_axes,
            opset_version=opset, dynamo=False,
        )
    for item in caught:
        logger.debug("%s export: %s", spec.file_name, item.message)


def _metadata(models: FreezeOmniModels, spec: GraphSpec, opset: int, probe: list[float],
              sha256: dict[str, str]) -> dict[str, str]:
    return {
        "component": spec.component,
        "graph": spec.file_name,
        "format_version": GRAPH_FORMAT_VERSION,
        "dims": json.dumps(component_dims(models, spec.component), sort_keys=True),
        "opset": str(opset),
        "source_sha256": json.dumps(sha256, sort_keys=True),
        "weights_probe": json.dumps(probe),
        "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=False)",
    }


def _finish(onnx: Any, path: Path, metadata: dict[str, str]) -> None:
    """Store the metadata in `metadata_props` and run the ONNX checker on the file."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, value
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def read_metadata(path: Path) -> dict[str, str]:
    """The `freeze_omni.*` metadata of an exported file, prefix removed (needs `onnx`)."""
    model = _require_onnx().load(str(path), load_external_data=False)
    return {
        p.key[len(METADATA_PREFIX):]: p.value
        for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)
    }


def export_onnx(
    models: FreezeOmniModels, out_dir: Path, opset: int = DEFAULT_OPSET, model_dir: Path | None = None
) -> list[Path]:
    """Export speech input, speech decoder and codec graphs of `models` to `out_dir`.

    Args:
        models: the loaded stack (any device/dtype; traced as CPU float32 copies if needed).
        out_dir: created if missing; existing graph files are overwritten.
        opset: ONNX opset (17 or newer).
        model_dir: the model directory `models` was loaded from; its checkpoint files'
            sha256 go into the metadata (left empty, with a warning, when omitted).

    Returns:
        The written files, in the order speech input, decoder graphs, codec.

    Raises:
        RuntimeError: the `onnx` package is missing.
    """
    onnx = _require_onnx()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        logger.warning("no model directory given: source checksums are not recorded")
    modules = _export_modules(models)
    memo: dict[str, str] = {}
    written = []
    for spec in _graph_specs(modules):
        path = out_dir / spec.file_name
        _trace(spec, path, opset)
        probe = weights_probe(component_modules(modules, spec.component))
        sha256 = _source_sha256(model_dir, spec.component, memo)
        _finish(onnx, path, _metadata(models, spec, opset, probe, sha256))
        logger.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
        written.append(path)
    return written
