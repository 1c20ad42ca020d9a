"""Random-weight model directories in the released layout, for benchmarks at true sizes.

Random weights give true timings and memory: a model's cost depends on its geometry, not
its values. `build_random_model_dir` writes `checkpoints/` (audiollm, decoder, codec with
weight-norm pairs, as released) and `llm/` (a Qwen2 with random weights plus tokenizer
files copied from an existing directory), so the normal loader reads it.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from quantized_models.adapter import Adapter, AdapterDims
from quantized_models.codec import CodecDecoder, CodecDims
from quantized_models.encoder import EncoderDims, SpeechEncoder
from quantized_models.frontend import load_json_cmvn
from quantized_models.llm import AudioLlmDims, AudioLlmHeads
from quantized_models.speech_decoder import DecoderDims, SpeechDecoder

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<audio><|im_end|>\n<|im_start|>assistant\n"
)
QWEN2_VOCAB = 151646  # every id of the Qwen2 tokenizer fits


@dataclass(frozen=True)
class RandomModelSpec:
    """Geometry of a random Freeze-Omni model."""

    name: str
    enc_dim: int
    enc_heads: int
    enc_ffn: int
    enc_blocks: int
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_ffn: int
    llm_vocab: int
    decoder_idim: int
    decoder_heads: int
    decoder_ffn: int
    decoder_blocks: int
    codec_vocab: int = 1024
    prompt_num: int = 25


PRESETS = {
    "mid": RandomModelSpec(
        name="mid", enc_dim=256, enc_heads=4, enc_ffn=1024, enc_blocks=6,
        llm_hidden=896, llm_layers=4, llm_heads=14, llm_kv_heads=2, llm_ffn=2432, llm_vocab=QWEN2_VOCAB,
        decoder_idim=224, decoder_heads=4, decoder_ffn=896, decoder_blocks=4,
    ),
    "official": RandomModelSpec(  # spec §2, §4.1, §7.1: the released geometry (GPU only)
        name="official", enc_dim=1024, enc_heads=16, enc_ffn=4096, enc_blocks=24,
        llm_hidden=3584, llm_layers=28, llm_heads=28, llm_kv_heads=4, llm_ffn=18944, llm_vocab=152064,
        decoder_idim=896, decoder_heads=14, decoder_ffn=4864, decoder_blocks=4,
    ),
}

RELEASED_CODEC = {  # spec §9.2
    "resblock": "1", "upsample_rates": [8, 5, 5, 3], "upsample_kernel_sizes": [16, 11, 11, 5],
    "upsample_initial_channel": 512, "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "n_code_groups": 1, "residul_layer": 1,
    "global_code_num": 8, "global_tokens": [473, 975, 419, 219, 565, 121, 550, 616], "sampling_rate": 24000,
}


def randomise(module: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Fill every tensor of `module` with seeded, fan-in-scaled noise; returns the state dict."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(1)
            elif name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=gen)
                if tensor.dim() == 1 and name.endswith("weight"):  # a norm's scale
                    tensor.copy_(1.0 + 0.1 * noise)
                else:
                    fan_in = tensor[0].numel() if tensor.dim() > 1 else tensor.numel()
                    tensor.copy_(noise / math.sqrt(fan_in))
    return {k: v.clone() for k, v in module.state_dict().items()}


def train_yaml(spec: RandomModelSpec) -> dict:
    """A `train.yaml` of the released format for `spec`."""
    return {
        "input_dim": 80, "output_dim": 5538, "is_json_cmvn": True, "cmvn_file": "./global_cmvn",
        "encoder_conf": {
            "overview_conf": {"encoder-input-dim": 80, "encoder-layer-config": "subsampling-transformer",
                              "encoder-output-dim": spec.enc_dim},
            "para_conf": {
                "subsampling": {"subsampling-rate": 4, "subsampling-input-dim": 80,
                                "subsampling-output-dim": spec.enc_dim, "subsampling-dropout-rate": 0.1},
                "transformer": {
                    "transformer-input-dim": spec.enc_dim, "transformer-output-dim": spec.enc_dim,
                    "transformer-attention-dim": spec.enc_dim, "transformer-attention-heads": spec.enc_heads,
                    "transformer-linear-units": spec.enc_ffn, "transformer-num-blocks": spec.enc_blocks,
                    "transformer-dropout-rate": 0.1, "transformer-attention-dropout-rate": 0.0,
                    "transformer-positional-dropout-rate": 0.1, "transformer-input-layer": "linear",
                    "transformer-pos-enc-class": "rel-enc", "transformer-normalize-before": True,
                    "transformer-concat-after": False, "transformer-positionwise-layer-type": "linear",
                    "transformer-positionwise-conv-kernel_size": 1, "transformer-chunk_size": 4,
                    "transformer-left_chunks": 16, "transformer-dynamic-chunks": False,
                },
            },
        },
        "model_conf": {
            "llm_path": "./llm", "freeze_llm": True, "enc_out_dim": spec.enc_dim,
            "llm_embed_dim": spec.llm_hidden, "kernel_size": 5, "adpter_type": "subsampling",
            "add_audio_bos_eos": True, "task_num": 20, "task_type": "prompt_finetune",
            "prompt_finetune": True, "add_prompt_before": True, "prompt_num": spec.prompt_num,
            "prefix_finetune": False, "activation_func": "gelu", "norm": "layer",
            "chat_template": CHAT_TEMPLATE, "predict_usr_state": 4, "chunk_size": 2,
        },
    }


def _write_cmvn(path: Path, gen: torch.Generator, n_mels: int) -> None:
    frames = 10_000
    mean = 8.0 + 4.0 * torch.rand(n_mels, generator=gen, dtype=torch.float64)
    var = 2.0 + 3.0 * torch.rand(n_mels, generator=gen, dtype=torch.float64)
    path.write_text(json.dumps({"mean_stat": (mean * frames).tolist(),
                                "var_stat": ((var + mean**2) * frames).tolist(), "frame_num": frames}))


def _write_audiollm(folder: Path, spec: RandomModelSpec, gen: torch.Generator) -> None:
    cfg = train_yaml(spec)
    (folder / "train.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    enc_dims = EncoderDims.from_train_yaml(cfg)
    _write_cmvn(folder / "global_cmvn", gen, enc_dims.n_mels)
    mean, istd = load_json_cmvn(folder / "global_cmvn")
    encoder = randomise(SpeechEncoder(enc_dims), gen) | {"global_cmvn.mean": mean, "global_cmvn.istd": istd}
    adapter = randomise(Adapter(AdapterDims.from_train_yaml(cfg)), gen)
    heads = randomise(AudioLlmHeads(AudioLlmDims.from_train_yaml(cfg, "train.yaml")), gen)
    state = {f"encoder.{k}": v for k, v in encoder.items()} | {f"adpter.{k}": v for k, v in adapter.items()}
    torch.save(state | heads, folder / "final.pt")


def _write_decoder(folder: Path, spec: RandomModelSpec, gen: torch.Generator) -> None:
    args = {"idim": spec.decoder_idim, "odim": spec.codec_vocab,
            "transformer_attention_dim": spec.decoder_idim, "transformer_linear_units": spec.decoder_ffn,
            "transformer_num_blocks": spec.decoder_blocks, "transformer_attention_heads": spec.decoder_heads,
            "kv_cache_prefix_finetune": 1}
    layout = [spec.decoder_idim, spec.codec_vocab, args]
    (folder / "model.json").write_text(json.dumps(layout, indent=1))
    state = randomise(SpeechDecoder(DecoderDims.from_model_json(layout)), gen)
    torch.save({"model": state}, folder / "final.pt")


def _weight_norm_pair(weight: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_g [dim0, 1, 1], weight_v) whose folded weight is a fan-in-scaled random conv."""
    v = torch.randn(weight.shape, generator=gen)
    norm = v.reshape(v.shape[0], -1).norm(dim=1).view(-1, 1, 1)  # (dim0, 1, 1)
    return norm / math.sqrt(v[0].numel()), v


def _write_codec(folder: Path, spec: RandomModelSpec, gen: torch.Generator,
                 overrides: dict | None = None) -> None:
    cfg = dict(RELEASED_CODEC, n_codes=spec.codec_vocab, **(overrides or {}))
    cfg["global_tokens"] = [t % spec.codec_vocab for t in cfg["global_tokens"]]
    (folder / "model.json").write_text(json.dumps(cfg, indent=1))
    codec = CodecDecoder(CodecDims.from_model_json(folder / "model.json"))
    torch.save(released_codec_state(codec, gen), folder / "final.pt")


def released_codec_state(codec: CodecDecoder, gen: torch.Generator,
                         bias_scale: float = 0.01) -> dict[str, dict[str, torch.Tensor]]:
    """Random codec weights stored like the release: `generator` with weight-norm pairs for
    every convolution, and `quantizer`."""
    generator: dict[str, torch.Tensor] = {}
    for key, value in codec.generator.state_dict().items():
        if key.endswith(".weight"):  # every generator conv is weight-normed in the release
            stem = key[: -len(".weight")]
            generator[f"{stem}.weight_g"], generator[f"{stem}.weight_v"] = _weight_norm_pair(value, gen)
        else:
            generator[key] = bias_scale * torch.randn(value.shape, generator=gen)
    quantizer = {k: torch.randn(v.shape, generator=gen) for k, v in codec.quantizer.state_dict().items()}
    return {"generator": generator, "quantizer": quantizer}


def _write_llm(folder: Path, spec: RandomModelSpec, tokenizer_dir: Path, seed: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=spec.llm_vocab, hidden_size=spec.llm_hidden, intermediate_size=spec.llm_ffn,
        num_hidden_layers=spec.llm_layers, num_attention_heads=spec.llm_heads,
        num_key_value_heads=spec.llm_kv_heads, max_position_embeddings=32768, rope_theta=1e6,
        tie_word_embeddings=spec.llm_hidden < 3584, bos_token_id=151643, eos_token_id=151645,
    )
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, folder / name)


def build_random_model_dir(root: Path, spec: RandomModelSpec, tokenizer_dir: Path,
                           seed: int = 0) -> tuple[Path, Path]:
    """Write `root/checkpoints` and `root/llm` for `spec` unless already there; returns both paths."""
    model_dir, llm_dir = root / "checkpoints", root / "llm"
    marker = root / "spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec.__dict__:
        return model_dir, llm_dir
    logger.info("building random %s model in %s", spec.name, root)
    gen = torch.Generator().manual_seed(seed)
    for sub in ("audiollm", "decoder", "codec"):
        (model_dir / sub).mkdir(parents=True, exist_ok=True)
    llm_dir.mkdir(parents=True, exist_ok=True)
    _write_audiollm(model_dir / "audiollm", spec, gen)
    _write_decoder(model_dir / "decoder", spec, gen)
    _write_codec(model_dir / "codec", spec, gen)
    _write_llm(llm_dir, spec, tokenizer_dir, seed)
    marker.write_text(json.dumps(spec.__dict__))
    return model_dir, llm_dir
