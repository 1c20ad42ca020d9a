"""Layering rules: model code stays pure, audio code stays torch-free, no prints in libraries."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "quantized_models": {"asyncio", "threading", "pyaudio", "sounddevice", "webrtcvad", "audio_io"},
    "audio_io": {"torch", "transformers", "quantized_models"},
}
LIBRARY_PACKAGES = ("quantized_models", "audio_io", "assistant")
PRINT_ALLOWED = {"assistant/cli.py", "assistant/config_cli.py"}  # the command-line output modules


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_forbidden_imports(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no python files under {package}"
    offenders = {
        str(f.relative_to(REPO)): sorted(_imports(f) & FORBIDDEN[package])
        for f in files if _imports(f) & FORBIDDEN[package]
    }
    assert not offenders, f"forbidden imports: {offenders}"


def test_no_print_or_cuda_literal_in_library_code():
    offenders = []
    for package in LIBRARY_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id == "print" and rel not in PRINT_ALLOWED):
                    offenders.append(f"{rel}:{node.lineno} print")
                if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and node.value.startswith("cuda") and rel not in PRINT_ALLOWED):
                    offenders.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not offenders, offenders
