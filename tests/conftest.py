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


def load_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
