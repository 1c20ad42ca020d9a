"""Step backends: the same streaming contract served by torch modules or by onnxruntime.

The engine only talks to these protocols, so each component (speech input = encoder +
adapter, speech decoder, codec) can run on torch or on an exported ONNX graph while the
session keeps the same cache dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from quantized_models.adapter import Adapter, AdapterCache
from quantized_models.codec import CodecDims
from quantized_models.encoder import EncoderCache, SpeechEncoder
from quantized_models.speech_decoder import DecoderCache, DecoderDims


class SpeechInputBackend(Protocol):
    """Encoder + adapter for one 160 ms chunk."""

    def step(
        self, fbank: torch.Tensor, encoder: EncoderCache, adapter: AdapterCache
    ) -> tuple[torch.Tensor, EncoderCache, AdapterCache]:
        """fbank [1, 19, n_mels] → LLM input vectors [1, 2, llm_dim] and updated caches."""
        ...


class SpeechDecoderBackend(Protocol):
    dims: DecoderDims

    def prefill(
        self, hidden_rows: torch.Tensor, prefix_rows: torch.Tensor | None, cache: DecoderCache
    ) -> DecoderCache:
        """Pre-network, prefix decoder and NAR pass over [4n, idim] / [4k, idim] rows."""
        ...

    def step(self, token_id: int, cache: DecoderCache) -> tuple[torch.Tensor, DecoderCache]:
        """One AR step: feed `token_id`, return logits over the codec vocabulary + specials."""
        ...


class CodecBackend(Protocol):
    dims: CodecDims
    samples_per_token: int

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Codec ids [T] → PCM [T * samples_per_token] in ±1."""
        ...


class TorchSpeechInput:
    """Speech input on the torch encoder and adapter modules."""

    def __init__(self, encoder: SpeechEncoder, adapter: Adapter) -> None:
        self.encoder = encoder
        self.adapter = adapter

    @torch.inference_mode()
    def step(
        self, fbank: torch.Tensor, encoder: EncoderCache, adapter: AdapterCache
    ) -> tuple[torch.Tensor, EncoderCache, AdapterCache]:
        enc_out, encoder = self.encoder.step(fbank, encoder)  # (1, 4, D)
        vectors, adapter = self.adapter.step(enc_out, adapter)  # (1, 2, H)
        return vectors, encoder, adapter


@dataclass
class Backends:
    """The backend serving each component."""

    speech_input: SpeechInputBackend
    decoder: SpeechDecoderBackend
    codec: CodecBackend
    names: dict[str, str]
    """Component name → 'torch' or 'onnx', for logs and benchmarks."""
