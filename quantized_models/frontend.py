"""Kaldi-compatible log-mel front end, the official 160 ms chunker, and global CMVN.

The official code calls `torchaudio.compliance.kaldi.fbank` on 2800 int16-scaled samples per
2560-sample step and hands on 19 feature rows (3 carried + 16 new). torchaudio is not a
dependency here, so the Kaldi recipe is re-written below with plain torch ops in the same order
(DC removal, pre-emphasis, povey window, zero-padded FFT, power spectrum, mel banks, log).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from quantized_models.errors import ModelLoadError

# --- Kaldi fbank options used by the official front end (all fixed there, not configurable) ---
SAMPLE_RATE_HZ = 16_000  # input rate the official front end assumes
FRAME_LENGTH_SAMPLES = 400  # 25 ms window at 16 kHz
FRAME_SHIFT_SAMPLES = 160  # 10 ms hop at 16 kHz
FFT_SIZE = 512  # Kaldi rounds the 400-sample window up to the next power of two
PREEMPHASIS_COEFF = 0.97  # Kaldi default
POVEY_EXPONENT = 0.85  # povey window = hann(N, symmetric) ** 0.85
MEL_LOW_FREQ_HZ = 20.0  # Kaldi default low_freq; high_freq defaults to Nyquist
MEL_BREAK_HZ = 700.0  # mel(f) = 1127 ln(1 + f / 700)
MEL_HIGH_Q = 1127.0
INT16_SCALE = 32768.0  # waveform in +-1 is scaled to the int16 range Kaldi expects

# --- Official streaming chunker (`audioEncoderProcessor`, identical in `web/vad.py`) ---
CHUNK_NEW_FRAMES = 16  # fbank frames produced per step (160 ms)
CHUNK_OVERLAP_FRAMES = 3  # feature rows carried over from the previous step
CHUNK_FEATURE_ROWS = CHUNK_NEW_FRAMES + CHUNK_OVERLAP_FRAMES  # 19 rows handed to the encoder
CHUNK_SAMPLES = CHUNK_NEW_FRAMES * FRAME_SHIFT_SAMPLES  # 2560 samples = 160 ms
CARRY_SAMPLES = FRAME_LENGTH_SAMPLES - FRAME_SHIFT_SAMPLES  # 240 samples = 15 ms


def _mel(freq_hz: Tensor) -> Tensor:
    return MEL_HIGH_Q * torch.log(1.0 + freq_hz / MEL_BREAK_HZ)


def kaldi_mel_banks(n_mels: int, device: torch.device | None = None) -> Tensor:
    """Kaldi triangular mel filters (no VTLN), float32.

    Args:
        n_mels: number of mel bins.
        device: where to build the matrix.

    Returns:
        [n_mels, FFT_SIZE // 2 + 1] weights; the Nyquist column is zero as in Kaldi.
    """
    nyquist_hz = 0.5 * SAMPLE_RATE_HZ
    # Scalar edges in float64 (Python math) like Kaldi's MelScale on doubles.
    mel_low = MEL_HIGH_Q * math.log(1.0 + MEL_LOW_FREQ_HZ / MEL_BREAK_HZ)
    mel_high = MEL_HIGH_Q * math.log(1.0 + nyquist_hz / MEL_BREAK_HZ)
    mel_delta = (mel_high - mel_low) / (n_mels + 1)
    band = torch.arange(n_mels, device=device, dtype=torch.float32).unsqueeze(1)  # [M, 1]
    left = mel_low + band * mel_delta
    center = mel_low + (band + 1.0) * mel_delta
    right = mel_low + (band + 2.0) * mel_delta
    bin_width_hz = SAMPLE_RATE_HZ / FFT_SIZE
    fft_bins = torch.arange(FFT_SIZE // 2, device=device, dtype=torch.float32)
    mel = _mel(bin_width_hz * fft_bins).unsqueeze(0)  # [1, FFT/2]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp_min(torch.minimum(up, down), 0.0)  # [M, FFT/2]
    return nn.functional.pad(banks, (0, 1))  # [M, FFT/2 + 1]


def povey_window(device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """[FRAME_LENGTH_SAMPLES] symmetric Hann window raised to 0.85 (Kaldi "povey")."""
    hann = torch.hann_window(FRAME_LENGTH_SAMPLES, periodic=False, device=device, dtype=dtype)
    return hann.pow(POVEY_EXPONENT)


def kaldi_fbank(waveform: Tensor, n_mels: int) -> Tensor:
    """Kaldi log-mel filterbank (dither 0, snip_edges, no energy), like torchaudio's defaults.

    Args:
        waveform: [S] samples already in int16 scale (S >= FRAME_LENGTH_SAMPLES).
        n_mels: number of mel bins.

    Returns:
        [1 + (S - 400) // 160, n_mels] log mel energies, dtype of `waveform`.
    """
    frames = waveform.unfold(0, FRAME_LENGTH_SAMPLES, FRAME_SHIFT_SAMPLES)  # [F, 400]
    frames = frames - frames.mean(dim=1, keepdim=True)
    # Kaldi's first-sample rule: x[0] is pre-emphasised against itself.
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # [F, 400]
    frames = frames - PREEMPHASIS_COEFF * previous
    frames = frames * povey_window(frames.device, frames.dtype)
    spectrum = torch.fft.rfft(frames, n=FFT_SIZE).abs().pow(2.0)  # [F, FFT/2 + 1]
    banks = kaldi_mel_banks(n_mels, frames.device).to(frames.dtype)
    energies = spectrum @ banks.T  # [F, M]
    floor = torch.finfo(torch.float32).eps  # Kaldi/torchaudio epsilon, float32 eps
    return torch.clamp_min(energies, floor).log()


@dataclass
class FrontendCache:
    """Streaming state of the front end for one audio stream.

    Attributes:
        samples: [CARRY_SAMPLES] int16-scaled tail of the previous step (zeros at the start).
        feature_rows: [CHUNK_OVERLAP_FRAMES, n_mels] last log-mel rows handed on by the previous
            step (zeros, in log-mel space, at the start - the official quirk).
    """

    samples: Tensor
    feature_rows: Tensor

    @classmethod
    def zeros(
        cls, n_mels: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> FrontendCache:
        """A fresh cache for a new stream."""
        return cls(
            samples=torch.zeros(CARRY_SAMPLES, device=device, dtype=dtype),
            feature_rows=torch.zeros(CHUNK_OVERLAP_FRAMES, n_mels, device=device, dtype=dtype),
        )

    def reset(self) -> None:
        """Re-zero both buffers in place (start of a new stream)."""
        self.samples.zero_()
        self.feature_rows.zero_()


def frontend_step(samples: Tensor, cache: FrontendCache) -> tuple[Tensor, FrontendCache]:
    """Turn one 160 ms block of audio into the 19-row feature chunk of the official chunker.

    Args:
        samples: [CHUNK_SAMPLES] float waveform in +-1 at SAMPLE_RATE_HZ.
        cache: carried samples and feature rows; updated in place.

    Returns:
        (chunk [1, CHUNK_FEATURE_ROWS, n_mels], cache).
    """
    if samples.shape != (CHUNK_SAMPLES,):
        raise ValueError(f"frontend_step expects {CHUNK_SAMPLES} samples, got {tuple(samples.shape)}")
    n_mels = cache.feature_rows.shape[-1]
    scaled = samples.to(cache.samples.dtype) * INT16_SCALE
    window = torch.cat([cache.samples, scaled])  # [CARRY + CHUNK] = [2800]
    new_rows = kaldi_fbank(window, n_mels)  # [16, M]
    chunk = torch.cat([cache.feature_rows, new_rows], dim=0)  # [19, M]
    cache.samples = window[-CARRY_SAMPLES:].clone()
    cache.feature_rows = chunk[-CHUNK_OVERLAP_FRAMES:].clone()
    return chunk.unsqueeze(0), cache  # [1, 19, M]


def n_mels_from_train_yaml(cfg: dict, source: Path | str = "train.yaml") -> int:
    """Number of mel bins (`input_dim`) from a parsed train.yaml; ModelLoadError if unusable."""
    value = cfg.get("input_dim") if isinstance(cfg, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelLoadError(f"{source}: `input_dim` must be a positive integer, got {value!r}.")
    return value


def load_json_cmvn(path: Path | str) -> tuple[Tensor, Tensor]:
    """Global CMVN statistics from the JSON `global_cmvn` file (spec section 1.3).

    The arithmetic runs in float64 like the official loader, then rounds to float32.

    Args:
        path: JSON file with `mean_stat`, `var_stat` (sums per bin) and `frame_num`.

    Returns:
        (mean [n_mels], istd [n_mels]) float32.

    Raises:
        ModelLoadError: the file is missing, not JSON, or its statistics are inconsistent.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            stats = json.load(fh)
        mean_stat = torch.tensor(stats["mean_stat"], dtype=torch.float64)
        var_stat = torch.tensor(stats["var_stat"], dtype=torch.float64)
        frame_num = float(stats["frame_num"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{path}: cannot read JSON CMVN statistics ({err}).") from err
    if mean_stat.ndim != 1 or mean_stat.shape != var_stat.shape or not frame_num > 0:
        raise ModelLoadError(
            f"{path}: CMVN `mean_stat`/`var_stat` must be equal-length lists and `frame_num` > 0."
        )
    mean = mean_stat / frame_num
    var = torch.clamp_min(var_stat / frame_num - mean * mean, 1.0e-20)
    return mean.float(), (1.0 / torch.sqrt(var)).float()


class Cmvn(nn.Module):
    """Global mean/variance normalisation `(x - mean) * istd` (buffers `mean`, `istd`)."""

    def __init__(self, n_mels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_mels))
        self.register_buffer("istd", torch.ones(n_mels))

    @classmethod
    def from_stats(cls, mean: Tensor, istd: Tensor) -> Cmvn:
        """Build from (mean, istd) [n_mels] such as `load_json_cmvn` returns."""
        module = cls(mean.shape[0])
        module.mean.copy_(mean)
        module.istd.copy_(istd)
        return module

    def forward(self, x: Tensor) -> Tensor:
        """Normalise [..., n_mels] features."""
        return (x - self.mean) * self.istd
