"""Speech decoder parity with the official recording (tiny fixture) and unit checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantized_models.errors import CheckpointError, ModelLoadError
from quantized_models.speech_decoder import (
    DecoderCache,
    DecoderDims,
    SpeechDecoder,
    generate_codec_tokens,
    load_speech_decoder,
    sample_speech_token,
    speech_top_k_probs,
    split_llm_rows,
)
from tests.conftest import FIXTURE_INPUTS, load_json

MAX_SPEECH_TOKENS = 120  # the recording's per-segment cap (expected/run_config.json)
SPEECH_TOP_K = (1, 2, 5)  # expected/sampling.json speech_top_k


@pytest.fixture(scope="module")
def decoder(tiny_dir: Path) -> SpeechDecoder:
    ckpt = tiny_dir / "checkpoints" / "decoder"
    return load_speech_decoder(ckpt / "final.pt", DecoderDims.from_model_json(ckpt / "model.json"))


def _segments(tiny_dir: Path, name: str) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    out = []
    for seg in load_json(tiny_dir / "expected" / name / "segments.json")["segments"]:
        tensors = load_file(tiny_dir / "expected" / name / f"segment{seg['segment']:02d}.safetensors")
        out.append((seg, tensors))
    return out


def test_dims_from_model_json(tiny_dir: Path) -> None:
    dims = DecoderDims.from_model_json(tiny_dir / "checkpoints" / "decoder" / "model.json")
    assert (dims.idim, dims.odim, dims.num_heads, dims.num_blocks) == (16, 64, 2, 4)
    assert (dims.bos_id, dims.sos_id, dims.eos_id, dims.pad_id, dims.vocab_size) == (64, 65, 66, 67, 68)
    assert dims.num_pre_layers == 2 and dims.head_dim == 8 and dims.kv_cache_prefix_finetune


def test_dims_rejects_bad_config(tmp_path: Path, tiny_dir: Path) -> None:
    idim, odim, args = load_json(tiny_dir / "checkpoints" / "decoder" / "model.json")
    with pytest.raises(ModelLoadError, match="transformer_attention_heads"):
        DecoderDims.from_model_json([idim, odim, {k: v for k, v in args.items() if "heads" not in k}])
    bad = tmp_path / "model.json"
    bad.write_text(json.dumps([idim, odim, {**args, "transformer_attention_heads": 3}]))
    with pytest.raises(ModelLoadError, match=str(bad)):
        DecoderDims.from_model_json(bad)


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_codec_ids_match_recording(tiny_dir: Path, decoder: SpeechDecoder, name: str) -> None:
    for seg, tensors in _segments(tiny_dir, name):
        ids = list(
            generate_codec_tokens(
                decoder, tensors["decoder_hidden_in"], tensors["decoder_prefix_in"], 1, MAX_SPEECH_TOKENS
            )
        )
        assert ids == seg["codec_ids"], f"{name} segment {seg['segment']}"
        ended_at_cap = len(ids) == MAX_SPEECH_TOKENS
        assert ended_at_cap == (seg["codec_end_reason"] == "token_cap")


def test_special_mask_does_not_change_greedy_fixture(tiny_dir: Path, decoder: SpeechDecoder) -> None:
    """The official sampler does not mask BOS/SOS/PAD; on the recording it never had to."""
    specials = {decoder.dims.bos_id, decoder.dims.sos_id, decoder.dims.pad_id}
    for name in FIXTURE_INPUTS:
        for seg, tensors in _segments(tiny_dir, name):
            cache = decoder.prefill(
                tensors["decoder_hidden_in"], tensors["decoder_prefix_in"], DecoderCache(MAX_SPEECH_TOKENS)
            )
            for token in [decoder.dims.sos_id, *seg["codec_ids"][:-1]]:
                logits, cache = decoder.step(token, cache)
                raw = int(torch.argmax(logits))
                assert raw not in specials
                assert raw == int(torch.argmax(decoder.mask_non_codec(logits)))


def test_mask_blocks_specials(decoder: SpeechDecoder) -> None:
    dims = decoder.dims
    logits = torch.zeros(dims.vocab_size)
    logits[[dims.bos_id, dims.sos_id, dims.pad_id]] = 50.0
    logits[3] = 1.0
    assert sample_speech_token(decoder.mask_non_codec(logits), 1) == 3
    gen = torch.Generator().manual_seed(0)
    draws = {sample_speech_token(decoder.mask_non_codec(logits), 5, gen) for _ in range(50)}
    assert not draws & {dims.bos_id, dims.sos_id, dims.pad_id}


def test_speech_probs_match_recording(tiny_dir: Path) -> None:
    expected = load_file(tiny_dir / "expected" / "sampling.safetensors")
    assert tuple(load_json(tiny_dir / "expected" / "sampling.json")["speech_top_k"]) == SPEECH_TOP_K
    for j, k in enumerate(SPEECH_TOP_K):
        probs = speech_top_k_probs(expected["logits"], k)
        torch.testing.assert_close(probs, expected["speech_probs"][:, j], atol=1e-6, rtol=0)
        assert ((probs > 0).sum(-1) == k).all()


def test_sampling_top_k_and_reproducible() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.8])
    assert sample_speech_token(logits, 1) == 1
    draws = [sample_speech_token(logits, 2, torch.Generator().manual_seed(s)) for s in range(40)]
    assert set(draws) == {1, 2}
    again = [sample_speech_token(logits, 2, torch.Generator().manual_seed(s)) for s in range(40)]
    assert draws == again
    with pytest.raises(ValueError):
        sample_speech_token(logits, 0)


def test_cache_is_bounded_and_positions_continue(tiny_dir: Path, decoder: SpeechDecoder) -> None:
    seg, tensors = _segments(tiny_dir, "question")[1]
    cache = decoder.prefill(tensors["decoder_hidden_in"], tensors["decoder_prefix_in"], DecoderCache(3))
    n_cond = tensors["decoder_hidden_in"].shape[0] + 1
    assert cache.prefix_len == tensors["decoder_prefix_in"].shape[0]
    assert cache.get_seq_length() == cache.prefix_len + n_cond
    shapes = [k.shape for k in cache.keys]
    for token in (decoder.dims.sos_id, 1, 2):
        _, cache = decoder.step(token, cache)
    assert [k.shape for k in cache.keys] == shapes and cache.generated == 3
    with pytest.raises(RuntimeError, match="max_new_tokens"):
        decoder.step(4, cache)


def test_prefix_optional(tiny_dir: Path, decoder: SpeechDecoder) -> None:
    seg, tensors = _segments(tiny_dir, "question")[1]
    ids = list(generate_codec_tokens(decoder, tensors["decoder_hidden_in"], None, 1, 20))
    assert ids and all(0 <= i < decoder.dims.odim for i in ids)
    assert ids != seg["codec_ids"][: len(ids)]  # the prefix matters


def _save_variant(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "final.pt"
    torch.save({"model": state}, path)
    return path


def test_strict_loading_names_file_and_key(tmp_path: Path, tiny_dir: Path) -> None:
    ckpt = tiny_dir / "checkpoints" / "decoder"
    dims = DecoderDims.from_model_json(ckpt / "model.json")
    state = torch.load(ckpt / "final.pt", map_location="cpu", weights_only=True)["model"]
    key = "layers_prefix.3.mlp.up_proj.weight"
    variants = {
        "missing": {k: v for k, v in state.items() if k != key},
        "unexpected": {**state, "layers.9.extra.weight": torch.zeros(1)},
        "wrong shapes": {**state, key: torch.zeros(3, 3)},
    }
    for problem, variant in variants.items():
        path = _save_variant(tmp_path, variant)
        with pytest.raises(CheckpointError) as err:
            load_speech_decoder(path, dims)
        message = str(err.value)
        assert str(path) in message and problem in message
        assert (key if problem != "unexpected" else "layers.9.extra.weight") in message


def test_split_llm_rows() -> None:
    x = torch.arange(2 * 64, dtype=torch.float32).view(2, 64)
    rows = split_llm_rows(x, 16)
    assert rows.shape == (8, 16)
    torch.testing.assert_close(rows[5], x[1, 16:32])  # vector 1, second slice
    with pytest.raises(ValueError, match="not a multiple"):
        split_llm_rows(torch.zeros(2, 60), 16)
