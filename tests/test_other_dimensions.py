"""`freeze-omni respond` on a second model directory with other dimensions and options.

The directory is built here, in the released layout and key names, with random seeded weights:
an untied Qwen2 LLM of width 96, an encoder of width 16 (so 4 * 16 < 96 selects the adapter's
two-convolution BatchNorm branch, spec sections 3 and 14.1), a speech decoder of width 48
(2 rows per LLM vector, 1 pre-net layer), a codec with another factorisation of 600 samples
per token, other kernels and two ResBlock kernels, and no `server.json`. Nothing in the
library may assume the fixture's sizes, so every number here differs from it.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
import yaml

from assistant.cli import main
from quantized_models.adapter import Adapter, AdapterCache, AdapterDims
from quantized_models.codec import CodecDecoder, CodecDims
from quantized_models.encoder import EncoderDims, SpeechEncoder
from quantized_models.frontend import CHUNK_SAMPLES, load_json_cmvn
from quantized_models.llm import AudioLlmDims, AudioLlmHeads
from quantized_models.model_dir import load_models
from quantized_models.random_model import randomise, released_codec_state
from quantized_models.speech_decoder import DecoderDims, SpeechDecoder

SEED = 1234
LLM_WIDTH = 96
ENC_WIDTH = 16  # 4 * 16 = 64 < 96: the two-conv adapter branch
DECODER_IDIM = 48  # 96 / 48 = 2 decoder rows per LLM vector
CODEC_VOCAB = 40  # decoder odim == codec n_codes
UPSAMPLE_RATES = [5, 4, 6, 5]  # 600 samples per token, factorised differently from 8*5*5*3
UPSAMPLE_KERNELS = [11, 8, 12, 11]  # kernel - rate must be even for exact lengths
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
OUTPUT_RATE_HZ = 24_000
MAX_NEW_TOKENS = 10
MAX_SPEECH_TOKENS = 60  # > 40 + 10: the windowed codec path runs, not only the final flush
BASE_ARGS = [
    "--text-top-k", "1", "--speech-top-k", "1", "--max-new-tokens", str(MAX_NEW_TOKENS),
    "--max-speech-tokens", str(MAX_SPEECH_TOKENS), "--device", "cpu", "--dtype", "float32",
]


@dataclass(frozen=True)
class OtherModel:
    model_dir: Path
    llm_dir: Path
    audiollm_state: dict[str, torch.Tensor]
    codec_state: dict[str, dict[str, torch.Tensor]]



def _write_llm(llm_dir: Path, tiny_dir: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(SEED)
    config = Qwen2Config(
        vocab_size=151646, hidden_size=LLM_WIDTH, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
    )
    Qwen2ForCausalLM(config).save_pretrained(llm_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_dir / "llm" / name, llm_dir / name)


def _train_yaml(tiny_dir: Path) -> dict:
    cfg = yaml.safe_load((tiny_dir / "checkpoints/audiollm/train.yaml").read_text())
    sub = cfg["encoder_conf"]["para_conf"]["subsampling"]
    tr = cfg["encoder_conf"]["para_conf"]["transformer"]
    cfg["encoder_conf"]["overview_conf"]["encoder-output-dim"] = ENC_WIDTH
    sub["subsampling-output-dim"] = ENC_WIDTH
    for key in ("transformer-input-dim", "transformer-output-dim", "transformer-attention-dim"):
        tr[key] = ENC_WIDTH
    tr.update({"transformer-attention-heads": 2, "transformer-linear-units": 48,
               "transformer-num-blocks": 3, "transformer-left_chunks": 8})
    conf = cfg["model_conf"]
    conf.update({"enc_out_dim": ENC_WIDTH, "llm_embed_dim": LLM_WIDTH, "task_num": 3,
                 "prompt_num": 7, "llm_head_num": 4, "num_key_value_heads": 2})
    conf["chat_template"] = conf["chat_template"].replace(
        "You are a helpful assistant.", "You answer briefly.")
    return cfg


def _write_cmvn(path: Path, gen: torch.Generator, n_mels: int) -> None:
    frames = 5000
    mean = 8.0 + 4.0 * torch.rand(n_mels, generator=gen, dtype=torch.float64)
    var = 2.0 + 3.0 * torch.rand(n_mels, generator=gen, dtype=torch.float64)
    path.write_text(json.dumps({
        "mean_stat": (mean * frames).tolist(), "var_stat": ((var + mean**2) * frames).tolist(),
        "frame_num": frames,
    }))


def _write_audiollm(audiollm: Path, cfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    (audiollm / "train.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    encoder_dims = EncoderDims.from_train_yaml(cfg)
    _write_cmvn(audiollm / "global_cmvn", gen, encoder_dims.n_mels)
    mean, istd = load_json_cmvn(audiollm / "global_cmvn")
    encoder = randomise(SpeechEncoder(encoder_dims), gen)
    encoder.update({"global_cmvn.mean": mean, "global_cmvn.istd": istd})
    adapter = randomise(Adapter(AdapterDims.from_train_yaml(cfg)), gen)
    heads = randomise(AudioLlmHeads(AudioLlmDims.from_train_yaml(cfg, "train.yaml")), gen)
    # Never `ignore`; `respond` on most chunks but not all, so `--turn-end model` stops early.
    heads["predictor_head.bias"] = torch.tensor([0.0, 0.8, -4.0, 0.0])
    state = {f"encoder.{k}": v for k, v in encoder.items()}
    state |= {f"adpter.{k}": v for k, v in adapter.items()}
    state |= heads
    torch.save(state, audiollm / "final.pt")
    return state


def _decoder_json(idim: int) -> list:
    return [idim, CODEC_VOCAB, {
        "idim": idim, "odim": CODEC_VOCAB, "transformer_attention_dim": idim,
        "transformer_linear_units": 64, "transformer_num_blocks": 2,
        "transformer_attention_heads": 2, "transformer_pos_enc_class": "rel-enc",
        "encoder_output_dim": idim, "encoder_pre_norm_type": "ln", "kv_cache_prefix_finetune": 1,
    }]


def _write_decoder(decoder_dir: Path, gen: torch.Generator) -> None:
    layout = _decoder_json(DECODER_IDIM)
    (decoder_dir / "model.json").write_text(json.dumps(layout, indent=1))
    dims = DecoderDims.from_model_json(layout)
    state = randomise(SpeechDecoder(dims), gen)
    state["out_fnn.bias"][dims.eos_id] = -30.0  # no early EOS: every segment uses its token cap
    torch.save({"model": state}, decoder_dir / "final.pt")



def _write_codec(codec_dir: Path, tiny_dir: Path, gen: torch.Generator) -> dict:
    cfg = json.loads((tiny_dir / "checkpoints/codec/model.json").read_text())
    cfg.update({
        "upsample_rates": UPSAMPLE_RATES, "upsample_kernel_sizes": UPSAMPLE_KERNELS,
        "upsample_initial_channel": 512, "resblock_kernel_sizes": [3, 5],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 2, 4]], "n_codes": CODEC_VOCAB,
        "global_code_num": 8, "global_tokens": [3, 39, 0, 17, 22, 8, 30, 11],
    })
    (codec_dir / "model.json").write_text(json.dumps(cfg, indent=1))
    codec = CodecDecoder(CodecDims.from_model_json(codec_dir / "model.json"))
    state = released_codec_state(codec, gen, bias_scale=0.05)
    torch.save(state, codec_dir / "final.pt")
    return state


@pytest.fixture(scope="module")
def other_model(tiny_dir, tmp_path_factory) -> OtherModel:
    root = tmp_path_factory.mktemp("other_dims")
    model_dir, llm_dir = root / "checkpoints", root / "llm"
    for sub in ("audiollm", "decoder", "codec"):
        (model_dir / sub).mkdir(parents=True)
    gen = torch.Generator().manual_seed(SEED)
    _write_llm(llm_dir, tiny_dir)
    audiollm_state = _write_audiollm(model_dir / "audiollm", _train_yaml(tiny_dir), gen)
    _write_decoder(model_dir / "decoder", gen)
    codec_state = _write_codec(model_dir / "codec", tiny_dir, gen)
    return OtherModel(model_dir, llm_dir, audiollm_state, codec_state)


def _respond(other: OtherModel, wav: Path, out_dir: Path, extra: list[str],
             model_dir: Path | None = None) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    return main([
        "respond", "--model-dir", str(model_dir or other.model_dir), "--llm-dir", str(other.llm_dir),
        "--input", str(wav), "--output", str(out_dir / "answer.wav"),
        "--trace", str(out_dir / "trace.json"), *extra,
    ])


def _check_answer(out_dir: Path, wav: Path, every_chunk: bool) -> dict:
    trace = json.loads((out_dir / "trace.json").read_text(encoding="utf-8"))
    n_samples = soundfile.info(wav).frames
    if every_chunk:
        assert len(trace["chunks"]) == -(-n_samples // CHUNK_SAMPLES)
    for chunk in trace["chunks"]:
        assert len(chunk["probs"]) == 3 and abs(sum(chunk["probs"]) - 1.0) < 1e-5
    assert 1 <= len(trace["tokens"]) <= MAX_NEW_TOKENS
    assert trace["segments"], "the answer produced no speech segment"
    codes = [t for s in trace["segments"] for t in s["codec_tokens"]]
    assert codes and all(0 <= t < CODEC_VOCAB for t in codes)
    assert all(len(s["codec_tokens"]) <= MAX_SPEECH_TOKENS for s in trace["segments"])
    assert trace["sample_rate"] == OUTPUT_RATE_HZ
    pcm, rate = soundfile.read(out_dir / "answer.wav", dtype="int16")
    assert rate == OUTPUT_RATE_HZ and pcm.ndim == 1
    assert len(pcm) == len(codes) * math.prod(UPSAMPLE_RATES)
    assert np.abs(pcm).max() > 0
    return trace


def test_respond_file_turn_end_sentence_segmentation(tiny_dir, other_model, tmp_path, capsys):
    wav = tiny_dir / "inputs/question.wav"
    args = ["--turn-end", "file", "--segmentation", "sentence", *BASE_ARGS]
    assert _respond(other_model, wav, tmp_path / "a", args) == 0
    trace = _check_answer(tmp_path / "a", wav, every_chunk=True)
    decisions = {c["decision"] for c in trace["chunks"]}
    assert decisions <= {"continue", "respond"} and "respond" in decisions
    assert "ms/chunk" in capsys.readouterr().out
    assert _respond(other_model, wav, tmp_path / "b", args) == 0
    assert (tmp_path / "a/answer.wav").read_bytes() == (tmp_path / "b/answer.wav").read_bytes()
    assert json.loads((tmp_path / "b/trace.json").read_text())["tokens"] == trace["tokens"]


def test_respond_model_turn_end_eager_segmentation(tiny_dir, other_model, tmp_path):
    wav = tiny_dir / "inputs/question.wav"
    args = ["--turn-end", "model", "--segmentation", "eager", *BASE_ARGS]
    assert _respond(other_model, wav, tmp_path, args) == 0
    trace = _check_answer(tmp_path, wav, every_chunk=False)
    # The turn ends at the first chunk whose decision is not `continue`.
    decisions = [c["decision"] for c in trace["chunks"]]
    assert decisions[-1] == "respond" and set(decisions[:-1]) <= {"continue"}


@pytest.fixture(scope="module")
def loaded(other_model: OtherModel):
    return load_models(other_model.model_dir, other_model.llm_dir, torch.device("cpu"), torch.float32)


def test_loader_reads_dimensions_from_the_files(other_model, loaded):
    assert loaded.decoder_rows_per_llm_vector == LLM_WIDTH // DECODER_IDIM == 2
    assert loaded.decoder.dims.odim == CODEC_VOCAB and loaded.decoder.dims.num_pre_layers == 1
    assert loaded.encoder.dims.model_dim == ENC_WIDTH and loaded.encoder.dims.num_blocks == 3
    assert loaded.encoder.dims.cache_frames == 4 * 8
    adapter = loaded.adapter
    assert adapter.dims.two_convs and isinstance(adapter.bn1, torch.nn.BatchNorm1d)
    state = other_model.audiollm_state
    for name in ("bn1.running_var", "bn2.running_mean", "conv1d1.weight", "project.weight"):
        torch.testing.assert_close(adapter.state_dict()[name], state[f"adpter.{name}"], rtol=0, atol=0)
    assert loaded.llm.heads.prompt_embeddings.num_embeddings == 7
    assert loaded.llm.layout.default_role == "You answer briefly."
    assert loaded.server_settings == {}

    codec = loaded.codec
    assert codec.samples_per_token == math.prod(UPSAMPLE_RATES) == 600
    assert [up.kernel_size[0] for up in codec.generator.ups] == UPSAMPLE_KERNELS
    assert codec.dims.global_stage == 1  # 512 -> 256 -> 128: the global vector joins after stage 1
    gen_state = other_model.codec_state["generator"]
    v, g = gen_state["ups.2.weight_v"], gen_state["ups.2.weight_g"]
    folded = torch._weight_norm(v, g, 0)  # torch's own weight-norm formula, dim 0 (input channels)
    torch.testing.assert_close(codec.generator.ups[2].weight, folded, rtol=1e-6, atol=1e-7)


def _reference_two_conv_adapter(state: dict[str, torch.Tensor], enc_out: torch.Tensor) -> torch.Tensor:
    """Spec 14.1 written out with torch.nn.functional: [T, D] -> [T / 2, LLM width]."""
    def bn_relu(x: torch.Tensor, name: str) -> torch.Tensor:
        p = {k: state[f"adpter.{name}.{k}"] for k in ("running_mean", "running_var", "weight", "bias")}
        return F.relu(F.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"],
                                   training=False, eps=1e-3))

    pad = state["adpter.conv1d1.weight"].shape[-1] - 1  # causal: k - 1 zeros in front
    x = enc_out.T.unsqueeze(0)  # [T, D] -> [1, D, T]
    x = F.conv1d(F.pad(x, (pad, 0)), state["adpter.conv1d1.weight"], state["adpter.conv1d1.bias"])
    x = bn_relu(x, "bn1")  # [1, 2D, T]
    x = F.conv1d(F.pad(x, (pad, 0)), state["adpter.conv1d2.weight"], state["adpter.conv1d2.bias"], stride=2)
    x = bn_relu(x, "bn2")[0].T  # [1, 4D, T / 2] -> [T / 2, 4D]
    return F.linear(x, state["adpter.project.weight"], state["adpter.project.bias"])


def _reference_codec(state: dict, cfg: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Spec 8.1 written out with weight-normed torch.nn.functional convolutions: [T] -> [600 T]."""
    gen, quant = state["generator"], state["quantizer"]

    def conv(x: torch.Tensor, stem: str, **kw) -> torch.Tensor:
        weight = torch._weight_norm(gen[f"{stem}.weight_v"], gen[f"{stem}.weight_g"], 0)
        return F.conv1d(F.leaky_relu(x, 0.1), weight, gen[f"{stem}.bias"], **kw)

    voice = torch.cat([quant[f"quantizer_modules_globaltokens.{j}.embedding.weight"][t]
                       for j, t in enumerate(cfg["global_tokens"])])  # [128]
    x = quant["quantizer_modules.0.embedding.weight"][tokens].T.unsqueeze(0)  # [1, 512, T]
    x = F.conv1d(x, torch._weight_norm(gen["conv_pre.weight_v"], gen["conv_pre.weight_g"], 0),
                 gen["conv_pre.bias"], padding=3)
    kernels, dilations = cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"]
    for i, (rate, kernel) in enumerate(zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"])):
        weight = torch._weight_norm(gen[f"ups.{i}.weight_v"], gen[f"ups.{i}.weight_g"], 0)
        x = F.conv_transpose1d(F.leaky_relu(x, 0.1), weight, gen[f"ups.{i}.bias"], stride=rate,
                               padding=(kernel - rate) // 2)
        outputs = []
        for j, (k, dils) in enumerate(zip(kernels, dilations)):
            y, block = x, f"resblocks.{i * len(kernels) + j}"
            for m, d in enumerate(dils):
                t = conv(y, f"{block}.convs1.{m}", dilation=d, padding=d * (k - 1) // 2)
                y = y + conv(t, f"{block}.convs2.{m}", padding=(k - 1) // 2)
            outputs.append(y)
        x = torch.stack(outputs).mean(0)
        if x.shape[1] == voice.numel():
            x = x + voice.view(1, -1, 1)
    return torch.tanh(conv(x, "conv_post", padding=3)).reshape(-1)


def test_two_conv_adapter_and_codec_kernels_follow_the_spec(other_model, loaded):
    gen = torch.Generator().manual_seed(7)
    enc_out = torch.randn(12, ENC_WIDTH, generator=gen)  # 3 chunks of 4 encoder frames
    cache, pieces = AdapterCache(), []
    with torch.no_grad():
        for chunk in enc_out.split(4):
            out, cache = loaded.adapter.step(chunk.unsqueeze(0), cache)  # [1, 2, 96]
            pieces.append(out[0])
    expected = _reference_two_conv_adapter(other_model.audiollm_state, enc_out)
    torch.testing.assert_close(torch.cat(pieces), expected, rtol=1e-5, atol=1e-5)

    tokens = torch.tensor([0, 5, 39, 12, 12, 30])
    cfg = json.loads((other_model.model_dir / "codec/model.json").read_text())
    with torch.no_grad():
        expected_pcm = _reference_codec(other_model.codec_state, cfg, tokens)
    pcm = loaded.codec.decode(tokens)
    assert pcm.shape == (len(tokens) * 600,)
    torch.testing.assert_close(pcm, expected_pcm, rtol=1e-4, atol=1e-5)


def test_decoder_width_that_does_not_divide_the_llm(tiny_dir, other_model, tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for part in ("audiollm", "codec"):
        (model_dir / part).symlink_to(other_model.model_dir / part)
    (model_dir / "decoder").mkdir()
    (model_dir / "decoder/final.pt").symlink_to(other_model.model_dir / "decoder/final.pt")
    (model_dir / "decoder/model.json").write_text(json.dumps(_decoder_json(40)))
    args = ["--turn-end", "file", *BASE_ARGS]
    rc = _respond(other_model, tiny_dir / "inputs/question.wav", tmp_path / "out", args, model_dir)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "does not divide" in err and "40" in err and "96" in err
