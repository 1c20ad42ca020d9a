"""TiCodec-style decoder: codec token ids -> 24 kHz PCM (spec section 8.1).

Frame tokens are embedded, a fixed "global token" vector (the voice) is added after the
stage whose output width equals that vector, and a HiFi-GAN generator (ResBlock type 1)
upsamples by the product of `upsample_rates`. Weight norm is folded once at load time.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from quantized_models.checkpoint_file import read_checkpoint
from quantized_models.errors import CheckpointError, ModelLoadError
from quantized_models.strict_load import load_strict

logger = logging.getLogger(__name__)

CODE_EMBED_DIM = 512  # frame-token embedding width = generator input channels, fixed in the official code
RESBLOCK1_CONVS = 3  # HiFi-GAN ResBlock type 1: three dilated convolutions
GLOBAL_VECTOR_DIM = 128  # width of the concatenated global-token vector, fixed in the official code
LRELU_SLOPE = 0.1  # HiFi-GAN's LeakyReLU slope, used before every conv incl. conv_post
CONV_PRE_KERNEL = 7  # conv_pre / conv_post kernel (padding 3), fixed in the official generator
SUPPORTED_RESBLOCK = "1"
CHECKPOINT_PARTS = ("generator", "quantizer")
UNUSED_PARTS = ("encoder",)  # the codec encoder (audio -> tokens) is not needed to speak


@dataclass(frozen=True)
class CodecDims:
    """Codec hyper-parameters read from `codec/model.json`."""

    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    n_codes: int
    """Frame-token vocabulary."""
    global_code_num: int
    """Number of global-token groups; their embeddings concatenate to GLOBAL_VECTOR_DIM."""
    global_tokens: tuple[int, ...]
    """The fixed global-token ids (one per group) that select the voice."""
    sampling_rate: int
    """Output sample rate in Hz."""

    @property
    def samples_per_token(self) -> int:
        return math.prod(self.upsample_rates)

    @property
    def global_embed_dim(self) -> int:
        return GLOBAL_VECTOR_DIM // self.global_code_num

    def stage_channels(self) -> list[int]:
        """Output channels of each upsampling stage (halved every stage, as in HiFi-GAN)."""
        return [self.upsample_initial_channel // 2 ** (i + 1) for i in range(len(self.upsample_rates))]

    @property
    def global_stage(self) -> int:
        """Index of the stage after which the global vector is added."""
        return self.stage_channels().index(GLOBAL_VECTOR_DIM)

    @classmethod
    def from_model_json(cls, path: Path | str) -> CodecDims:
        try:
            cfg = json.loads(Path(path).read_text(encoding="utf-8"))
            if str(cfg["resblock"]) != SUPPORTED_RESBLOCK:
                raise ModelLoadError(
                    f"{path}: resblock type {cfg['resblock']!r} is not supported (only \"1\")."
                )
            dims = cls(
                upsample_rates=tuple(int(r) for r in cfg["upsample_rates"]),
                upsample_kernel_sizes=tuple(int(k) for k in cfg["upsample_kernel_sizes"]),
                upsample_initial_channel=int(cfg["upsample_initial_channel"]),
                resblock_kernel_sizes=tuple(int(k) for k in cfg["resblock_kernel_sizes"]),
                resblock_dilation_sizes=tuple(
                    tuple(int(d) for d in ds) for ds in cfg["resblock_dilation_sizes"]
                ),
                n_codes=int(cfg["n_codes"]),
                global_code_num=int(cfg["global_code_num"]),
                global_tokens=tuple(int(t) for t in cfg["global_tokens"]),
                sampling_rate=int(cfg["sampling_rate"]),
            )
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ModelLoadError(f"{path}: cannot read the codec configuration ({exc!r}).") from exc
        dims._validate(str(path))
        return dims

    def _validate(self, source: str) -> None:
        problems = []
        if not self.upsample_rates or len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            problems.append("upsample_rates and upsample_kernel_sizes must be non-empty and equally long")
        elif any(k < r or (k - r) % 2 for r, k in zip(self.upsample_rates, self.upsample_kernel_sizes)):
            problems.append("every upsample kernel must be >= its rate with an even difference")
        if not self.resblock_kernel_sizes or len(self.resblock_kernel_sizes) != len(
            self.resblock_dilation_sizes
        ):
            problems.append("resblock_kernel_sizes and resblock_dilation_sizes must match")
        elif any(len(d) != RESBLOCK1_CONVS for d in self.resblock_dilation_sizes):
            # The official ResBlock1 always builds three convolutions from dilation[0..2].
            problems.append(f"every resblock_dilation_sizes entry needs {RESBLOCK1_CONVS} dilations")
        if GLOBAL_VECTOR_DIM not in self.stage_channels():
            problems.append(
                f"no upsampling stage outputs {GLOBAL_VECTOR_DIM} channels "
                f"(stages: {self.stage_channels()}), so the global vector cannot be added"
            )
        if self.global_code_num < 1 or GLOBAL_VECTOR_DIM % self.global_code_num:
            problems.append(f"global_code_num must divide {GLOBAL_VECTOR_DIM}")
        if len(self.global_tokens) != self.global_code_num:
            problems.append("global_tokens must hold one id per global-code group")
        elif any(not 0 <= t < self.n_codes for t in self.global_tokens):
            problems.append(f"global_tokens must lie in [0, {self.n_codes})")
        if problems:
            raise ModelLoadError(f"{source}: unusable codec config: {'; '.join(problems)}.")


class ResBlock1(nn.Module):
    """HiFi-GAN ResBlock type 1: per dilation, x + conv1(lrelu(conv_d(lrelu(x))))."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2) for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [1, C, L] -> [1, C, L]."""
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class CodecGenerator(nn.Module):
    """HiFi-GAN generator with plain (weight-norm-folded) convolutions."""

    def __init__(self, dims: CodecDims) -> None:
        super().__init__()
        self.dims = dims
        pad = (CONV_PRE_KERNEL - 1) // 2
        self.conv_pre = nn.Conv1d(CODE_EMBED_DIM, dims.upsample_initial_channel, CONV_PRE_KERNEL, padding=pad)
        chans = [dims.upsample_initial_channel, *dims.stage_channels()]
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(chans[i], chans[i + 1], k, r, padding=(k - r) // 2)
            for i, (r, k) in enumerate(zip(dims.upsample_rates, dims.upsample_kernel_sizes))
        )
        # Flat list, stage-major: resblocks[stage * n_kernels + j], as in the checkpoint.
        self.resblocks = nn.ModuleList(
            ResBlock1(c, k, d)
            for c in chans[1:]
            for k, d in zip(dims.resblock_kernel_sizes, dims.resblock_dilation_sizes)
        )
        self.conv_post = nn.Conv1d(chans[-1], 1, CONV_PRE_KERNEL, padding=pad)

    def forward(self, x: torch.Tensor, global_vec: torch.Tensor) -> torch.Tensor:
        """x: [1, CODE_EMBED_DIM, T]; global_vec: [GLOBAL_VECTOR_DIM]. Returns [1, 1, T * spt]."""
        n_k = len(self.dims.resblock_kernel_sizes)
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * n_k : (i + 1) * n_k]
            x = sum(block(x) for block in blocks) / n_k  # mean over resblock kernels
            if i == self.dims.global_stage:
                x = x + global_vec.view(1, -1, 1)  # [128] -> [1, 128, 1], broadcast over time
        x = self.conv_post(F.leaky_relu(x, LRELU_SLOPE))
        return torch.tanh(x)


class CodecQuantizer(nn.Module):
    """Codebooks only (decoding needs no quantisation): frame codes and global-token groups."""

    def __init__(self, dims: CodecDims) -> None:
        super().__init__()
        self.quantizer_modules = nn.ModuleList([_Codebook(dims.n_codes, CODE_EMBED_DIM)])
        self.quantizer_modules_globaltokens = nn.ModuleList(
            _Codebook(dims.n_codes, dims.global_embed_dim) for _ in range(dims.global_code_num)
        )


class _Codebook(nn.Module):
    def __init__(self, n_codes: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_codes, dim)


class CodecDecoder(nn.Module):
    """Token ids -> waveform with the fixed voice from `global_tokens`."""

    def __init__(self, dims: CodecDims) -> None:
        super().__init__()
        self.dims = dims
        self.generator = CodecGenerator(dims)
        self.quantizer = CodecQuantizer(dims)
        self.register_buffer("global_ids", torch.tensor(dims.global_tokens), persistent=False)

    @property
    def samples_per_token(self) -> int:
        return self.dims.samples_per_token

    def global_vector(self) -> torch.Tensor:
        """[GLOBAL_VECTOR_DIM]: group j's embedding of global_ids[j], concatenated."""
        parts = [
            book.embedding(self.global_ids[j : j + 1])[0]  # [global_embed_dim]
            for j, book in enumerate(self.quantizer.quantizer_modules_globaltokens)
        ]
        return torch.cat(parts)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: LongTensor [T] of codec ids -> pcm [T * samples_per_token] in (-1, 1)."""
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < self.dims.n_codes:
            raise ValueError(f"codec ids must lie in [0, {self.dims.n_codes}), got {tokens.tolist()}.")
        emb = self.quantizer.quantizer_modules[0].embedding(tokens.to(self.global_ids.device))  # [T, 512]
        x = emb.transpose(0, 1).unsqueeze(0)  # [T, 512] -> [1, 512, T]
        return self.generator(x, self.global_vector()).reshape(-1)  # [1, 1, S] -> [S]


def fold_weight_norm(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Replace every `X.weight_g`/`X.weight_v` pair by `X.weight = g * v / ||v||`.

    The norm runs over all dims except 0 (for ConvTranspose1d dim 0 is the input channel),
    matching `torch.nn.utils.remove_weight_norm`. A lone half of a pair is an error.
    """
    out: dict[str, torch.Tensor] = {}
    lone = []
    for key, value in state.items():
        if key.endswith(".weight_g"):
            stem = key[: -len(".weight_g")]
            if f"{stem}.weight_v" not in state:
                lone.append(key)
                continue
            v = state[f"{stem}.weight_v"]
            norm = v.reshape(v.shape[0], -1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
            out[f"{stem}.weight"] = v * (value / norm)
        elif key.endswith(".weight_v"):
            if f"{key[: -len('.weight_v')]}.weight_g" not in state:
                lone.append(key)
        else:
            out[key] = value
    if lone:
        raise CheckpointError(f"{source}: weight-norm pairs are incomplete: {', '.join(sorted(lone))}.")
    return out


def load_codec(ckpt_path: Path | str, dims: CodecDims) -> CodecDecoder:
    """Build the codec on CPU/float32 and strictly load `final.pt` ({'generator', 'quantizer'})."""
    ckpt = read_checkpoint(ckpt_path, "codec checkpoint")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{ckpt_path}: expected a dict with keys {CHECKPOINT_PARTS}.")
    missing = [p for p in CHECKPOINT_PARTS if not isinstance(ckpt.get(p), Mapping)]
    extra = [k for k in ckpt if k not in CHECKPOINT_PARTS + UNUSED_PARTS]
    if missing or extra:
        raise CheckpointError(
            f"{ckpt_path}: codec checkpoint needs entries {list(CHECKPOINT_PARTS)}; "
            f"missing {missing}, unexpected {extra}."
        )
    for part in UNUSED_PARTS:
        if part in ckpt:
            logger.debug("%s: ignoring the unused codec %s (%d tensors)", ckpt_path, part, len(ckpt[part]))
    codec = CodecDecoder(dims)
    generator_src = f"{ckpt_path} ['generator']"
    load_strict(codec.generator, fold_weight_norm(ckpt["generator"], generator_src), generator_src)
    load_strict(codec.quantizer, ckpt["quantizer"], f"{ckpt_path} ['quantizer']")
    return codec.eval()
