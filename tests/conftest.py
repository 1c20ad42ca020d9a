"""Shared test fixtures: the official tiny Freeze-Omni recording from ../shared."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_FIXTURE = REPO_ROOT.parent / "shared" / "fixtures" / "freeze-omni-tiny"
FIXTURE_INPUTS = ("question", "question_noise_question")


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """Root of the tiny fixture; skips the test when ../shared is not beside the repo."""
    if not (TINY_FIXTURE / "manifest.json").is_file():
        pytest.skip(f"shared fixture not found at {TINY_FIXTURE} (clone ../shared beside the repo)")
    return TINY_FIXTURE


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def train_cfg(tiny_dir: Path) -> dict:
    """The fixture's parsed `audiollm/train.yaml`."""
    import yaml

    return yaml.safe_load((tiny_dir / "checkpoints/audiollm/train.yaml").read_text())


def audiollm_part(tiny_dir: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors of `audiollm/final.pt` whose key starts with `prefix`, with the prefix removed."""
    state = torch.load(tiny_dir / "checkpoints/audiollm/final.pt", map_location="cpu")
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
