"""Where a training or evaluation run puts its work: the torch device named on the command line
(checked once, before any data or model loads), torch's CPU threads, and the random generators a
checkpoint carries (CUDA's too, when a run uses it)."""
from __future__ import annotations

import random
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn


def training_device(name: str) -> torch.device:
    """The torch device `name` names, refused with a fix when this machine cannot use it."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"--device {name!r} is not a torch device name: use cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no usable CUDA device (torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        if device.index is None:  # a tensor's device always carries its index: compare like with like
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: training runs on cpu or cuda devices only")
    return device


def set_torch_threads(threads: int | None) -> None:
    """`--threads`: torch's intra-op CPU threads; None keeps torch's choice (one per core)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads {threads}: give at least 1 (or leave it out for one thread per core)")
    torch.set_num_threads(threads)


def rng_state() -> dict:
    """Every generator a training step draws from (torch, numpy, python; CUDA's when in use)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()  # dropout on a GPU draws from these
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`; CUDA's only where this machine has as many CUDA devices."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def check_on_device(modules: Iterable[nn.Module], device: torch.device) -> None:
    """Refuse modules with a parameter or buffer off `device` (a stage forgot to move it)."""
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.device != device:
                raise RuntimeError(f"{type(module).__name__}.{name} is on {tensor.device}, the run on {device}")
