"""With no model paths given, the commands use the embedded default model (and its SmolLM2)."""
from __future__ import annotations

import shutil

import pytest

import quantized_models.embedded_model as embedded
from quantized_models.embedded_model import resolve_model_paths
from quantized_models.errors import ModelLoadError


@pytest.fixture()
def embedded_tiny(tmp_path, monkeypatch, tiny_dir):
    """The tiny fixture installed as the embedded model; its tiny LLM stands in for SmolLM2."""
    import quantized_models.smollm2 as smollm2

    folder = tmp_path / "embedded"
    shutil.copytree(tiny_dir / "checkpoints", folder)
    monkeypatch.setattr(embedded, "EMBEDDED_MODEL_DIR", folder)
    monkeypatch.setattr(smollm2, "prepare_smollm2", lambda cache_dir=None: tiny_dir / "llm")
    return folder


def test_nothing_given_and_nothing_embedded_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "EMBEDDED_MODEL_DIR", tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="no embedded default model.*--model-dir and --llm-dir"):
        resolve_model_paths(None, None)


def test_the_embedded_model_comes_with_its_own_llm(embedded_tiny, tiny_dir):
    assert resolve_model_paths(None, None) == (embedded_tiny, tiny_dir / "llm")
    assert resolve_model_paths(embedded_tiny, None) == (embedded_tiny, tiny_dir / "llm")
    given = (tiny_dir / "checkpoints", tiny_dir / "llm")
    assert resolve_model_paths(*given) == given  # explicit paths win


def test_a_foreign_model_dir_needs_its_llm(embedded_tiny, tiny_dir):
    with pytest.raises(ModelLoadError, match="needs --llm-dir"):
        resolve_model_paths(tiny_dir / "checkpoints", None)
    with pytest.raises(ModelLoadError, match="without --model-dir"):
        resolve_model_paths(None, tiny_dir / "llm")


def test_respond_without_model_flags_uses_the_embedded_model(embedded_tiny, tiny_dir, tmp_path, capsys):
    from assistant.cli import main

    out = tmp_path / "answer.wav"
    assert main(["respond", "--input", str(tiny_dir / "inputs/question.wav"), "--output", str(out),
                 "--turn-end", "file", "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert out.stat().st_size > 44
