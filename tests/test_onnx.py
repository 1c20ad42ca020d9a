"""ONNX export and the onnxruntime step backends against the torch modules and the recording.

Both model geometries are covered: the official tiny fixture (single-conv adapter, decoder
with a hidden-state prefix) and the random model of `test_other_dimensions` (two-conv
BatchNorm adapter, other decoder and codec shapes).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")

from assistant.engine import Engine, EngineOptions  # noqa: E402
from assistant.respond import TurnEnd, run_turn  # noqa: E402
from quantized_models.adapter import AdapterCache  # noqa: E402
from quantized_models.encoder import EncoderCache  # noqa: E402
from quantized_models.errors import ModelLoadError  # noqa: E402
from quantized_models.model_dir import FreezeOmniModels, load_models  # noqa: E402
from quantized_models.onnx_export import DEFAULT_OPSET, export_onnx, read_metadata  # noqa: E402
from quantized_models.onnx_graphs import component_dims  # noqa: E402
from quantized_models.onnx_runtime import load_onnx_backends  # noqa: E402
from quantized_models.sampling import TextSamplingConfig  # noqa: E402
from quantized_models.speech_decoder import DecoderCache  # noqa: E402
from tests.conftest import FIXTURE_INPUTS, load_json  # noqa: E402
from tests.test_cli import DECISION_NAMES, PCM_TOLERANCE_LSB  # noqa: E402
from tests.test_other_dimensions import other_model  # noqa: E402,F401  (fixture)

RELATIVE_TOLERANCE = 1e-4  # × max |x| of the torch result
PCM_TOLERANCE = 1e-5
LISTEN_CHUNKS = 40  # > 17: covers the 4-frame positional lag of spec §2.3
AR_STEPS = 60
EXPECTED_FILES = {"speech_input.onnx", "decoder_prefill.onnx", "decoder_prefill_no_prefix.onnx",
                  "decoder_step.onnx", "codec_window.onnx"}


@dataclasses.dataclass
class Exported:
    models: FreezeOmniModels
    onnx_dir: Path
    model_dir: Path
    paths: list[Path]


def _export(models: FreezeOmniModels, model_dir: Path, out: Path) -> Exported:
    return Exported(models, out, model_dir, export_onnx(models, out, model_dir=model_dir))


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory) -> Exported:
    models = load_models(tiny_dir / "checkpoints", tiny_dir / "llm", torch.device("cpu"), torch.float32)
    return _export(models, tiny_dir / "checkpoints", tmp_path_factory.mktemp("onnx_tiny"))


@pytest.fixture(scope="module")
def two_conv(other_model, tmp_path_factory) -> Exported:  # noqa: F811
    models = load_models(other_model.model_dir, other_model.llm_dir, torch.device("cpu"), torch.float32)
    return _export(models, other_model.model_dir, tmp_path_factory.mktemp("onnx_two_conv"))


@pytest.fixture(params=["tiny", "two_conv"])
def exported(request) -> Exported:
    return request.getfixturevalue(request.param)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    scale = float(expected.abs().max())
    error = float((actual.float() - expected.float()).abs().max())
    assert error <= RELATIVE_TOLERANCE * scale, f"{what}: max error {error:.3g}, max |x| {scale:.3g}"


def test_export_writes_checked_files_with_metadata(tiny):
    assert {p.name for p in tiny.paths} == EXPECTED_FILES
    sha = {name: hashlib.sha256((tiny.model_dir / name).read_bytes()).hexdigest()
           for name in ("audiollm/final.pt", "decoder/final.pt", "codec/final.pt")}
    for path in tiny.paths:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [DEFAULT_OPSET]
        meta = read_metadata(path)
        component = meta["component"]
        assert meta["opset"] == str(DEFAULT_OPSET) and meta["format_version"] == "1"
        assert json.loads(meta["dims"]) == component_dims(tiny.models, component)
        checkpoint = {"speech_input": "audiollm/final.pt", "decoder": "decoder/final.pt",
                      "codec": "codec/final.pt"}[component]
        assert json.loads(meta["source_sha256"])[checkpoint] == sha[checkpoint]
        assert torch.__version__ in meta["exporter"] and len(json.loads(meta["weights_probe"])) > 4
    si = read_metadata(tiny.onnx_dir / "speech_input.onnx")
    assert json.loads(si["dims"])["SpeechEncoder"]["num_blocks"] == tiny.models.encoder.dims.num_blocks


def _random_fbank(gen: torch.Generator, n_mels: int) -> torch.Tensor:
    return 4.0 * torch.randn(1, 19, n_mels, generator=gen) + 8.0  # log-mel-like level and spread


def _compare_speech_caches(enc_onnx, enc_torch, ad_onnx, ad_torch, what: str) -> None:
    assert enc_onnx.pe_index == enc_torch.pe_index
    for i, (k, v) in enumerate(zip(enc_torch.keys, enc_torch.values)):
        _assert_close(enc_onnx.keys[i], k, f"{what} key {i}")
        _assert_close(enc_onnx.values[i], v, f"{what} value {i}")
    for name in ("before_conv1", "before_conv2"):
        expected = getattr(ad_torch, name)
        if expected is None:
            assert getattr(ad_onnx, name) is None
        else:
            _assert_close(getattr(ad_onnx, name), expected, f"{what} adapter {name}")


def _speech_steps(models, backend, fbanks, caches) -> list[torch.Tensor]:
    torch_enc, torch_ad, onnx_enc, onnx_ad = caches
    out = []
    for n, fbank in enumerate(fbanks):
        expected, torch_enc, torch_ad = models.backends.speech_input.step(fbank, torch_enc, torch_ad)
        vectors, onnx_enc, onnx_ad = backend.step(fbank, onnx_enc, onnx_ad)
        _assert_close(vectors, expected, f"vectors of chunk {n}")
        _compare_speech_caches(onnx_enc, torch_enc, onnx_ad, torch_ad, f"chunk {n}")
        out.append(vectors)
    return out


def test_speech_input_matches_torch_chunk_by_chunk(exported):
    models = exported.models
    backend = load_onnx_backends(models, exported.onnx_dir, {"speech_input"}, threads=1).speech_input
    gen = torch.Generator().manual_seed(11)
    fbanks = [_random_fbank(gen, models.n_mels) for _ in range(LISTEN_CHUNKS)]
    caches = (EncoderCache(), AdapterCache(), EncoderCache(), AdapterCache())
    vectors = _speech_steps(models, backend, fbanks, caches)
    assert caches[2].pe_index == LISTEN_CHUNKS * models.encoder.dims.chunk_frames
    assert caches[2].cached_frames == models.encoder.dims.cache_frames
    assert len(vectors) == LISTEN_CHUNKS and vectors[0].shape == (1, 2, models.adapter.dims.llm_embed_dim)


def test_speech_input_across_the_pe_index_wrap(tiny):
    models, dims = tiny.models, tiny.models.encoder.dims
    backend = load_onnx_backends(models, tiny.onnx_dir, {"speech_input"}, threads=1).speech_input
    gen = torch.Generator().manual_seed(12)
    caches = (EncoderCache(), AdapterCache(), EncoderCache(), AdapterCache())
    _speech_steps(models, backend, [_random_fbank(gen, models.n_mels) for _ in range(20)], caches)
    for cache in (caches[0], caches[2]):  # jump to 2 chunks before the wrap, full caches kept
        cache.pe_index = 3 * dims.pe_wrap - 2 * dims.chunk_frames
    _speech_steps(models, backend, [_random_fbank(gen, models.n_mels) for _ in range(4)], caches)
    assert caches[2].pe_index % dims.pe_wrap == 2 * dims.chunk_frames


@pytest.mark.parametrize("with_prefix", [True, False], ids=["prefix", "no_prefix"])
def test_decoder_prefill_and_ar_steps_match_torch(exported, with_prefix):
    models = exported.models
    dims, idim = models.decoder.dims, models.decoder.dims.idim
    backend = load_onnx_backends(models, exported.onnx_dir, {"decoder"}, threads=1).decoder
    gen = torch.Generator().manual_seed(13)
    hidden, prefix = torch.randn(4 * 5, idim, generator=gen), torch.randn(4 * 3, idim, generator=gen)
    prefix_rows = prefix if with_prefix else None
    expected = models.decoder.prefill(hidden, prefix_rows, DecoderCache(max_new_tokens=AR_STEPS))
    cache = backend.prefill(hidden, prefix_rows, DecoderCache(max_new_tokens=AR_STEPS))
    assert (cache.length, cache.prefix_len) == (expected.length, expected.prefix_len)
    assert cache.prefix_len == (prefix.shape[0] if with_prefix else 0)
    for i in range(dims.num_blocks):
        _assert_close(cache.keys[i], expected.keys[i], f"prefill key {i}")
        _assert_close(cache.values[i], expected.values[i], f"prefill value {i}")
    token = dims.sos_id
    for step in range(AR_STEPS):
        reference, expected = models.decoder.step(token, expected)
        logits, cache = backend.step(token, cache)
        _assert_close(logits, reference, f"logits of step {step}")
        token = int(torch.argmax(models.decoder.mask_non_codec(reference)[: dims.eos_id]))
    assert (cache.length, cache.generated) == (expected.length, AR_STEPS)
    with pytest.raises(RuntimeError, match="cache is full"):
        backend.step(token, cache)


def test_codec_window_matches_torch(exported):
    codec = exported.models.codec
    backend = load_onnx_backends(exported.models, exported.onnx_dir, {"codec"}, threads=1).codec
    gen = torch.Generator().manual_seed(14)
    assert backend.samples_per_token == codec.samples_per_token
    for length in (1, 13, 60):
        tokens = torch.randint(0, codec.dims.n_codes, (length,), generator=gen)
        pcm, expected = backend.decode(tokens), codec.decode(tokens)
        assert pcm.shape == (length * codec.samples_per_token,)
        assert float((pcm - expected).abs().max()) <= PCM_TOLERANCE
    assert backend.decode(torch.zeros(0, dtype=torch.int64)).shape == (0,)
    with pytest.raises(ValueError, match="codec ids"):
        backend.decode(torch.tensor([0, codec.dims.n_codes]))


def test_loading_refuses_wrong_or_missing_exports(tiny, two_conv, tmp_path):
    with pytest.raises(ModelLoadError, match="other model dimensions.*export-onnx"):
        load_onnx_backends(two_conv.models, tiny.onnx_dir, {"speech_input"})
    with pytest.raises(ModelLoadError, match="other model dimensions"):
        load_onnx_backends(two_conv.models, tiny.onnx_dir, {"codec"})
    retrained = copy.deepcopy(tiny.models.decoder)
    with torch.no_grad():
        retrained.out_fnn.weight.mul_(1.5)  # same shapes, other weights
    with pytest.raises(ModelLoadError, match="other weights"):
        load_onnx_backends(dataclasses.replace(tiny.models, decoder=retrained), tiny.onnx_dir, {"decoder"})

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "speech_input.onnx").write_bytes((tiny.onnx_dir / "speech_input.onnx").read_bytes())
    with pytest.raises(ModelLoadError, match="codec_window.onnx.*export-onnx .*--out"):
        load_onnx_backends(tiny.models, partial)
    backends = load_onnx_backends(tiny.models, partial, {"speech_input"})
    assert backends.names == {"speech_input": "onnx", "decoder": "torch", "codec": "torch"}
    assert backends.decoder is tiny.models.backends.decoder
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_onnx_backends(tiny.models, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown ONNX components"):
        load_onnx_backends(tiny.models, tiny.onnx_dir, {"llm"})


def test_missing_packages_give_install_hints(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ModelLoadError, match="pip install onnxruntime"):
        load_onnx_backends(tiny.models, tiny.onnx_dir)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(RuntimeError, match="pip install 'onnx"):
        export_onnx(tiny.models, tmp_path)


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_fixture_turn_on_onnx_reproduces_the_recording(tiny, tiny_dir, name):
    backends = load_onnx_backends(tiny.models, tiny.onnx_dir, threads=1)
    assert set(backends.names.values()) == {"onnx"}
    options = EngineOptions(
        text_sampling=TextSamplingConfig(temperature=1.0, top_k=1, top_p=0.0), speech_top_k=1,
        max_new_tokens=24, max_speech_tokens=120,
    )
    engine = Engine(dataclasses.replace(tiny.models, backends=backends), options)
    samples, rate = soundfile.read(tiny_dir / f"inputs/{name}.wav", dtype="float32")
    assert rate == 16000
    result = run_turn(engine, samples, TurnEnd.FILE, seed=0)

    chunks = load_json(tiny_dir / f"expected/{name}/chunks.json")["chunks"]
    segments = load_json(tiny_dir / f"expected/{name}/segments.json")["segments"]
    assert [c.decision.value for c in result.chunks] == [DECISION_NAMES[c["decision"]] for c in chunks]
    np.testing.assert_allclose([c.probs for c in result.chunks],
                               [[c["p0"], c["p1"], c["p2"]] for c in chunks], atol=1e-4, rtol=0)
    assert result.tokens == load_json(tiny_dir / f"expected/{name}/generation.json")["generated_ids"]
    assert [s["codec_tokens"] for s in result.segments] == [s["codec_ids"] for s in segments]
    expected = load_file(tiny_dir / f"expected/{name}/answer.safetensors")["answer_pcm_24k"].numpy()
    assert result.pcm.shape == expected.shape
    assert np.abs(result.pcm - expected).max() * 32768 <= PCM_TOLERANCE_LSB
