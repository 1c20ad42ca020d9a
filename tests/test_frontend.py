"""Front end: Kaldi fbank chunker and JSON CMVN against the official tiny recording."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from safetensors.torch import load_file
from torch.testing import assert_close

from quantized_models.errors import ModelLoadError
from quantized_models.frontend import (
    CARRY_SAMPLES,
    CHUNK_FEATURE_ROWS,
    CHUNK_NEW_FRAMES,
    CHUNK_OVERLAP_FRAMES,
    CHUNK_SAMPLES,
    INT16_SCALE,
    Cmvn,
    FrontendCache,
    frontend_step,
    kaldi_fbank,
    load_json_cmvn,
    n_mels_from_train_yaml,
)
from tests.conftest import FIXTURE_INPUTS

FBANK_ATOL = 2e-3  # README tolerance: float32 fbank noise is ~5e-4 on values around 10


def read_padded_wav(path: Path) -> torch.Tensor:
    """[N * CHUNK_SAMPLES] float32 samples in +-1, zero-padded at the end like the official driver."""
    audio, _ = sf.read(path, dtype="float64")
    padded = np.zeros(-(-len(audio) // CHUNK_SAMPLES) * CHUNK_SAMPLES, dtype=np.float32)
    padded[: len(audio)] = audio
    return torch.from_numpy(padded)


def run_frontend(samples: torch.Tensor, n_mels: int) -> torch.Tensor:
    """[N * CHUNK_SAMPLES] -> [N, 19, n_mels] through the streaming chunker."""
    cache = FrontendCache.zeros(n_mels)
    chunks = []
    for block in samples.split(CHUNK_SAMPLES):
        chunk, cache = frontend_step(block, cache)
        chunks.append(chunk)
    return torch.cat(chunks)


@pytest.fixture(scope="module")
def n_mels(tiny_dir: Path) -> int:
    cfg = yaml.safe_load((tiny_dir / "checkpoints/audiollm/train.yaml").read_text())
    return n_mels_from_train_yaml(cfg)


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_fbank_chunks_match_fixture(tiny_dir: Path, n_mels: int, name: str) -> None:
    samples = read_padded_wav(tiny_dir / "inputs" / f"{name}.wav")
    expected = load_file(tiny_dir / "expected" / name / "frontend.safetensors")["fbank_chunks"]
    got = run_frontend(samples, n_mels)
    assert got.shape == expected.shape
    assert_close(got, expected, atol=FBANK_ATOL, rtol=0)


def test_first_chunk_starts_with_zero_rows(tiny_dir: Path, n_mels: int) -> None:
    samples = read_padded_wav(tiny_dir / "inputs" / "question.wav")
    chunk, _ = frontend_step(samples[:CHUNK_SAMPLES], FrontendCache.zeros(n_mels))
    assert chunk.shape == (1, CHUNK_FEATURE_ROWS, n_mels)
    assert torch.all(chunk[0, :CHUNK_OVERLAP_FRAMES] == 0)
    assert torch.all(chunk[0, CHUNK_OVERLAP_FRAMES:] != 0)


def test_chunks_tile_one_long_fbank() -> None:
    """Chunked fbank == fbank of the whole signal with the 240 carried zeros in front."""
    torch.manual_seed(1)
    n_mels, n_chunks = 23, 5
    samples = torch.rand(n_chunks * CHUNK_SAMPLES) * 1.6 - 0.8
    chunks = run_frontend(samples, n_mels)
    whole = torch.cat([torch.zeros(CARRY_SAMPLES), samples * INT16_SCALE])
    rows = kaldi_fbank(whole, n_mels)  # [N * 16, M]
    assert rows.shape == (n_chunks * CHUNK_NEW_FRAMES, n_mels)
    assert_close(chunks[:, CHUNK_OVERLAP_FRAMES:].reshape(-1, n_mels), rows)
    assert_close(chunks[1:, :CHUNK_OVERLAP_FRAMES], chunks[:-1, -CHUNK_OVERLAP_FRAMES:])


def test_silence_hits_the_float32_epsilon_floor() -> None:
    rows = kaldi_fbank(torch.zeros(CARRY_SAMPLES + CHUNK_SAMPLES), 10)
    assert_close(rows, torch.full_like(rows, float(np.log(np.finfo(np.float32).eps))))


def test_cache_is_bounded_and_resets() -> None:
    cache = FrontendCache.zeros(8)
    for _ in range(20):
        _, cache = frontend_step(torch.rand(CHUNK_SAMPLES) - 0.5, cache)
    assert cache.samples.shape == (CARRY_SAMPLES,)
    assert cache.feature_rows.shape == (CHUNK_OVERLAP_FRAMES, 8)
    cache.reset()
    assert not cache.samples.any() and not cache.feature_rows.any()


def test_frontend_step_rejects_wrong_block_size() -> None:
    with pytest.raises(ValueError, match=str(CHUNK_SAMPLES)):
        frontend_step(torch.zeros(CHUNK_SAMPLES - 1), FrontendCache.zeros(8))


def test_json_cmvn_matches_fixture(tiny_dir: Path) -> None:
    mean, istd = load_json_cmvn(tiny_dir / "checkpoints/audiollm/global_cmvn")
    expected = load_file(tiny_dir / "expected/cmvn.safetensors")
    assert mean.dtype == istd.dtype == torch.float32
    assert_close(mean, expected["mean"])
    assert_close(istd, expected["istd"])


def test_cmvn_module_normalises_last_axis() -> None:
    mean, istd = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 2.0, 4.0])
    cmvn = Cmvn.from_stats(mean, istd)
    x = torch.randn(2, 7, 3)
    assert_close(cmvn(x), (x - mean) * istd)
    assert set(cmvn.state_dict()) == {"mean", "istd"}


def test_json_cmvn_clamps_variance(tmp_path: Path) -> None:
    path = tmp_path / "cmvn.json"
    path.write_text(json.dumps({"mean_stat": [2.0, 4.0], "var_stat": [4.0, 16.0], "frame_num": 2}))
    mean, istd = load_json_cmvn(path)
    assert_close(mean, torch.tensor([1.0, 2.0]))
    assert_close(istd, torch.tensor([1.0, 1.0 / 2.0]))
    path.write_text(json.dumps({"mean_stat": [2.0], "var_stat": [2.0], "frame_num": 1}))
    assert load_json_cmvn(path)[1][0] == pytest.approx(1e10, rel=1e-6)  # var 0 -> 1e-20


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(None, id="missing"),
        pytest.param("{not json", id="corrupt"),
        pytest.param('{"mean_stat": [1.0], "var_stat": [1.0]}', id="no-frame-num"),
        pytest.param('{"mean_stat": [1.0, 2.0], "var_stat": [1.0], "frame_num": 3}', id="lengths"),
        pytest.param('{"mean_stat": [1.0], "var_stat": [1.0], "frame_num": 0}', id="zero-frames"),
    ],
)
def test_bad_cmvn_file_raises_model_load_error(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "global_cmvn"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ModelLoadError, match="global_cmvn"):
        load_json_cmvn(path)


def test_n_mels_comes_from_train_yaml() -> None:
    assert n_mels_from_train_yaml({"input_dim": 40}) == 40
    with pytest.raises(ModelLoadError, match="input_dim"):
        n_mels_from_train_yaml({"input_dim": "80"}, "x/train.yaml")
