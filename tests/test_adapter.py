"""Adapter (`adpter.*`): fixture parity for the single-conv branch, properties for both branches."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from quantized_models.adapter import Adapter, AdapterCache, AdapterDims
from quantized_models.errors import CheckpointError, ModelLoadError
from quantized_models.strict_load import load_strict
from tests.conftest import FIXTURE_INPUTS, audiollm_part

PREFIX = "adpter."  # sic: the official checkpoint's spelling
FRAMES_PER_CHUNK = 4  # encoder frames per 160 ms chunk


@pytest.fixture(scope="module")
def adapter_state(tiny_dir: Path) -> dict[str, torch.Tensor]:
    return audiollm_part(tiny_dir, PREFIX)


@pytest.fixture(scope="module")
def adapter(tiny_dir: Path, train_cfg: dict, adapter_state: dict) -> Adapter:
    model = Adapter(AdapterDims.from_train_yaml(train_cfg))
    load_strict(model, adapter_state, tiny_dir / "checkpoints/audiollm/final.pt")
    return model.eval()


def two_conv_adapter(seed: int = 0) -> Adapter:
    """Random two-conv adapter (4 * 8 < 40) with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    dims = AdapterDims(enc_out_dim=8, llm_embed_dim=40, kernel_size=5, activation="gelu", norm="layer")
    model = Adapter(dims)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    return model.eval()


@torch.no_grad()
def run_stream(model: Adapter, frames: torch.Tensor) -> torch.Tensor:
    """[1, T, D] -> [1, T / 2, LLM] in chunks of FRAMES_PER_CHUNK frames."""
    cache, outs = AdapterCache(), []
    for chunk in frames.split(FRAMES_PER_CHUNK, dim=1):
        out, cache = model.step(chunk, cache)
        outs.append(out)
    return torch.cat(outs, dim=1)


def test_dims_from_fixture(train_cfg: dict) -> None:
    dims = AdapterDims.from_train_yaml(train_cfg)
    assert (dims.enc_out_dim, dims.llm_embed_dim, dims.kernel_size) == (32, 64, 5)
    assert not dims.two_convs and dims.cache_frames == 4


def test_state_dict_keys_equal_checkpoint(adapter: Adapter, adapter_state: dict) -> None:
    assert set(adapter.state_dict()) == set(adapter_state)


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_adapter_out_matches_fixture(tiny_dir: Path, adapter: Adapter, name: str) -> None:
    tensors = load_file(tiny_dir / "expected" / name / "encoder.safetensors")
    expected = tensors["adapter_out"]  # [N, 2, LLM]
    got = run_stream(adapter, tensors["encoder_out"].reshape(1, -1, 32))  # [1, 2N, LLM]
    got = got.reshape(expected.shape)  # [N, 2, LLM]
    assert_close(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize("branch", ["fixture", "two-conv"])
def test_streaming_equals_offline_and_is_causal(adapter: Adapter, branch: str) -> None:
    model = adapter if branch == "fixture" else two_conv_adapter()
    frames = torch.randn(1, 11 * FRAMES_PER_CHUNK, model.dims.enc_out_dim)
    with torch.no_grad():
        whole = model.forward_full(frames)
        assert whole.shape == (1, 22, model.dims.llm_embed_dim)
        assert_close(run_stream(model, frames), whole, atol=1e-5, rtol=1e-5)
        for n_chunks in (1, 4):
            prefix = model.forward_full(frames[:, : n_chunks * FRAMES_PER_CHUNK])
            assert_close(prefix, whole[:, : 2 * n_chunks], atol=1e-5, rtol=1e-5)


def test_first_chunk_is_zero_padded_and_cache_keeps_four_frames(adapter: Adapter) -> None:
    chunk = torch.randn(1, FRAMES_PER_CHUNK, 32)
    with torch.no_grad():
        out, cache = adapter.step(chunk, AdapterCache())
        zeros = AdapterCache(before_conv2=torch.zeros(1, 32, 4))
        assert_close(adapter.step(chunk, zeros)[0], out)
    assert cache.before_conv1 is None
    assert_close(cache.before_conv2, chunk.transpose(1, 2))  # the last 4 inputs = this chunk
    cache.reset()
    assert cache.before_conv2 is None


def test_two_conv_branch_keys_and_caches() -> None:
    model = two_conv_adapter()
    bn_keys = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    expected = (
        {f"conv1d{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
        | {f"bn{i}.{p}" for i in (1, 2) for p in bn_keys}
        | {"project.weight", "project.bias"}
    )
    assert set(model.state_dict()) == expected
    assert model.conv1d2.weight.shape == (32, 16, 5) and model.project.weight.shape == (40, 32)
    cache = AdapterCache()
    with torch.no_grad():
        for _ in range(30):
            out, cache = model.step(torch.randn(1, FRAMES_PER_CHUNK, 8), cache)
    assert out.shape == (1, 2, 40)
    assert cache.before_conv1 is not None and cache.before_conv1.shape == (1, 8, 4)
    assert cache.before_conv2 is not None and cache.before_conv2.shape == (1, 16, 4)


def test_two_conv_state_round_trips_through_strict_loading() -> None:
    source, target = two_conv_adapter(seed=1), Adapter(two_conv_adapter().dims).eval()
    load_strict(target, source.state_dict(), "random.pt")
    frames = torch.randn(1, 8, 8)
    with torch.no_grad():
        assert_close(target.forward_full(frames), source.forward_full(frames))


def test_odd_frame_count_is_rejected(adapter: Adapter) -> None:
    with pytest.raises(ValueError, match="even"):
        adapter.step(torch.zeros(1, 3, 32), AdapterCache())


@pytest.mark.parametrize(
    "edit, fragment",
    [
        pytest.param(lambda s: s.pop("bn2.weight"), "bn2.weight", id="missing"),
        pytest.param(lambda s: s.update({"bn1.weight": torch.ones(64)}), "bn1.weight", id="unexpected"),
        pytest.param(lambda s: s.update({"project.bias": torch.zeros(3)}), "project.bias", id="wrong-shape"),
    ],
)
def test_strict_loading_names_file_and_key(
    adapter_state: dict, train_cfg: dict, edit: Callable[[dict], object], fragment: str
) -> None:
    state = dict(adapter_state)
    edit(state)
    with pytest.raises(CheckpointError) as err:
        load_strict(Adapter(AdapterDims.from_train_yaml(train_cfg)), state, "ckpt/final.pt")
    assert "ckpt/final.pt" in str(err.value) and fragment in str(err.value)


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        pytest.param("adpter_type", "cnn", "adpter_type", id="type"),
        pytest.param("activation_func", "swish", "activation_func", id="activation"),
        pytest.param("norm", "batch", "norm", id="norm"),
        pytest.param("kernel_size", 0, "kernel_size", id="kernel"),
        pytest.param("enc_out_dim", None, "missing key", id="missing"),
    ],
)
def test_unsupported_config_raises(train_cfg: dict, key: str, value: object, fragment: str) -> None:
    cfg = copy.deepcopy(train_cfg)
    if value is None:
        del cfg["model_conf"][key]
    else:
        cfg["model_conf"][key] = value
    with pytest.raises(ModelLoadError, match=fragment) as err:
        AdapterDims.from_train_yaml(cfg, "ckpt/train.yaml")
    assert "ckpt/train.yaml" in str(err.value)


def test_two_conv_branch_ignores_norm_and_activation(train_cfg: dict) -> None:
    cfg = copy.deepcopy(train_cfg)
    cfg["model_conf"].update(enc_out_dim=8, llm_embed_dim=40, norm="batch", activation_func="swish")
    dims = AdapterDims.from_train_yaml(cfg)
    assert dims.two_convs
