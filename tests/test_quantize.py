"""Quantized frozen LLM (bitsandbytes int8 / nf4): options, failures, and the tiny fixture on CPU."""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import soundfile
import torch
from torch import nn

from assistant.engine import Engine, EngineOptions
from assistant.respond import split_chunks
from quantized_models.errors import ModelLoadError
from quantized_models.model_dir import load_models
from quantized_models.quantize import (
    QuantizationMode,
    check_frozen,
    check_quantized_llm,
    llm_load_kwargs,
    memory_report,
)
from tests.conftest import load_json

CPU = torch.device("cpu")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules
        return False


HAS_BNB = _installed("bitsandbytes") and _installed("accelerate")
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes/accelerate not installed")
RECORDED_LABELS = {"cl": "continue", "ss": "respond", "el": "ignore"}
# Measured on `question` (13 chunks) on CPU with bitsandbytes 0.50.2, against the recorded float32
# run: int8 13/13 decisions, mean |Δp| 0.017; nf4 9/13, mean |Δp| 0.104. The tiny LLM is 64 wide,
# so NF4 noise is large, and 9/13 is also what an LLM with 30 % weight noise gets (mean |Δp|
# 0.21; random layers: 3/13, 0.40): the |Δp| bound is the part that catches a bad load.
MIN_AGREEING_CHUNKS = {QuantizationMode.INT8: 12, QuantizationMode.NF4: 7}
MAX_MEAN_ABS_DP = {QuantizationMode.INT8: 0.03, QuantizationMode.NF4: 0.15}


def test_parse_accepts_spellings_and_lists_choices():
    assert QuantizationMode.parse("int8") is QuantizationMode.INT8
    assert QuantizationMode.parse(" NF4 ") is QuantizationMode.NF4
    assert QuantizationMode.parse(QuantizationMode.NONE) is QuantizationMode.NONE
    with pytest.raises(ValueError, match="choose one of: none, int8, nf4"):
        QuantizationMode.parse("int4")


def test_full_precision_needs_no_extra_kwargs():
    assert llm_load_kwargs(QuantizationMode.NONE, torch.float32, CPU) == {}


@needs_bnb
def test_int8_kwargs():
    kwargs = llm_load_kwargs(QuantizationMode.INT8, torch.float32, CPU)
    config = kwargs["quantization_config"]
    assert config.load_in_8bit and not config.load_in_4bit
    assert kwargs["device_map"] == {"": CPU}


@needs_bnb
def test_nf4_kwargs_use_the_run_dtype_for_compute():
    kwargs = llm_load_kwargs("nf4", torch.bfloat16, CPU)
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert kwargs["device_map"] == {"": CPU}


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("missing", ["bitsandbytes", "accelerate"])
def test_missing_package_fails_in_one_line_with_the_install_command(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` raise ImportError
    with pytest.raises(ModelLoadError) as excinfo:
        llm_load_kwargs(QuantizationMode.INT8, torch.float32, CPU)
    message = _one_line_error(excinfo)
    assert f"{missing} is missing" in message
    assert "pip install 'freeze-omni-assistant[quantization]'" in message


def _fake_bitsandbytes(monkeypatch, version: str, devices: set[str]) -> None:
    fake = types.ModuleType("bitsandbytes")
    fake.__version__ = version
    fake.supported_torch_devices = devices
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setitem(sys.modules, "accelerate", types.ModuleType("accelerate"))


def test_old_bitsandbytes_is_refused(monkeypatch):
    _fake_bitsandbytes(monkeypatch, "0.45.5", {"cpu", "cuda"})
    with pytest.raises(ModelLoadError) as excinfo:
        llm_load_kwargs(QuantizationMode.NF4, torch.float32, CPU)
    assert "needs bitsandbytes>=0.46.1, found 0.45.5" in _one_line_error(excinfo)


def test_bitsandbytes_without_a_backend_for_the_device_is_refused(monkeypatch):
    _fake_bitsandbytes(monkeypatch, "0.50.2", {"cuda"})
    with pytest.raises(ModelLoadError) as excinfo:
        llm_load_kwargs(QuantizationMode.INT8, torch.float32, CPU)
    assert "no backend for cpu devices" in _one_line_error(excinfo)


def test_failure_comes_before_any_weight_is_read(monkeypatch, tiny_dir):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    read = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: read.append(a) or pytest.fail("weights were read"))
    with pytest.raises(ModelLoadError) as excinfo:
        load_models(tiny_dir / "checkpoints", tiny_dir / "llm", CPU, torch.float32, quantization="int8")
    assert "bitsandbytes is missing" in _one_line_error(excinfo) and read == []


def test_memory_report_names_host_memory():
    report = memory_report(CPU)
    rss, peak = (float(x) for x in report.split("host RSS ")[1].replace("(peak", "").split(" MiB")[:2])
    assert 0 < rss <= peak and "GPU" not in report


def test_check_frozen_refuses_trainable_parameters():
    layer = nn.Linear(4, 4)
    with pytest.raises(RuntimeError, match="2 trainable parameters"):
        check_frozen(layer)
    check_frozen(layer.requires_grad_(False))


@pytest.fixture(scope="module", params=[QuantizationMode.INT8, QuantizationMode.NF4], ids=lambda m: m.value)
def quantized(request, tiny_dir):
    """(mode, models) for a quantized load of the tiny fixture; without bitsandbytes the load
    must fail in one line (checked), and the tests using this fixture are skipped."""
    if not HAS_BNB:
        with pytest.raises(ModelLoadError) as excinfo:
            load_models(tiny_dir / "checkpoints", tiny_dir / "llm", CPU, torch.float32,
                        quantization=request.param.value)
        assert "pip install 'freeze-omni-assistant[quantization]'" in _one_line_error(excinfo)
        pytest.skip("bitsandbytes/accelerate not installed (the load failed in one line, as it should)")
    torch.manual_seed(0)
    models = load_models(tiny_dir / "checkpoints", tiny_dir / "llm", CPU, torch.float32,
                         quantization=request.param.value)
    return request.param, models


def test_only_the_llm_linears_are_quantized(quantized):
    mode, models = quantized
    llm = models.llm.causal_lm
    check_quantized_llm(llm, mode)  # frozen, has bitsandbytes layers, float embeddings and head
    assert all(not p.requires_grad for p in llm.parameters())
    linear = llm.model.layers[0].self_attn.q_proj.weight
    assert linear.dtype == (torch.int8 if mode is QuantizationMode.INT8 else torch.uint8)
    assert llm.get_input_embeddings().weight.dtype == torch.float32
    for module in (models.llm.heads, models.encoder, models.adapter, models.decoder, models.codec):
        assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_embeddings_and_lm_head_stay_exact(quantized, tiny_dir):
    """bitsandbytes leaves the (tied) embedding table alone: rows and logits are the float32 ones."""
    from safetensors.torch import load_file

    _, models = quantized
    llm = models.llm
    table = load_file(tiny_dir / "llm/model.safetensors")["model.embed_tokens.weight"].float()  # (V, 64)
    ids = load_json(tiny_dir / "expected/question/generation.json")["generated_ids"][:3]
    embeds = llm.embed_tokens(ids, llm.heads.prompt_embeddings.weight)  # (3, 64)
    assert torch.equal(embeds, table[ids])
    logits = llm.causal_lm.get_output_embeddings()(embeds[-1:])[0]  # (V,)
    torch.testing.assert_close(logits, table @ embeds[-1], rtol=1e-5, atol=1e-5)


def test_question_decisions_agree_with_the_recording(quantized, tiny_dir):
    mode, models = quantized
    engine = Engine(models, EngineOptions())
    state = engine.prefill_system(engine.new_session(seed=0))
    samples, _ = soundfile.read(tiny_dir / "inputs/question.wav", dtype="float32")
    expected = load_json(tiny_dir / "expected/question/chunks.json")["chunks"]
    agree, abs_dp = 0, []
    for chunk, want in zip(split_chunks(samples), expected, strict=True):
        result, state = engine.listen_chunk(state, chunk, follow_decision=False)
        agree += result.decision.value == RECORDED_LABELS[want["decision"]]
        abs_dp += [abs(p - q) for p, q in zip(result.probs, (want["p0"], want["p1"], want["p2"]))]
    mean_abs_dp = sum(abs_dp) / len(abs_dp)
    assert agree >= MIN_AGREEING_CHUNKS[mode], f"{mode.value}: {agree}/13 decisions agree"
    assert mean_abs_dp <= MAX_MEAN_ABS_DP[mode], f"{mode.value}: mean |Δp| {mean_abs_dp:.3f}"
