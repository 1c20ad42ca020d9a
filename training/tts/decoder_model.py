"""The trained speech decoder between stages: geometry, `model.json` layout, `result.pt`, batches.

The decoder is the engine's `SpeechDecoder` itself; its width is the frozen LLM's hidden size
divided by the rows each LLM vector is split into (SmolLM2: 576 = 4 × 144, spec §6.3).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantized_models.speech_decoder import DecoderDims, SpeechDecoder, split_llm_rows
from training.common import save_atomic
from training.tts.decoder_forward import DecoderBatch

RESULT_NAME = "result.pt"


@dataclass(frozen=True)
class DecoderGeometry:
    """Size of the trained speech decoder (the released architecture, scaled down)."""

    rows_per_vector: int = 4
    """Decoder rows per LLM vector; the LLM width must split exactly (576 / 4 = 144)."""
    attention_heads: int = 4
    """Heads of every layer (head width must be even for RoPE: 144 / 4 = 36)."""
    linear_units: int = 576
    """Width of the gated MLP."""
    num_blocks: int = 4
    """Layers of the NAR/AR stack and of the prefix stack; the pre-net has half."""

    def idim(self, llm_hidden: int) -> int:
        if self.rows_per_vector < 1 or llm_hidden % self.rows_per_vector:
            raise ValueError(f"the LLM width {llm_hidden} does not split into {self.rows_per_vector} "
                             "decoder rows per vector; choose --rows-per-vector that divides it")
        return llm_hidden // self.rows_per_vector


def decoder_layout(geometry: DecoderGeometry, llm_hidden: int, n_codes: int) -> list[Any]:
    """`decoder/model.json` content `[idim, odim, args]` in the released key names."""
    idim = geometry.idim(llm_hidden)
    args = {"idim": idim, "odim": n_codes, "transformer_attention_dim": idim,
            "transformer_linear_units": geometry.linear_units,
            "transformer_num_blocks": geometry.num_blocks,
            "transformer_attention_heads": geometry.attention_heads,
            "transformer_dropout_rate": 0.1, "kv_cache_prefix_finetune": 1,
            "trained_for_llm_hidden": llm_hidden}
    DecoderDims.from_model_json([idim, n_codes, args])  # raises on an unusable geometry
    return [idim, n_codes, args]


def build_decoder(layout: list[Any], seed: int) -> SpeechDecoder:
    """A fresh decoder of `layout`, initialised like a small transformer (normal, std 0.02)."""
    torch.manual_seed(seed)
    decoder = SpeechDecoder(DecoderDims.from_model_json(layout))
    for name, param in decoder.named_parameters():
        if param.dim() >= 2:
            nn.init.normal_(param, std=0.02)
        elif name.endswith("bias"):
            nn.init.zeros_(param)
    return decoder


def save_decoder_result(path: Path, stage: str, layout: list[Any], decoder: SpeechDecoder,
                        extra: dict[str, Any]) -> None:
    state = {k: v.detach().to("cpu", copy=True) for k, v in decoder.state_dict().items()}  # a CPU file
    save_atomic({"stage": stage, "layout": layout, "state": state, "extra": extra}, path)


def load_decoder_result(path: Path) -> dict[str, Any]:
    """A `result.pt` of tts-decoder or tts-prefix (a run directory is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `freeze-omni train tts-decoder` first")
    result = torch.load(path, map_location="cpu", weights_only=False)
    if "layout" not in result:
        raise ValueError(f"{path} is not a speech-decoder result (no model.json layout)")
    return result


def decoder_from_result(result: dict[str, Any]) -> SpeechDecoder:
    decoder = SpeechDecoder(DecoderDims.from_model_json(result["layout"]))
    decoder.load_state_dict(result["state"], strict=True)
    return decoder


@dataclass
class DecoderExample:
    """One training sequence before batching."""

    text_ids: list[int]
    """LLM token ids of the normalised segment text."""
    tokens: list[int]
    """Target codec ids."""
    prefix: Tensor | None = None
    """[k, llm_hidden] LLM hidden states of the segment (prefix stage only)."""


def make_batch(examples: list[DecoderExample], embed: nn.Embedding, idim: int, pad_id: int) -> DecoderBatch:
    """Split embeddings (and prefixes) into decoder rows and right-pad them."""
    pad = lambda xs: nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
    with torch.no_grad():
        rows = [split_llm_rows(embed(torch.tensor(e.text_ids, device=embed.weight.device)).float(), idim)
                for e in examples]  # each [4n, idim]
    tokens = [torch.tensor(e.tokens, dtype=torch.long) for e in examples]
    batch = DecoderBatch(pad(rows), [r.shape[0] for r in rows],
                         nn.utils.rnn.pad_sequence(tokens, batch_first=True, padding_value=pad_id),
                         [t.shape[0] for t in tokens])
    if all(e.prefix is not None for e in examples):
        prefixes = [split_llm_rows(e.prefix.float(), idim) for e in examples]  # type: ignore[union-attr]
        batch.prefix_rows, batch.prefix_lengths = pad(prefixes), [p.shape[0] for p in prefixes]
    return batch
