"""Text sampling (spec §4.6) against the official `_post_decode` distributions."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantized_models.sampling import TextSamplingConfig, sample_text_token, text_sampling_probs
from tests.conftest import load_json


@pytest.fixture(scope="module")
def sampling_fixture(tiny_dir: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = load_file(tiny_dir / "expected" / "sampling.safetensors")
    settings = load_json(tiny_dir / "expected" / "sampling.json")["text_settings"]
    return tensors, settings


@pytest.mark.parametrize("logit_index", range(6))
@pytest.mark.parametrize("setting_index", range(6))
def test_probs_match_official(sampling_fixture, logit_index: int, setting_index: int) -> None:
    tensors, settings = sampling_fixture
    # text_probs is laid out [logit vector, setting, vocab].
    expected = tensors["text_probs"][logit_index, setting_index]  # [V]
    cfg = TextSamplingConfig(**settings[setting_index])
    probs = text_sampling_probs(tensors["logits"][logit_index], cfg)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)


def test_strict_top_p_worked_example() -> None:
    # Spec §4.6: probs (.5, .25, .15, .1), p = 0.8 -> (2/3, 1/3, 0, 0); HF would keep .15 too.
    logits = torch.tensor([0.5, 0.25, 0.15, 0.1]).log()
    probs = text_sampling_probs(logits, TextSamplingConfig(temperature=1.0, top_k=0, top_p=0.8))
    torch.testing.assert_close(probs, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]), atol=1e-6, rtol=0)


def test_top_p_keeps_top_token_when_it_alone_exceeds_p() -> None:
    logits = torch.tensor([0.9, 0.05, 0.05]).log()
    probs = text_sampling_probs(logits, TextSamplingConfig(temperature=1.0, top_k=0, top_p=0.5))
    torch.testing.assert_close(probs, torch.tensor([1.0, 0.0, 0.0]))


def test_top_k_renormalises_and_temperature_sharpens() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    probs = text_sampling_probs(logits, TextSamplingConfig(temperature=0.5, top_k=2, top_p=0.0))
    expected = torch.softmax(torch.tensor([4.0, 2.0]), dim=-1)
    torch.testing.assert_close(probs, torch.cat([expected, torch.zeros(2)]))


def test_top_k_larger_than_vocab_keeps_everything() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0])
    probs = text_sampling_probs(logits, TextSamplingConfig(temperature=1.0, top_k=10, top_p=0.0))
    torch.testing.assert_close(probs, torch.softmax(logits, dim=-1))


def test_bfloat16_logits_give_float32_probs() -> None:
    logits = torch.randn(50).to(torch.bfloat16)
    probs = text_sampling_probs(logits, TextSamplingConfig())
    assert probs.dtype == torch.float32
    assert abs(float(probs.sum()) - 1.0) < 1e-6


def test_top_k_1_is_argmax_for_every_fixture_logit(sampling_fixture) -> None:
    tensors, _ = sampling_fixture
    cfg = TextSamplingConfig(temperature=0.7, top_k=1, top_p=0.8)
    for logits in tensors["logits"]:
        assert sample_text_token(logits, cfg) == int(torch.argmax(logits))


def test_sampling_follows_generator_and_support() -> None:
    logits = torch.tensor([0.5, 0.25, 0.15, 0.1]).log()
    cfg = TextSamplingConfig(temperature=1.0, top_k=0, top_p=0.8)
    draws = [sample_text_token(logits, cfg, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) == {0, 1}  # strict top-p removed tokens 2 and 3
    again = [sample_text_token(logits, cfg, torch.Generator().manual_seed(s)) for s in range(200)]
    assert draws == again
    assert 100 < draws.count(0) < 170  # expected 2/3 of 200


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"temperature": 0.0}, id="zero-temperature"),
        pytest.param({"temperature": float("nan")}, id="nan-temperature"),
        pytest.param({"top_k": -1}, id="negative-top-k"),
        pytest.param({"top_k": 2.5}, id="fractional-top-k"),
        pytest.param({"top_p": 1.5}, id="top-p-above-one"),
        pytest.param({"top_p": -0.1}, id="negative-top-p"),
    ],
)
def test_config_rejects_out_of_range(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TextSamplingConfig(**kwargs)


def test_rejects_batched_logits() -> None:
    with pytest.raises(ValueError):
        text_sampling_probs(torch.zeros(2, 5), TextSamplingConfig())
