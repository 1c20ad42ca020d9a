"""onnxruntime sessions for the exported graphs: providers, IO binding, metadata checks.

Tensors cross the boundary through `IOBinding` with raw pointers: inputs are bound where
they live and outputs are written straight into preallocated torch tensors, so a CUDA
session reads and writes device memory without host copies. The CPU path uses the same
binding code (and is what the tests exercise); the CUDA path is untested here.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from quantized_models.errors import ModelLoadError
from quantized_models.onnx_graphs import (
    GRAPH_FORMAT_VERSION,
    METADATA_PREFIX,
    component_dims,
    component_modules,
    probe_mismatch,
    weights_probe,
)

if TYPE_CHECKING:
    from quantized_models.model_dir import FreezeOmniModels

logger = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
_ELEMENT_TYPES = {torch.float32: np.float32, torch.int64: np.int64}
_CPU = torch.device("cpu")


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise ModelLoadError(
            "the ONNX backend needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu for CUDA)"
        ) from err
    return onnxruntime


def export_hint(onnx_dir: Path) -> str:
    return f"run `freeze-omni export-onnx --model-dir MODEL_DIR --llm-dir LLM_DIR --out {onnx_dir}`"


def _is_cuda(device: torch.device) -> bool:
    accelerator = torch.accelerator.current_accelerator() if torch.cuda.is_available() else None
    return accelerator is not None and device.type == accelerator.type


@dataclass(frozen=True)
class Placement:
    """Execution providers of every session and the device ORT reads and writes."""

    providers: list[Any]
    device: torch.device


def choose_placement(ort: Any, device: torch.device) -> Placement:
    """CUDA provider when onnxruntime has it and the models live on CUDA, else the CPU."""
    wants_cuda = _is_cuda(device)
    if wants_cuda and CUDA_PROVIDER in ort.get_available_providers():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return Placement([(CUDA_PROVIDER, {"device_id": index}), CPU_PROVIDER],
                         torch.device(device.type, index))
    if wants_cuda:
        logger.warning(
            "onnxruntime has no %s (install onnxruntime-gpu instead of onnxruntime); "
            "the ONNX graphs run on the CPU", CUDA_PROVIDER,
        )
    return Placement([CPU_PROVIDER], _CPU)


class OrtGraph:
    """One inference session and how to feed it torch tensors."""

    def __init__(self, ort: Any, path: Path, placement: Placement, threads: int | None) -> None:
        options = ort.SessionOptions()
        # ORT's worker threads spin after each run by default; between two graph calls the
        # engine runs torch (the LLM) on the same cores, which the spinning would starve.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=placement.providers)
        except Exception as err:  # onnxruntime raises its own pybind exception types
            raise ModelLoadError(f"{path}: onnxruntime cannot load this graph ({err})") from err
        self.path = path
        self.device = placement.device
        custom = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {
            k[len(METADATA_PREFIX):]: v for k, v in custom.items() if k.startswith(METADATA_PREFIX)
        }

    def empty(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An output buffer on the session's device."""
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _bind(self, binding: Any, name: str, tensor: torch.Tensor, output: bool) -> None:
        index = self.device.index or 0
        args = (name, self.device.type, index, _ELEMENT_TYPES[tensor.dtype], list(tensor.shape),
                tensor.data_ptr())
        if output:
            binding.bind_output(*args)
        elif tensor.numel() == 0:
            binding.bind_cpu_input(name, np.empty(tuple(tensor.shape), _ELEMENT_TYPES[tensor.dtype]))
        else:
            binding.bind_input(*args)

    def run(
        self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Run with `feeds` bound as inputs and the `empty` buffers in `outputs` filled in place."""
        binding = self.session.io_binding()
        alive = [t.to(self.device).contiguous() for t in feeds.values()]  # held until the run ends
        for name, tensor in zip(feeds, alive):
            self._bind(binding, name, tensor, output=False)
        for name, tensor in outputs.items():
            self._bind(binding, name, tensor, output=True)
        if self.device != _CPU:
            torch.cuda.synchronize(self.device)  # inputs come from torch's stream, ORT has its own
        self.session.run_with_iobinding(binding)
        return outputs


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _dims_difference(exported: dict[str, Any], current: dict[str, Any]) -> str:
    a, b = _flatten(exported), _flatten(current)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return "; ".join(f"{k}: {a.get(k)!r} in the export, {b.get(k)!r} loaded" for k in keys[:4])


class GraphOpener:
    """Opens graph files of one export directory and checks them against the loaded models."""

    def __init__(self, models: FreezeOmniModels, onnx_dir: Path, threads: int | None) -> None:
        self.ort = require_onnxruntime()
        self.models, self.onnx_dir, self.threads = models, onnx_dir, threads
        self.placement = choose_placement(self.ort, models.device)
        self._probes: dict[str, list[float]] = {}

    def open(self, file_name: str, component: str) -> OrtGraph:
        graph = OrtGraph(self.ort, self.onnx_dir / file_name, self.placement, self.threads)
        self._check(graph, component)
        logger.info("loaded %s on %s", graph.path, self.placement.providers[0])
        return graph

    def opener(self, file_name: str, component: str) -> Callable[[], OrtGraph]:
        return lambda: self.open(file_name, component)

    def _check(self, graph: OrtGraph, component: str) -> None:
        meta, hint = graph.metadata, export_hint(self.onnx_dir)
        found = (meta.get("component"), meta.get("format_version"))
        if found != (component, GRAPH_FORMAT_VERSION) or "dims" not in meta or "weights_probe" not in meta:
            raise ModelLoadError(
                f"{graph.path}: not a {component} graph of export format {GRAPH_FORMAT_VERSION} "
                f"(metadata says component {found[0]!r}, format {found[1]!r}); {hint}"
            )
        exported, current = json.loads(meta["dims"]), component_dims(self.models, component)
        if exported != current:
            raise ModelLoadError(
                f"{graph.path} was exported for other model dimensions "
                f"({_dims_difference(exported, current)}); {hint}"
            )
        if component not in self._probes:
            self._probes[component] = weights_probe(component_modules(self.models, component))
        problem = probe_mismatch(json.loads(meta["weights_probe"]), self._probes[component])
        if problem:
            raise ModelLoadError(f"{graph.path} was exported from other weights ({problem}); {hint}")
