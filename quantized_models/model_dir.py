"""Load a Freeze-Omni model directory in the released layout plus a local Hugging Face LLM.

Layout (spec §9): `audiollm/{final.pt, train.yaml, global_cmvn}`, `decoder/{final.pt,
model.json}`, `codec/{final.pt, model.json}`, optional `server.json`. Every tensor of
every file must be consumed and every parameter filled; dimensions are read from the
config files. Nothing is ever fetched from a hub.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from quantized_models.adapter import Adapter, AdapterDims
from quantized_models.backends import Backends, TorchSpeechInput
from quantized_models.codec import CodecDecoder, CodecDims, load_codec
from quantized_models.encoder import EncoderDims, SpeechEncoder
from quantized_models.checkpoint_file import read_checkpoint
from quantized_models.errors import CheckpointError, ModelLoadError
from quantized_models.frontend import load_json_cmvn
from quantized_models.piper_unit_codec import CODEC_TYPE as UNIT_CODEC_TYPE
from quantized_models.piper_unit_codec import PiperUnitCodec, load_piper_unit_codec
from quantized_models.llm import AudioLlmDims, AudioLlmHeads, ChatLayout, FrozenLlm
from quantized_models.speech_decoder import DecoderDims, SpeechDecoder, load_speech_decoder
from quantized_models.strict_load import load_strict
from quantized_models.world_codec import CODEC_TYPE as WORLD_CODEC_TYPE
from quantized_models.world_codec import WorldCodec, load_world_codec, read_codec_json

logger = logging.getLogger(__name__)

REQUIRED_FILES = (
    "audiollm/final.pt",
    "audiollm/train.yaml",
    "audiollm/global_cmvn",
    "decoder/final.pt",
    "decoder/model.json",
    "codec/final.pt",
    "codec/model.json",
)
ENCODER_PREFIX = "encoder."
ADAPTER_PREFIX = "adpter."  # sic: the released checkpoint's spelling


@dataclass
class FreezeOmniModels:
    """Every model of the stack, loaded once and shared by all sessions (read-only)."""

    n_mels: int
    encoder: SpeechEncoder
    adapter: Adapter
    llm: FrozenLlm
    tokenizer: Any
    decoder: SpeechDecoder
    codec: CodecDecoder | WorldCodec | PiperUnitCodec
    """The released TiCodec generator, a WORLD VQ or a piper-unit codec (`codec_type` in codec/model.json)."""
    device: torch.device
    dtype: torch.dtype
    backends: Backends
    """What the engine calls; torch modules unless swapped for ONNX graphs."""
    server_settings: dict[str, Any] = field(default_factory=dict)
    """Contents of the optional `server.json` (demo speech-decoder settings)."""

    @property
    def decoder_rows_per_llm_vector(self) -> int:
        return self.llm.hidden_size // self.decoder.dims.idim


def check_model_dir(model_dir: Path) -> None:
    """Raise ModelLoadError unless `model_dir` has the released file layout."""
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist or is not a directory")
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise ModelLoadError(
            f"{model_dir} is not a Freeze-Omni model directory: missing {', '.join(missing)}"
        )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as err:
        raise ModelLoadError(f"{path}: not a readable YAML file ({err})") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a mapping at the top level")
    return data


def _split_audiollm_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    adapter = {k[len(ADAPTER_PREFIX):]: v for k, v in state.items() if k.startswith(ADAPTER_PREFIX)}
    rest = {
        k: v for k, v in state.items()
        if not k.startswith(ENCODER_PREFIX) and not k.startswith(ADAPTER_PREFIX)
    }
    return encoder, adapter, rest


def load_audiollm(model_dir: Path) -> tuple[int, SpeechEncoder, Adapter, AudioLlmHeads, AudioLlmDims]:
    """Build and strictly load encoder, adapter and the LLM-side heads (CPU, float32)."""
    yaml_path = model_dir / "audiollm" / "train.yaml"
    ckpt_path = model_dir / "audiollm" / "final.pt"
    cfg = _read_yaml(yaml_path)
    n_mels = int(cfg.get("input_dim", 0))
    if n_mels <= 0:
        raise ModelLoadError(f"{yaml_path}: input_dim (number of mel bins) is missing")
    state = read_checkpoint(ckpt_path, "audio-LLM checkpoint")
    if not isinstance(state, dict):
        raise ModelLoadError(f"{ckpt_path}: expected a flat state dict")
    encoder_state, adapter_state, head_state = _split_audiollm_state(state)

    encoder = SpeechEncoder(EncoderDims.from_train_yaml(cfg))
    mean, istd = load_json_cmvn(model_dir / "audiollm" / "global_cmvn")
    # Spec §14.6: CMVN buffers stored in final.pt win over the global_cmvn statistics.
    encoder_state.setdefault("global_cmvn.mean", mean)
    encoder_state.setdefault("global_cmvn.istd", istd)
    load_strict(encoder, encoder_state, ckpt_path)

    adapter = Adapter(AdapterDims.from_train_yaml(cfg))
    load_strict(adapter, adapter_state, ckpt_path)

    dims = AudioLlmDims.from_train_yaml(cfg, str(yaml_path))
    heads = AudioLlmHeads(dims)
    load_strict(heads, head_state, ckpt_path)
    logger.info("loaded %s (%d tensors)", ckpt_path, len(state))
    return n_mels, encoder, adapter, heads, dims


def load_llm(llm_dir: Path, dims: AudioLlmDims, dtype: torch.dtype, device: torch.device,
             quantization: str = "none") -> tuple[Any, Any]:
    """Load the frozen causal LM and its tokenizer from a local directory only.

    With `quantization` int8/nf4 the weights are quantized by bitsandbytes while loading
    and placed on `device` there; otherwise the caller moves the model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (llm_dir / "config.json").is_file():
        raise ModelLoadError(f"{llm_dir} is not a Hugging Face model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(llm_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{llm_dir}/config.json cannot be read ({err})") from err
    if int(config.hidden_size) != dims.llm_embed_dim:
        raise ModelLoadError(
            f"the LLM in {llm_dir} has hidden size {config.hidden_size}, but the checkpoint was "
            f"trained for {dims.llm_embed_dim}; pass the LLM the checkpoint was trained with"
        )
    extra: dict[str, Any] = {}
    if quantization != "none":
        from quantized_models.quantize import QuantizationMode, llm_load_kwargs

        extra = llm_load_kwargs(QuantizationMode.parse(quantization), dtype, device)
    try:
        causal_lm = AutoModelForCausalLM.from_pretrained(
            llm_dir, dtype=dtype, local_files_only=True, **extra
        )
        tokenizer = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    except (OSError, ValueError, RuntimeError, ImportError) as err:
        raise ModelLoadError(f"cannot load the LLM from {llm_dir}: {err}") from err
    causal_lm.eval()
    return causal_lm, tokenizer


def load_decoder(model_dir: Path, llm_hidden: int) -> SpeechDecoder:
    json_path = model_dir / "decoder" / "model.json"
    ckpt_path = model_dir / "decoder" / "final.pt"
    dims = DecoderDims.from_model_json(json_path)
    if llm_hidden % dims.idim != 0:
        raise ModelLoadError(
            f"{json_path}: decoder input width {dims.idim} does not divide the LLM width "
            f"{llm_hidden}; this speech decoder was trained for another LLM"
        )
    return load_speech_decoder(ckpt_path, dims)


def load_codec_folder(codec_dir: Path) -> CodecDecoder | WorldCodec | PiperUnitCodec:
    """The codec of `codec_dir` by its model.json `codec_type`: absent = the released TiCodec."""
    json_path = codec_dir / "model.json"
    codec_type = read_codec_json(json_path).get("codec_type")
    if codec_type == WORLD_CODEC_TYPE:
        return load_world_codec(codec_dir)
    if codec_type == UNIT_CODEC_TYPE:
        return load_piper_unit_codec(codec_dir)
    if codec_type is not None:
        raise ModelLoadError(f"{json_path}: unknown codec_type {codec_type!r} (known: {WORLD_CODEC_TYPE!r}, "
                             f"{UNIT_CODEC_TYPE!r}, "
                             "or none for the released TiCodec)")
    return load_codec(codec_dir / "final.pt", CodecDims.from_model_json(json_path))


def _read_server_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "server.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: not valid JSON ({err})") from err


def load_models(
    model_dir: Path, llm_dir: Path, device: torch.device, dtype: torch.dtype,
    quantization: str = "none",
) -> FreezeOmniModels:
    """Load the whole stack; `device` and `dtype` are applied here, once.

    Args:
        quantization: "none", "int8" or "nf4": how the frozen LLM's linear layers are
            stored (bitsandbytes). Everything else keeps `dtype`.
    """
    model_dir, llm_dir = Path(model_dir), Path(llm_dir)
    check_model_dir(model_dir)
    n_mels, encoder, adapter, heads, dims = load_audiollm(model_dir)
    # Our own (small) files first, so a broken one is reported before the big LLM loads.
    decoder = load_decoder(model_dir, dims.llm_embed_dim)
    codec = load_codec_folder(model_dir / "codec")
    causal_lm, tokenizer = load_llm(llm_dir, dims, dtype, device, quantization)
    layout = ChatLayout.from_template(dims.chat_template, tokenizer)
    llm = FrozenLlm(causal_lm, heads, layout)
    if quantization != "none":
        from quantized_models.quantize import QuantizationMode, check_quantized_llm, memory_report

        check_quantized_llm(causal_lm, QuantizationMode.parse(quantization))
        logger.info("LLM loaded (%s): %s", quantization, memory_report(device))
    for module in (encoder, adapter, heads, decoder, codec):
        module.to(device=device, dtype=dtype).eval()
    if quantization == "none":  # a bitsandbytes model is placed while loading and cannot be cast
        causal_lm.to(device=device, dtype=dtype)
    logger.info("models ready on %s (%s)", device, dtype)
    return FreezeOmniModels(
        n_mels=n_mels, encoder=encoder, adapter=adapter, llm=llm, tokenizer=tokenizer,
        decoder=decoder, codec=codec, device=device, dtype=dtype,
        backends=Backends(
            speech_input=TorchSpeechInput(encoder, adapter), decoder=decoder, codec=codec,
            names={"speech_input": "torch", "decoder": "torch", "codec": "torch"},
        ),
        server_settings=_read_server_json(model_dir),
    )


__all__ = ["FreezeOmniModels", "load_models", "check_model_dir", "CheckpointError", "ModelLoadError"]
