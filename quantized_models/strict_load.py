"""Strict state-dict loading that names the file and the offending keys."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from quantized_models.errors import CheckpointError

_MAX_KEYS_SHOWN = 8


def _show(keys: list[str]) -> str:
    head = ", ".join(sorted(keys)[:_MAX_KEYS_SHOWN])
    more = len(keys) - _MAX_KEYS_SHOWN
    return head + (f" (+{more} more)" if more > 0 else "")


def check_state_dict(
    module: nn.Module, state: Mapping[str, torch.Tensor], source: Path | str
) -> None:
    """Raise CheckpointError unless `state` fills every entry of `module` exactly.

    Every parameter and persistent buffer must be present with the same shape, and
    every tensor of `state` must be consumed.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_show(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_show(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {_show(wrong_shape)}")
    if problems:
        raise CheckpointError(
            f"{source}: checkpoint does not match the model described by its config "
            f"({'; '.join(problems)}). Check that the file and its config belong together."
        )


def load_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], source: Path | str
) -> None:
    """Copy `state` into `module` after `check_state_dict`; dtype follows the module."""
    check_state_dict(module, state, source)
    module.load_state_dict(dict(state), strict=True)
