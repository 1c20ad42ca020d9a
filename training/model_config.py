"""The trained model between stages: its train.yaml, released-key state dict and CMVN.

Every stage reads the previous stage's `result.pt` and writes its own, with the state dict
already in the released key names (`encoder.*`, `adpter.*`, `task_embeddings.weight`,
`prompt_embeddings.weight`, `predictor_head.*`) so export only writes files.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantized_models.adapter import Adapter, AdapterDims
from quantized_models.encoder import EncoderDims, SpeechEncoder
from quantized_models.frontend import Cmvn
from quantized_models.llm import AudioLlmDims, AudioLlmHeads
from quantized_models.model_dir import ADAPTER_PREFIX, ENCODER_PREFIX
from quantized_models.random_model import RandomModelSpec, train_yaml
from training.common import save_atomic

INFO_NAME = "TRAINING.json"  # what a model directory records of its training (export, tts-export)
TRANSCRIBE_TASK_ID = 1  # official AudioLLM.task_ids: sot 0, transcribe 1, translate 2, ...
DEFAULT_ROLE = "You are a helpful assistant."


@dataclass(frozen=True)
class EncoderGeometry:
    """Size of the trained speech encoder (the released architecture, scaled down)."""

    model_dim: int = 256
    """Width of subsampling, attention and output."""
    attention_heads: int = 4
    linear_units: int = 1024
    """Feed-forward hidden width."""
    num_blocks: int = 6
    """Transformer blocks."""


def chat_template(role: str) -> str:
    """The released ChatML template with `role` as the system text."""
    return (f"<|im_start|>system\n{role}<|im_end|>\n<|im_start|>user\n"
            "<audio><|im_end|>\n<|im_start|>assistant\n")


def encoder_train_yaml(geometry: EncoderGeometry, ctc_vocab: int) -> dict[str, Any]:
    """train.yaml without `model_conf` (stage 1 knows no LLM yet)."""
    spec = RandomModelSpec(
        name="trained", enc_dim=geometry.model_dim, enc_heads=geometry.attention_heads,
        enc_ffn=geometry.linear_units, enc_blocks=geometry.num_blocks, llm_hidden=1, llm_layers=1,
        llm_heads=1, llm_kv_heads=1, llm_ffn=1, llm_vocab=1, decoder_idim=1, decoder_heads=1,
        decoder_ffn=1, decoder_blocks=1,
    )
    cfg = train_yaml(spec)
    del cfg["model_conf"]
    cfg["output_dim"] = ctc_vocab
    return cfg


def with_llm(cfg: dict[str, Any], llm_hidden: int, role: str, prompt_num: int = 25) -> dict[str, Any]:
    """A copy of `cfg` with the released `model_conf` for an LLM of width `llm_hidden`."""
    enc_dim = cfg["encoder_conf"]["overview_conf"]["encoder-output-dim"]
    spec = RandomModelSpec(
        name="trained", enc_dim=enc_dim, enc_heads=1, enc_ffn=1, enc_blocks=1, llm_hidden=llm_hidden,
        llm_layers=1, llm_heads=1, llm_kv_heads=1, llm_ffn=1, llm_vocab=1, decoder_idim=1,
        decoder_heads=1, decoder_ffn=1, decoder_blocks=1, prompt_num=prompt_num,
    )
    out = copy.deepcopy(cfg)
    out["model_conf"] = train_yaml(spec)["model_conf"]
    out["model_conf"]["chat_template"] = chat_template(role)
    return out


def build_encoder(cfg: dict[str, Any], cmvn: dict | None = None) -> SpeechEncoder:
    """A SpeechEncoder of `cfg`'s geometry, with CMVN from JSON statistics if given."""
    encoder = SpeechEncoder(EncoderDims.from_train_yaml(cfg))
    if cmvn is not None:
        mean, istd = cmvn_tensors(cmvn)
        encoder.global_cmvn = Cmvn.from_stats(mean, istd)
    return encoder


def cmvn_tensors(stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, istd) float32 from JSON statistics, computed like `load_json_cmvn`."""
    mean_stat = torch.tensor(stats["mean_stat"], dtype=torch.float64)
    var_stat = torch.tensor(stats["var_stat"], dtype=torch.float64)
    mean = mean_stat / stats["frame_num"]
    var = torch.clamp_min(var_stat / stats["frame_num"] - mean * mean, 1.0e-20)
    return mean.float(), (1.0 / torch.sqrt(var)).float()


@dataclass
class AudioLlmParts:
    """Trainable modules of the speech input (whatever exists at this stage)."""

    cfg: dict[str, Any]
    encoder: SpeechEncoder
    adapter: Adapter | None = None
    heads: AudioLlmHeads | None = None

    @classmethod
    def build(cls, cfg: dict[str, Any], cmvn: dict | None) -> "AudioLlmParts":
        """Fresh modules for `cfg` (adapter and heads only when it has `model_conf`)."""
        parts = cls(cfg, build_encoder(cfg, cmvn))
        if "model_conf" in cfg:
            parts.adapter = Adapter(AdapterDims.from_train_yaml(cfg))
            parts.heads = AudioLlmHeads(AudioLlmDims.from_train_yaml(cfg, "train.yaml"))
        return parts

    def load_released(self, state: dict[str, torch.Tensor]) -> None:
        """Copy released-key tensors into the modules that exist; the rest is ignored."""
        encoder = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        self.encoder.load_state_dict(encoder, strict=True)
        if self.adapter is not None and any(k.startswith(ADAPTER_PREFIX) for k in state):
            adapter = {k[len(ADAPTER_PREFIX):]: v for k, v in state.items() if k.startswith(ADAPTER_PREFIX)}
            self.adapter.load_state_dict(adapter, strict=True)
        if self.heads is not None and "prompt_embeddings.weight" in state:
            self.heads.load_state_dict({k: state[k] for k in self.heads.state_dict()}, strict=True)

    def released_state(self) -> dict[str, torch.Tensor]:
        """Flat state dict in the key names of `audiollm/final.pt`."""
        state = {ENCODER_PREFIX + k: v for k, v in self.encoder.state_dict().items()}
        if self.adapter is not None:
            state |= {ADAPTER_PREFIX + k: v for k, v in self.adapter.state_dict().items()}
        if self.heads is not None:
            state |= dict(self.heads.state_dict())
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}  # results are CPU files

    @property
    def device(self) -> torch.device:
        """Where the modules live (they move together: `to`)."""
        return next(self.encoder.parameters()).device

    def to(self, device: torch.device) -> "AudioLlmParts":
        """Move every existing module to `device`."""
        for module in (self.encoder, self.adapter, self.heads):
            if module is not None:
                module.to(device)
        return self


def save_result(path: Path, stage: int, parts: AudioLlmParts, cmvn: dict, extra: dict | None = None) -> None:
    """Write a stage's `result.pt` (what the next stage and export read)."""
    save_atomic({"stage": stage, "train_yaml": parts.cfg, "state": parts.released_state(),
                 "cmvn": cmvn, "extra": extra or {}}, path)


def load_result(path: Path) -> dict[str, Any]:
    """A `result.pt` as written by `save_result`; a run directory is accepted too."""
    path = Path(path)
    if path.is_dir():
        path = path / "result.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the previous training stage first")
    return torch.load(path, map_location="cpu", weights_only=False)
