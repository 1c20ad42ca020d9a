"""Reading torch checkpoint files with clear errors."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from quantized_models.errors import ModelLoadError

logger = logging.getLogger(__name__)


def _reason(err: BaseException) -> str:
    """One line out of torch's multi-paragraph load errors."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("Unsupported", "invalid load key", "PytorchStreamReader")):
            return line
    return lines[0] if lines else type(err).__name__


def read_checkpoint(path: Path | str, what: str) -> Any:
    """Load a torch checkpoint on the CPU.

    Tensors-only loading is tried first. Training snapshots may also pickle Python
    objects (optimizer settings, argument namespaces); such a file is loaded with full
    unpickling after a warning, since the model directory is a local path the user chose.

    Args:
        path: the file.
        what: what the file should be, for error messages ("codec checkpoint").
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: the {what} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # anything but a pickled Python object
            raise ModelLoadError(f"{path}: cannot read the {what} ({_reason(err)})") from err
        logger.warning("%s holds Python objects besides tensors; loading it with full unpickling "
                       "(only use model directories you trust)", path)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise ModelLoadError(f"{path}: cannot read the {what} ({_reason(err)})") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure here means an unusable file
        raise ModelLoadError(f"{path}: cannot read the {what} ({_reason(err)})") from err
