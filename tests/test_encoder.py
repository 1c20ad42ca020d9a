"""Streaming speech encoder against the official tiny recording, plus streaming properties."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

import quantized_models.encoder as encoder_module
from quantized_models.encoder import (
    EncoderCache,
    EncoderDims,
    SpeechEncoder,
    sinusoid_table,
    step_positions,
)
from quantized_models.errors import CheckpointError, ModelLoadError
from quantized_models.frontend import CHUNK_FEATURE_ROWS, Cmvn, load_json_cmvn
from quantized_models.strict_load import load_strict
from tests.conftest import FIXTURE_INPUTS, audiollm_part, load_json

PREFIX = "encoder."


def close_to(got: torch.Tensor, expected: torch.Tensor) -> None:
    """README tolerance for hidden states: atol 1e-4 * max|x|."""
    assert got.shape == expected.shape
    assert_close(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)


@pytest.fixture(scope="module")
def encoder_state(tiny_dir: Path) -> dict[str, torch.Tensor]:
    return audiollm_part(tiny_dir, PREFIX)


@pytest.fixture(scope="module")
def encoder(tiny_dir: Path, train_cfg: dict, encoder_state: dict) -> SpeechEncoder:
    cmvn = Cmvn.from_stats(*load_json_cmvn(tiny_dir / "checkpoints/audiollm/global_cmvn"))
    model = SpeechEncoder(EncoderDims.from_train_yaml(train_cfg), cmvn)
    load_strict(model, encoder_state, tiny_dir / "checkpoints/audiollm/final.pt")
    return model.eval()


def fbank_chunks(tiny_dir: Path, name: str) -> torch.Tensor:
    return load_file(tiny_dir / "expected" / name / "frontend.safetensors")["fbank_chunks"]


@torch.no_grad()
def run_stream(model: SpeechEncoder, chunks: torch.Tensor) -> torch.Tensor:
    cache, outs = EncoderCache(), []
    for chunk in chunks.split(1):
        out, cache = model.step(chunk, cache)
        outs.append(out)
    return torch.cat(outs)


def small_encoder(seed: int = 0, left_chunks: int = 2) -> SpeechEncoder:
    """Random tiny encoder (dims 8, 2 heads, few left chunks) so masks and caches matter."""
    torch.manual_seed(seed)
    dims = EncoderDims(
        n_mels=12, model_dim=8, attention_heads=2, linear_units=16, num_blocks=2,
        chunk_frames=4, left_chunks=left_chunks,
    )
    model = SpeechEncoder(dims, Cmvn.from_stats(torch.randn(12), torch.rand(12) + 0.5))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))  # non-zero u/v biases and LN params
    return model.eval()


def test_dims_from_fixture(train_cfg: dict) -> None:
    dims = EncoderDims.from_train_yaml(train_cfg)
    assert (dims.n_mels, dims.model_dim, dims.attention_heads, dims.head_dim) == (80, 32, 4, 8)
    assert (dims.linear_units, dims.num_blocks, dims.chunk_frames, dims.left_chunks) == (64, 2, 4, 16)
    assert (dims.cache_frames, dims.full_window_frames, dims.pe_wrap) == (64, 68, 4932)


def test_state_dict_keys_equal_checkpoint(encoder: SpeechEncoder, encoder_state: dict) -> None:
    assert set(encoder.state_dict()) == set(encoder_state)
    for key, value in encoder.state_dict().items():
        assert value.shape == encoder_state[key].shape, key


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_subsampling_out(tiny_dir: Path, encoder: SpeechEncoder, name: str) -> None:
    expected = load_file(tiny_dir / "expected" / name / "encoder.safetensors")["subsampling_out"]
    with torch.no_grad():
        close_to(encoder.subsample(fbank_chunks(tiny_dir, name)), expected)


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_streaming_encoder_out(tiny_dir: Path, encoder: SpeechEncoder, name: str) -> None:
    expected = load_file(tiny_dir / "expected" / name / "encoder.safetensors")["encoder_out"]
    close_to(run_stream(encoder, fbank_chunks(tiny_dir, name)), expected)


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_offline_encoder_out(tiny_dir: Path, encoder: SpeechEncoder, name: str) -> None:
    expected = load_file(tiny_dir / "expected" / name / "encoder.safetensors")["encoder_out"]
    with torch.no_grad():
        close_to(encoder.forward_full(fbank_chunks(tiny_dir, name)), expected)


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_positional_bookkeeping(tiny_dir: Path, encoder: SpeechEncoder, name: str) -> None:
    record = load_json(tiny_dir / "expected" / name / "chunks.json")
    dims = encoder.dims
    assert (record["pe_max_len"], record["pe_full_chunk_size"]) == (dims.pe_wrap, dims.full_window_frames)
    tables = load_file(tiny_dir / "expected" / name / "encoder.safetensors")
    cache = EncoderCache()
    with torch.no_grad():
        for row, chunk in zip(record["chunks"], fbank_chunks(tiny_dir, name).split(1), strict=True):
            before, cached = cache.pe_index, cache.cached_frames
            start, length = step_positions(dims, before, cached)
            frames_done = (row["chunk"] + 1) * dims.chunk_frames
            assert before == row["pe_index_before"] and cached == row["encoder_cache_frames_before"]
            assert [start, start + length] == row["positions"] and length == row["pe_length"]
            assert [frames_done - length, frames_done] == row["key_frames"]
            table = tables.get(f"pos_emb_chunk{row['chunk']:02d}")
            if table is not None:
                assert_close(sinusoid_table(torch.arange(start, start + length), dims.model_dim), table)
            _, cache = encoder.step(chunk, cache)
            assert cache.pe_index == row["pe_index_after"]


def test_lag_and_wrap_of_positions(encoder: SpeechEncoder) -> None:
    dims = encoder.dims
    assert step_positions(dims, 16 * 4, 64) == (0, 68)  # chunk 16: exact frame indices
    assert step_positions(dims, 17 * 4, 64) == (0, 68)  # chunk 17: keys are frames 4..71
    assert step_positions(dims, 18 * 4, 64) == (4, 68)
    assert step_positions(dims, 4928, 64) == (4860, 68)  # last chunk before the wrap
    assert step_positions(dims, 4932, 64) == (0, 68)  # chunk 1233 wraps to 0
    assert step_positions(dims, 4932 + 72, 64) == (4, 68)


def test_streaming_equals_offline_across_lag_and_wrap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A short official table (wrap after 20 chunks) so that one test crosses both quirks."""
    model = small_encoder(left_chunks=3)
    monkeypatch.setattr(encoder_module, "OFFICIAL_PE_MAX_LEN", 96)
    assert model.dims.pe_wrap == 96 - 16
    chunks = torch.randn(45, CHUNK_FEATURE_ROWS, model.dims.n_mels) * 3
    with torch.no_grad():
        assert_close(model.forward_full(chunks), run_stream(model, chunks), atol=1e-5, rtol=1e-5)


def test_causality(tiny_dir: Path, encoder: SpeechEncoder) -> None:
    chunks = fbank_chunks(tiny_dir, "question_noise_question")
    with torch.no_grad():
        whole = encoder.forward_full(chunks)
        for n in (1, 5, 17, 18):
            assert_close(encoder.forward_full(chunks[:n]), whole[:n], atol=1e-5, rtol=1e-5)
    changed = chunks.clone()
    changed[20:] += 5.0
    with torch.no_grad():
        assert_close(run_stream(encoder, changed)[:20], whole[:20], atol=1e-5, rtol=1e-5)


def test_cache_stays_bounded_and_resets() -> None:
    model = small_encoder(left_chunks=16)
    cache = EncoderCache()
    with torch.no_grad():
        for _ in range(100):
            _, cache = model.step(torch.randn(1, CHUNK_FEATURE_ROWS, model.dims.n_mels), cache)
            assert cache.cached_frames <= model.dims.cache_frames
    assert len(cache.keys) == len(cache.values) == model.dims.num_blocks
    assert all(t.shape == (1, 2, 64, 4) for t in cache.keys + cache.values)
    assert cache.pe_index == 400
    cache.reset()
    assert (cache.keys, cache.values, cache.pe_index, cache.cached_frames) == ([], [], 0, 0)


def test_checkpoint_cmvn_wins_over_json_file(
    tiny_dir: Path, train_cfg: dict, encoder_state: dict
) -> None:
    """Spec 14.6: values in final.pt replace the statistics read from `global_cmvn`."""
    file_mean, file_istd = load_json_cmvn(tiny_dir / "checkpoints/audiollm/global_cmvn")
    model = SpeechEncoder(EncoderDims.from_train_yaml(train_cfg), Cmvn.from_stats(file_mean, file_istd))
    state = dict(encoder_state)
    state["global_cmvn.mean"] = file_mean + 1.0
    state["global_cmvn.istd"] = file_istd * 2.0
    load_strict(model, state, "final.pt")
    x = fbank_chunks(tiny_dir, "question")[:2]
    assert_close(model.global_cmvn.mean, file_mean + 1.0)
    assert_close(model.global_cmvn(x), (x - file_mean - 1.0) * file_istd * 2.0)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        pytest.param(lambda s: s.pop("enc.1.after_norm.bias"), "enc.1.after_norm.bias", id="missing"),
        pytest.param(lambda s: s.update(extra=torch.zeros(1)), "extra", id="unexpected"),
        pytest.param(
            lambda s: s.update({"enc.0.core.out.0.bias": torch.zeros(5)}), "enc.0.core.out.0.bias",
            id="wrong-shape",
        ),
    ],
)
def test_strict_loading_names_file_and_key(
    encoder: SpeechEncoder, encoder_state: dict, edit: Callable[[dict], object], fragment: str
) -> None:
    state = dict(encoder_state)
    edit(state)
    with pytest.raises(CheckpointError) as err:
        load_strict(copy.deepcopy(encoder), state, "ckpt/audiollm/final.pt")
    assert "ckpt/audiollm/final.pt" in str(err.value) and fragment in str(err.value)


def _set(path: str, value: object) -> Callable[[dict], None]:
    def edit(cfg: dict) -> None:
        *parents, leaf = path.split("/")
        node = cfg
        for key in parents:
            node = node[key]
        node[leaf] = value

    return edit


_T = "encoder_conf/para_conf/transformer/"


@pytest.mark.parametrize(
    "edit, fragment",
    [
        pytest.param(_set("encoder_conf/overview_conf/encoder-layer-config", "conformer"),
                     "encoder-layer-config", id="layer-config"),
        pytest.param(_set(_T + "transformer-pos-enc-class", "abs-enc"), "pos-enc-class", id="abs-pos"),
        pytest.param(_set(_T + "transformer-normalize-before", False), "normalize-before", id="post-ln"),
        pytest.param(_set(_T + "transformer-concat-after", True), "concat-after", id="concat-after"),
        pytest.param(_set(_T + "transformer-positionwise-layer-type", "conv1d"), "positionwise",
                     id="conv-ffn"),
        pytest.param(_set("encoder_conf/para_conf/subsampling/subsampling-rate", 6), "subsampling-rate",
                     id="rate"),
        pytest.param(_set(_T + "transformer-attention-dim", 48), "widths", id="width-mismatch"),
        pytest.param(_set(_T + "transformer-attention-heads", 5), "divisible", id="heads"),
        pytest.param(_set(_T + "transformer-chunk_size", 8), "chunk_size", id="chunk-size"),
        pytest.param(_set("input_dim", 40), "input_dim", id="input-dim"),
        pytest.param(lambda c: c["encoder_conf"]["para_conf"].pop("transformer"), "missing key",
                     id="missing"),
    ],
)
def test_unsupported_config_raises(train_cfg: dict, edit: Callable[[dict], object], fragment: str) -> None:
    cfg = copy.deepcopy(train_cfg)
    edit(cfg)
    with pytest.raises(ModelLoadError, match=fragment) as err:
        EncoderDims.from_train_yaml(cfg, "ckpt/train.yaml")
    assert "ckpt/train.yaml" in str(err.value)
