"""Quantized loading of the frozen LLM through bitsandbytes (int8 LLM.int8() or 4-bit NF4).

Only the Hugging Face causal LM is quantized, and only its transformer `nn.Linear`
layers: transformers keeps the input embedding table and `lm_head` unquantized, so
`FrozenLlm.embed_tokens` and the next-token logits keep working. The state head, prompt
vectors, encoder, adapter, speech decoder and codec are separate modules and stay in
full precision by construction.

bitsandbytes (and accelerate, which transformers needs for any bitsandbytes load) are
optional: they are imported only when a quantized mode is asked for. bitsandbytes ≥ 0.46.1
runs both modes on a CPU-only machine (slowly); see `docs/QUANTIZATION.md`.
"""
from __future__ import annotations

import logging
import resource
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantized_models.errors import ModelLoadError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'freeze-omni-assistant[quantization]' (or bitsandbytes>=0.46.1 accelerate>=1.1)"
MIN_BITSANDBYTES = (0, 46, 1)
"""Oldest bitsandbytes that transformers 5 accepts; it also has the CPU backend for both modes."""
PROC_STATUS = Path("/proc/self/status")
MIB = 2**20


class QuantizationMode(Enum):
    """How the frozen LLM's linear layers are stored (`models.llm.quantization`)."""

    NONE = "none"
    """The checkpoint's weights in the run's dtype."""
    INT8 = "int8"
    """LLM.int8(): int8 weights, outlier features (|x| > 6) kept in float16."""
    NF4 = "nf4"
    """4-bit NormalFloat with double-quantized block scales; matmuls in the run's dtype."""

    @classmethod
    def parse(cls, text: str | QuantizationMode) -> QuantizationMode:
        """Mode from its config/CLI spelling; ValueError naming the choices otherwise."""
        if isinstance(text, cls):
            return text
        try:
            return cls(str(text).strip().lower())
        except ValueError:
            choices = ", ".join(mode.value for mode in cls)
            raise ValueError(f"unknown LLM quantization {text!r}; choose one of: {choices}") from None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _import_bitsandbytes(mode: QuantizationMode, device: torch.device) -> Any:
    """Import bitsandbytes and accelerate, or fail in one line saying what to install."""
    try:
        import accelerate  # noqa: F401  (transformers refuses bitsandbytes loads without it)
        import bitsandbytes
    except ImportError as err:
        raise ModelLoadError(
            f"{mode.value} quantization needs the optional packages bitsandbytes and accelerate "
            f"({err.name} is missing): {INSTALL_HINT}"
        ) from err
    if _version_tuple(bitsandbytes.__version__) < MIN_BITSANDBYTES:
        raise ModelLoadError(
            f"{mode.value} quantization needs bitsandbytes>=0.46.1, found {bitsandbytes.__version__}: "
            f"{INSTALL_HINT}"
        )
    supported = getattr(bitsandbytes, "supported_torch_devices", None)
    if supported is not None and device.type not in supported:
        raise ModelLoadError(
            f"{mode.value} quantization: bitsandbytes {bitsandbytes.__version__} has no backend for "
            f"{device.type} devices (it supports {', '.join(sorted(supported))})"
        )
    return bitsandbytes


def llm_load_kwargs(mode: QuantizationMode, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Extra `AutoModelForCausalLM.from_pretrained` keyword arguments for `mode`.

    Checks the optional packages first, so a missing or unusable bitsandbytes fails
    before any weight is read.

    Args:
        mode: the LLM quantization.
        dtype: the run's dtype; for NF4 also the matmul (compute) dtype, and for every
            mode the dtype of what stays unquantized (embeddings, norms, `lm_head`).
        device: where the LLM runs. bitsandbytes quantizes while placing the weights,
            so quantized loads go straight to `device` (`device_map`); a later
            `.to(device)` is then a no-op.

    Returns:
        `{}` for `NONE`; otherwise `quantization_config` (a `BitsAndBytesConfig`) and
        `device_map`.
    """
    mode = QuantizationMode.parse(mode)
    if mode is QuantizationMode.NONE:
        return {}
    _import_bitsandbytes(mode, device)
    from transformers import BitsAndBytesConfig

    if mode is QuantizationMode.INT8:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",  # the only 4-bit type bitsandbytes offers on CPU
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    return {"quantization_config": config, "device_map": {"": device}}


def host_memory_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in bytes."""
    fields: dict[str, int] = {}
    try:
        for line in PROC_STATUS.read_text(encoding="ascii").splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024  # the kernel reports kB
    except (OSError, ValueError):
        pass
    # ru_maxrss is in kB on Linux but in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return fields.get("VmRSS", peak), fields.get("VmHWM", peak)


def memory_report(device: torch.device) -> str:
    """One log line: host RSS (current / peak) and, on a CUDA device, GPU memory in MiB."""
    rss, peak = host_memory_bytes()
    text = f"host RSS {rss / MIB:.0f} MiB (peak {peak / MIB:.0f} MiB)"
    if device.type != "cpu" and torch.cuda.is_available():
        allocated = torch.cuda.memory_allocated(device)
        reserved = torch.cuda.memory_reserved(device)
        top = torch.cuda.max_memory_allocated(device)
        text += (f"; GPU {device} allocated {allocated / MIB:.0f} MiB, reserved {reserved / MIB:.0f} MiB"
                 f" (peak allocated {top / MIB:.0f} MiB)")
    return text


def check_frozen(causal_lm: nn.Module) -> None:
    """RuntimeError unless every parameter of the LLM has `requires_grad=False`."""
    trainable = [name for name, param in causal_lm.named_parameters() if param.requires_grad]
    if trainable:
        raise RuntimeError(
            f"the frozen LLM has {len(trainable)} trainable parameters (first: {trainable[0]}); "
            "call requires_grad_(False) on it before use"
        )


def quantized_linear_count(module: nn.Module) -> int:
    """Number of bitsandbytes linear layers (int8 or 4-bit) inside `module`."""
    if "bitsandbytes" not in sys.modules:
        return 0
    import bitsandbytes

    kinds = (bitsandbytes.nn.Linear8bitLt, bitsandbytes.nn.Linear4bit)
    return sum(isinstance(sub, kinds) for sub in module.modules())


def check_quantized_llm(causal_lm: nn.Module, mode: QuantizationMode) -> None:
    """Verify a loaded LLM against `mode`; RuntimeError with the reason otherwise.

    The LLM must be frozen; a quantized one must really contain bitsandbytes layers,
    and its input embedding table and output head must still hold floating-point
    weights, because the Freeze-Omni wrapper reads the table directly and the
    sampler needs full-width logits.
    """
    check_frozen(causal_lm)
    mode = QuantizationMode.parse(mode)
    if mode is QuantizationMode.NONE:
        return
    if quantized_linear_count(causal_lm) == 0:
        raise RuntimeError(f"{mode.value} was requested but the LLM has no bitsandbytes layers")
    for role, table in (("input embeddings", causal_lm.get_input_embeddings()),
                        ("output head", causal_lm.get_output_embeddings())):
        weight = getattr(table, "weight", None)
        if weight is None or not weight.is_floating_point():
            found = None if weight is None else weight.dtype
            raise RuntimeError(f"{mode.value}: the LLM's {role} are not floating point ({found})")
