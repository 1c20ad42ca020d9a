"""Codec and streaming-window parity with the official recording, plus config/loading checks."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantized_models.codec import CodecDecoder, CodecDims, load_codec
from quantized_models.codec_stream import (
    CodecStreamConfig,
    CodecStreamState,
    find_min_sum_index,
    flush,
    push_token,
)
from quantized_models.errors import CheckpointError, ModelLoadError
from tests.conftest import FIXTURE_INPUTS, load_json

PCM_ATOL = 1e-5  # README tolerance for PCM
ANSWER_ATOL = 1e-4


@dataclasses.dataclass
class SegmentRun:
    expected: dict
    tensors: dict[str, torch.Tensor]
    state: CodecStreamState
    pieces: list[torch.Tensor]


@pytest.fixture(scope="module")
def codec(tiny_dir: Path) -> CodecDecoder:
    ckpt = tiny_dir / "checkpoints" / "codec"
    return load_codec(ckpt / "final.pt", CodecDims.from_model_json(ckpt / "model.json"))


@pytest.fixture(scope="module")
def runs(tiny_dir: Path, codec: CodecDecoder) -> dict[str, list[SegmentRun]]:
    """Stream every recorded segment's codec ids once (offline settings: chunk 40, threshold 0.01)."""
    torch.set_num_threads(1)
    out: dict[str, list[SegmentRun]] = {}
    for name in FIXTURE_INPUTS:
        out[name] = []
        for seg in load_json(tiny_dir / "expected" / name / "segments.json")["segments"]:
            assert (seg["codec_chunk_size"], seg["codec_padding_size"]) == (40, 10)
            tensors = load_file(tiny_dir / "expected" / name / f"segment{seg['segment']:02d}.safetensors")
            config = CodecStreamConfig(codec.samples_per_token, keep_records=True)
            state = CodecStreamState(config)
            pieces = [p for t in seg["codec_ids"] for p in push_token(state, t, codec)]
            pieces += flush(state, codec)
            out[name].append(SegmentRun(seg, tensors, state, pieces))
    return out


def test_dims_from_model_json(tiny_dir: Path) -> None:
    dims = CodecDims.from_model_json(tiny_dir / "checkpoints" / "codec" / "model.json")
    assert dims.samples_per_token == 600 and dims.global_stage == 1
    assert dims.stage_channels() == [256, 128, 64, 32] and dims.global_embed_dim == 16


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_windows_match_recording(runs: dict[str, list[SegmentRun]], name: str) -> None:
    for run in runs[name]:
        got = [(w.token_start, w.tokens) for w in run.state.windows]
        assert got == [(w["token_start"], w["tokens"]) for w in run.expected["windows"]]
        for i, window in enumerate(run.state.windows):
            torch.testing.assert_close(window.pcm, run.tensors[f"window{i:02d}_pcm"], atol=PCM_ATOL, rtol=0)


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_emission_and_pieces_match_recording(runs: dict[str, list[SegmentRun]], name: str) -> None:
    for run in runs[name]:
        records = [
            {k: v for k, v in dataclasses.asdict(r).items() if v is not None} for r in run.state.emissions
        ]
        assert records == run.expected["find_min_sum_index"], f"segment {run.expected['segment']}"
        assert [p.numel() for p in run.pieces] == run.expected["piece_lens"]
        for i, piece in enumerate(run.pieces):
            torch.testing.assert_close(piece, run.tensors[f"piece{i:02d}_pcm"], atol=PCM_ATOL, rtol=0)


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_answer_matches_recording(tiny_dir: Path, runs: dict[str, list[SegmentRun]], name: str) -> None:
    answer = torch.cat([p for run in runs[name] for p in run.pieces])
    expected = load_file(tiny_dir / "expected" / name / "answer.safetensors")["answer_pcm_24k"]
    torch.testing.assert_close(answer, expected, atol=ANSWER_ATOL, rtol=0)


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_stream_is_lossless(runs: dict[str, list[SegmentRun]], name: str, codec: CodecDecoder) -> None:
    for run in runs[name]:
        kept = torch.cat([w.pcm[w.kept[0] : w.kept[1]] for w in run.state.windows])
        assert kept.numel() == codec.samples_per_token * len(run.expected["codec_ids"])
        assert torch.equal(torch.cat(run.pieces), kept)


def test_find_min_sum_index_double_offset_quirk() -> None:
    """Quietest window starts at m = 1000 after the search start: the cut search runs m further."""
    n, length, search_from = 2401, 24000, 24000 // 2 - 2401 // 2
    quiet_start = search_from + 1000
    syn = torch.full((length,), 0.5)
    syn[quiet_start : quiet_start + n] = 1e-3
    syn[quiet_start + n + 600] = 0.0  # beyond a plain [s, s + N) range, inside the official one
    held, piece, record = find_min_sum_index(torch.ones(7), syn, n, threshold=0.01)
    assert record.emitted and record.cut_index == quiet_start + n + 600
    assert piece.numel() == 7 + record.cut_index and held.numel() == length - record.cut_index
    held, piece, record = find_min_sum_index(None, syn, n, threshold=1e-4)  # too loud: hold all
    assert piece is None and not record.emitted and held.numel() == length


def test_server_first_chunk_windows(codec: CodecDecoder) -> None:
    """Chunk 20 (server's first segment): windows at 30 then every 20 tokens, still lossless."""
    config = CodecStreamConfig(codec.samples_per_token, chunk_tokens=20, threshold=0.1, keep_records=True)
    state = CodecStreamState(config)
    ids = [(7 * i) % 64 for i in range(75)]
    pieces = [p for t in ids for p in push_token(state, t, codec)] + flush(state, codec)
    assert [(w.token_start, len(w.tokens)) for w in state.windows] == [(0, 30), (10, 40), (30, 40), (50, 25)]
    assert sum(p.numel() for p in pieces) == 75 * codec.samples_per_token
    state.reset()
    assert state.tokens == [] and state.held is None and state.windows == []


def _tiny_config(tmp_path: Path, **overrides: object) -> Path:
    cfg = {
        "resblock": "1",
        "upsample_rates": [4, 5, 5, 6],
        "upsample_kernel_sizes": [8, 11, 11, 12],
        "upsample_initial_channel": 256,  # 128 channels after stage 0, not stage 1
        "resblock_kernel_sizes": [3, 5],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 2, 4]],
        "n_codes": 10,
        "global_code_num": 4,
        "global_tokens": [1, 2, 3, 9],
        "sampling_rate": 24000,
    }
    cfg.update(overrides)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(cfg))
    return path


def _released_layout(dims: CodecDims) -> dict[str, dict[str, torch.Tensor]]:
    """Random weights stored like the released codec: weight-norm pairs for every conv."""
    torch.manual_seed(1)
    model = CodecDecoder(dims)
    generator = {}
    for key, value in model.generator.state_dict().items():
        if key.endswith(".weight"):
            generator[key + "_v"] = torch.randn_like(value)
            generator[key + "_g"] = torch.rand(value.shape[0], *([1] * (value.dim() - 1))) + 0.5
        else:
            generator[key] = torch.randn_like(value) * 0.1
    quantizer = {k: torch.randn_like(v) for k, v in model.quantizer.state_dict().items()}
    return {"generator": generator, "quantizer": quantizer, "encoder": {"conv_pre.weight": torch.zeros(1)}}


def test_dims_are_read_from_model_json(tmp_path: Path) -> None:
    dims = CodecDims.from_model_json(_tiny_config(tmp_path))
    assert dims.samples_per_token == 600 and dims.global_stage == 0
    ckpt = _released_layout(dims)
    torch.save(ckpt, tmp_path / "final.pt")
    codec = load_codec(tmp_path / "final.pt", dims)
    assert len(codec.generator.resblocks) == 8
    pcm = codec.decode(torch.tensor([0, 4, 9, 1, 1]))
    assert pcm.shape == (5 * math.prod(dims.upsample_rates),) and pcm.abs().max() < 1
    v, g = ckpt["generator"]["ups.0.weight_v"], ckpt["generator"]["ups.0.weight_g"]  # [in, out, k]
    norm = v.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()  # per *input* channel
    torch.testing.assert_close(codec.generator.ups[0].weight, g * v / norm)
    with pytest.raises(ValueError, match="codec ids"):
        codec.decode(torch.tensor([10]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"resblock": "2"}, "resblock type"),
        (
            {"upsample_initial_channel": 1024, "upsample_rates": [4, 5], "upsample_kernel_sizes": [8, 11]},
            "no upsampling stage outputs 128",
        ),
        ({"upsample_kernel_sizes": [8, 10, 11, 12]}, "even difference"),
        ({"global_tokens": [1, 2, 3]}, "one id per global-code group"),
        ({"resblock_dilation_sizes": [[1, 3], [1, 2]]}, "needs 3 dilations"),
        ({"n_codes": "many"}, "cannot read"),
    ],
)
def test_bad_config_is_rejected(tmp_path: Path, overrides: dict, message: str) -> None:
    path = _tiny_config(tmp_path, **overrides)
    with pytest.raises(ModelLoadError, match=message) as err:
        CodecDims.from_model_json(path)
    assert str(path) in str(err.value)


def _edit(ckpt: dict, part: str, drop: str | None = None, add: dict | None = None) -> dict:
    edited = {k: dict(v) for k, v in ckpt.items()}
    if drop:
        del edited[part][drop]
    edited[part].update(add or {})
    return edited


def test_strict_loading_names_file_and_key(tmp_path: Path) -> None:
    dims = CodecDims.from_model_json(_tiny_config(tmp_path))
    ckpt = _released_layout(dims)
    cases = [
        (_edit(ckpt, "generator", drop="ups.2.weight_g"), "ups.2.weight_v"),
        (_edit(ckpt, "generator", drop="resblocks.5.convs2.1.bias"), "resblocks.5.convs2.1.bias"),
        (_edit(ckpt, "quantizer", add={"quantizer_modules.1.embedding.weight": torch.zeros(2)}),
         "quantizer_modules.1.embedding.weight"),
        (_edit(ckpt, "generator", add={"conv_post.weight_v": torch.zeros(1, 32, 7)}), "conv_post.weight"),
        (_edit(ckpt, "quantizer", add={"quantizer_modules_globaltokens.0.embedding.weight":
                                       torch.zeros(10, 8)}), "quantizer_modules_globaltokens.0"),
        ({"generator": ckpt["generator"]}, "quantizer"),
    ]
    for i, (variant, key) in enumerate(cases):
        path = tmp_path / f"bad{i}.pt"
        torch.save(variant, path)
        with pytest.raises(CheckpointError) as err:
            load_codec(path, dims)
        assert str(path) in str(err.value) and key in str(err.value), str(err.value)

