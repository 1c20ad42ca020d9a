"""WORLD vector-quantised codec ("codec_type": "world_vq"): codec ids -> 24 kHz PCM, no neural net.

Each codec id stands for one vector of WORLD vocoder features spanning `samples_per_token`
samples: `frames_per_token` analysis frames of coded spectral envelope (`sp_dims` mel-cepstrum-
like coefficients from `pyworld.code_spectral_envelope`), log f0 (interpolated through unvoiced
frames), a voicing value and coded band aperiodicity. The vectors are normalised per feature,
weighted, and quantised with one k-means codebook; decoding looks the centroid up, undoes the
normalisation and resynthesises with `pyworld.synthesize`. Output length is exactly
`len(tokens) * samples_per_token`, so the engine's windows (spec §8.2/§8.3) work unchanged.

`codec/model.json` carries the settings (`WorldCodecConfig`), `codec/final.pt` the tensors
`codebook` [n_codes, dim], `mean` [dim], `scale` [dim] (std / weight). The analysis side
(`WorldCodec.token_vectors`) lives here too so that training and the engine share one
definition of the features.
"""
from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from quantized_models.checkpoint_file import read_checkpoint
from quantized_models.errors import ModelLoadError
from quantized_models.strict_load import load_strict
from quantized_models.world_codec_net import FeatureDecoder, FeatureDecoderDims

CODEC_TYPE = "world_vq"
CODEBOOK_KEYS = ("codebook", "mean", "scale")
NET_PREFIX = "feature_decoder."  # keys of the optional feature decoder in the codebook file
VOICED_THRESHOLD = 0.5  # a frame is voiced when its decoded voicing value exceeds this
MIN_SPECTRUM = 1e-16  # floor of the decoded power spectrum (WORLD divides by it)
_PYWORLD: ModuleType | None = None


def pyworld() -> ModuleType:
    """The `pyworld` extension module.

    pyworld 0.3.5's `__init__` imports `pkg_resources` only to read its own version, and
    setuptools >= 81 no longer ships that module; the compiled extension itself needs nothing,
    so it is loaded directly when the package import fails for that reason.
    """
    global _PYWORLD
    if _PYWORLD is not None:
        return _PYWORLD
    try:
        import pyworld as module  # type: ignore[import-not-found]
    except ModuleNotFoundError as err:
        if err.name != "pkg_resources":
            raise ModelLoadError("the WORLD codec needs pyworld: pip install pyworld") from err
        module = _load_extension()
    _PYWORLD = module
    return module


def _load_extension() -> ModuleType:
    spec = importlib.util.find_spec("pyworld")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        for path in sorted(Path(folder).glob("pyworld*.so")) + sorted(Path(folder).glob("pyworld*.pyd")):
            ext = importlib.util.spec_from_file_location("pyworld.pyworld", path)
            if ext is None or ext.loader is None:
                continue
            module = importlib.util.module_from_spec(ext)
            ext.loader.exec_module(module)
            return module
    raise ModelLoadError("pyworld is installed without its compiled extension; "
                         "reinstall: pip install pyworld")


@dataclass(frozen=True)
class WorldCodecConfig:
    """`codec/model.json` of a WORLD VQ codec."""

    sampling_rate: int
    """Output (and analysis) sample rate in Hz; 24000 like the released codec."""
    samples_per_token: int
    """Samples of audio per codec id."""
    frames_per_token: int
    """WORLD analysis (and synthesis) frames per codec id."""
    groups_per_token: int
    """Frame groups per id: each group's frames are averaged and the group means stacked into
    the id's vector; decoding interpolates linearly between group centres. Divides
    frames_per_token (equal: plain stacking)."""
    n_codes: int
    """Codebook size (the speech decoder's codec vocabulary)."""
    sp_dims: int
    """Coded spectral-envelope coefficients per frame."""
    f0_floor_hz: float
    """Lowest f0 the pitch tracker searches."""
    f0_ceil_hz: float
    """Highest f0 the pitch tracker searches."""
    weights: tuple[float, float, float, float]
    """Relative weight of (spectral envelope, log f0, voicing, aperiodicity) in the distance."""
    codebook_file: str = "final.pt"
    """File next to model.json with the codebook tensors."""
    feature_decoder: dict[str, int] | None = None
    """Sizes of the feature decoder (`FeatureDecoderDims.to_json`), or None: decode centroids."""
    constant_pitch: bool = False
    """Ids do not code f0: every voiced frame is synthesised at the training speech's mean log
    f0. The codebook's distance then spends nothing on pitch, and the speech decoder need not
    guess a pitch the text does not determine (pocketsphinx heard flat and natural pitch alike)."""

    def feature_decoder_dims(self) -> FeatureDecoderDims | None:
        if self.feature_decoder is None:
            return None
        return FeatureDecoderDims.from_json(self.feature_decoder, self.n_codes, self.frames_per_token,
                                            self.frame_dims)

    @property
    def frame_samples(self) -> int:
        return self.samples_per_token // self.frames_per_token

    @property
    def frame_period_ms(self) -> float:
        return 1000.0 * self.frame_samples / self.sampling_rate

    @property
    def fft_size(self) -> int:
        return int(pyworld().get_cheaptrick_fft_size(self.sampling_rate, self.f0_floor_hz))

    @property
    def n_bands(self) -> int:
        return int(pyworld().get_num_aperiodicities(self.sampling_rate))

    @property
    def frame_dims(self) -> int:
        return self.sp_dims + 2 + self.n_bands  # envelope, log f0, voicing, aperiodicity bands

    @property
    def frames_per_group(self) -> int:
        return self.frames_per_token // self.groups_per_token

    @property
    def vector_dims(self) -> int:
        return self.groups_per_token * self.frame_dims

    @property
    def tokens_per_s(self) -> float:
        return self.sampling_rate / self.samples_per_token

    def to_json(self) -> dict[str, Any]:
        return {
            "codec_type": CODEC_TYPE, "sampling_rate": self.sampling_rate,
            "samples_per_token": self.samples_per_token, "frames_per_token": self.frames_per_token,
            "groups_per_token": self.groups_per_token,
            "n_codes": self.n_codes, "sp_dims": self.sp_dims, "f0_floor_hz": self.f0_floor_hz,
            "f0_ceil_hz": self.f0_ceil_hz, "weights": list(self.weights),
            "codebook_file": self.codebook_file, "feature_decoder": self.feature_decoder,
            "constant_pitch": self.constant_pitch,
        }

    @classmethod
    def from_json(cls, cfg: dict[str, Any], source: str) -> WorldCodecConfig:
        try:
            config = cls(
                sampling_rate=int(cfg["sampling_rate"]), samples_per_token=int(cfg["samples_per_token"]),
                frames_per_token=int(cfg["frames_per_token"]), groups_per_token=int(cfg["groups_per_token"]),
                n_codes=int(cfg["n_codes"]),
                sp_dims=int(cfg["sp_dims"]), f0_floor_hz=float(cfg["f0_floor_hz"]),
                f0_ceil_hz=float(cfg["f0_ceil_hz"]),
                weights=tuple(float(w) for w in cfg["weights"]),  # type: ignore[arg-type]
                codebook_file=str(cfg.get("codebook_file", "final.pt")),
                feature_decoder=cfg.get("feature_decoder"),
                constant_pitch=_flag(cfg.get("constant_pitch", False), "constant_pitch"),
            )
            config.feature_decoder_dims()  # validates its sizes
        except (KeyError, TypeError, ValueError) as err:
            raise ModelLoadError(f"{source}: cannot read the WORLD codec configuration ({err!r})") from err
        config.validate(source)
        return config

    def validate(self, source: str) -> None:
        problems = []
        if self.frames_per_token < 1 or self.samples_per_token % self.frames_per_token:
            problems.append("samples_per_token must be a positive multiple of frames_per_token")
        if self.groups_per_token < 1 or self.frames_per_token % self.groups_per_token:
            problems.append("groups_per_token must divide frames_per_token")
        if self.sampling_rate < 8000 or self.n_codes < 2 or self.sp_dims < 4:
            problems.append("need sampling_rate >= 8000, n_codes >= 2 and sp_dims >= 4")
        if len(self.weights) != 4 or any(w <= 0 for w in self.weights):
            problems.append("weights must be 4 positive numbers")
        if not 0 < self.f0_floor_hz < self.f0_ceil_hz:
            problems.append("need 0 < f0_floor_hz < f0_ceil_hz")
        if problems:
            raise ModelLoadError(f"{source}: unusable WORLD codec config: {'; '.join(problems)}.")


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def normalised_vectors(config: WorldCodecConfig, frames: np.ndarray, mean: np.ndarray,
                       scale: np.ndarray) -> np.ndarray:
    """Frames [T * frames_per_token, frame_dims] -> normalised token vectors [T, vector_dims]:
    group means, normalised; with `constant_pitch` the log-f0 entries are 0 (the mean)."""
    grouped = frames.reshape(-1, config.frames_per_group, config.frame_dims).mean(axis=1)  # [T * G, D]
    vectors = (grouped.reshape(-1, config.vector_dims) - mean) / scale
    if config.constant_pitch:
        vectors[:, config.sp_dims::config.frame_dims] = 0.0
    return vectors


def read_codec_json(path: Path) -> dict[str, Any]:
    """codec/model.json as a dict (ModelLoadError if unreadable)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: cannot read the codec configuration ({err})") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


class WorldCodec(nn.Module):
    """Codec ids <-> WORLD features <-> PCM. An `nn.Module` without parameters, so the loader's
    `.to(device, dtype)` leaves the float64 codebook alone (it is numpy, used on the CPU)."""

    def __init__(self, config: WorldCodecConfig, codebook: np.ndarray, mean: np.ndarray,
                 scale: np.ndarray, feature_decoder: FeatureDecoder | None = None) -> None:
        super().__init__()
        dims = config.vector_dims
        if codebook.shape != (config.n_codes, dims) or mean.shape != (dims,) or scale.shape != (dims,):
            raise ModelLoadError(
                f"WORLD codec tensors do not match model.json: codebook {codebook.shape}, mean "
                f"{mean.shape}, scale {scale.shape}; expected ({config.n_codes}, {dims}) and ({dims},)"
            )
        self.dims = config
        self.codebook = codebook.astype(np.float64)  # [K, D] in normalised, weighted units
        self.mean = mean.astype(np.float64)  # [D]
        self.scale = scale.astype(np.float64)  # [D]: feature = normalised * scale + mean
        self.feature_decoder = feature_decoder

    @property
    def samples_per_token(self) -> int:
        return self.dims.samples_per_token

    # --- analysis (used by training and `encode`) ---

    def frame_features(self, samples: np.ndarray) -> np.ndarray:
        """pcm [S] at sampling_rate -> per-frame features [ceil(S / frame_samples), frame_dims]."""
        cfg, pw = self.dims, pyworld()
        n_frames = max(1, math.ceil(samples.size / cfg.frame_samples))
        x = np.zeros(n_frames * cfg.frame_samples, dtype=np.float64)
        x[: samples.size] = samples
        # Frame i is centred on sample (i + 0.5) * frame_samples: the middle of its own samples.
        times = (np.arange(n_frames) + 0.5) * cfg.frame_samples / cfg.sampling_rate
        f0, _ = pw.dio(x, cfg.sampling_rate, f0_floor=cfg.f0_floor_hz, f0_ceil=cfg.f0_ceil_hz,
                       frame_period=cfg.frame_period_ms)
        f0 = pw.stonemask(x, f0, np.arange(f0.size) * cfg.frame_period_ms / 1000.0, cfg.sampling_rate)
        f0 = np.interp(times, np.arange(f0.size) * cfg.frame_period_ms / 1000.0, f0)
        f0[f0 < cfg.f0_floor_hz] = 0.0  # interpolation towards an unvoiced neighbour
        sp = pw.cheaptrick(x, f0, times, cfg.sampling_rate, f0_floor=cfg.f0_floor_hz, fft_size=cfg.fft_size)
        ap = pw.d4c(x, f0, times, cfg.sampling_rate, fft_size=cfg.fft_size)
        coded_sp = pw.code_spectral_envelope(sp, cfg.sampling_rate, cfg.sp_dims)  # [F, sp_dims]
        coded_ap = pw.code_aperiodicity(ap, cfg.sampling_rate)  # [F, n_bands]
        voiced = (f0 > 0).astype(np.float64)
        return np.concatenate(
            [coded_sp, _interpolated_log_f0(f0, cfg.f0_floor_hz)[:, None], voiced[:, None], coded_ap],
            axis=1,
        )

    def token_vectors(self, samples: np.ndarray) -> np.ndarray:
        """pcm [S] -> normalised token vectors [ceil(S / samples_per_token), vector_dims]."""
        return self.frame_vectors(self.token_frames(self.frame_features(samples), samples.size))

    def token_frames(self, frames: np.ndarray, n_samples: int) -> np.ndarray:
        """Frame features of `n_samples` of pcm -> exactly the frames its ids cover
        [ceil(n_samples / samples_per_token) * frames_per_token, frame_dims] (last frame repeated)."""
        cfg = self.dims
        needed = max(1, math.ceil(n_samples / cfg.samples_per_token)) * cfg.frames_per_token
        pad = needed - frames.shape[0]
        if pad > 0:
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        return frames[:needed]

    def frame_vectors(self, frames: np.ndarray) -> np.ndarray:
        """`token_frames` [T * frames_per_token, frame_dims] -> normalised token vectors [T, vector_dims]."""
        return normalised_vectors(self.dims, frames, self.mean, self.scale)

    def quantize(self, vectors: np.ndarray) -> np.ndarray:
        """Normalised vectors [T, D] -> nearest codebook ids [T] (int64)."""
        book = self.codebook
        dist = (book * book).sum(1)[None, :] - 2.0 * vectors @ book.T  # [T, K] (+ |v|^2, constant)
        return dist.argmin(axis=1).astype(np.int64)

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """pcm [S] at sampling_rate -> ids [ceil(S / samples_per_token)] (int64)."""
        return self.quantize(self.token_vectors(np.asarray(samples, dtype=np.float64)))

    # --- synthesis (what the engine calls) ---

    def synthesize_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Normalised vectors [T, D] -> pcm [T * samples_per_token] float32."""
        cfg = self.dims
        groups = (vectors * self.scale + self.mean).reshape(-1, cfg.frame_dims)  # [T * G, frame_dims]
        return self.synthesize_frames(_interpolate_groups(groups, cfg.frames_per_group))

    def frame_mean_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame normalisation [frame_dims] x 2 (the first group's slice; all groups share it)."""
        d = self.dims.frame_dims
        return self.mean[:d], self.scale[:d]

    def predicted_frames(self, ids: np.ndarray) -> np.ndarray:
        """ids [T] -> feature-decoder frames [T * frames_per_token, frame_dims] (unnormalised)."""
        assert self.feature_decoder is not None
        param = next(self.feature_decoder.parameters())
        with torch.no_grad():
            ids_t = torch.from_numpy(ids).to(param.device).view(1, -1)
            pred = self.feature_decoder(ids_t)[0].double().cpu().numpy()  # [T * F, frame_dims]
        mean, scale = self.frame_mean_scale()
        return pred * scale + mean

    def synthesize_frames(self, frames: np.ndarray) -> np.ndarray:
        """Unnormalised frame features [T * F, frame_dims] -> pcm [T * samples_per_token] float32."""
        cfg, pw = self.dims, pyworld()
        n_tokens = frames.shape[0] // cfg.frames_per_token
        sp_end = cfg.sp_dims
        coded_sp = np.ascontiguousarray(frames[:, :sp_end])
        log_f0, voicing = frames[:, sp_end], frames[:, sp_end + 1]
        if cfg.constant_pitch:
            log_f0 = np.full_like(log_f0, self.mean[sp_end])
        coded_ap = np.ascontiguousarray(frames[:, sp_end + 2:])
        f0 = np.where(voicing > VOICED_THRESHOLD, np.exp(log_f0), 0.0)
        sp = np.maximum(pw.decode_spectral_envelope(coded_sp, cfg.sampling_rate, cfg.fft_size), MIN_SPECTRUM)
        ap = np.clip(pw.decode_aperiodicity(coded_ap, cfg.sampling_rate, cfg.fft_size), 0.001, 1.0)
        # One repeated frame at the end so WORLD's output covers the last frame's samples.
        f0, sp, ap = (np.concatenate([a, a[-1:]]) for a in (f0, sp, ap))
        pcm = pw.synthesize(f0, sp, ap, cfg.sampling_rate, cfg.frame_period_ms)
        out = np.zeros(n_tokens * cfg.samples_per_token, dtype=np.float32)
        # WORLD puts frame i at i * period, ours is centred half a frame later: delay by that.
        shift = cfg.frame_samples // 2
        usable = pcm[: out.size - shift]
        out[shift: shift + usable.size] = usable
        return np.clip(out, -1.0, 1.0)

    def decode_ids(self, ids: np.ndarray) -> np.ndarray:
        """ids [T] -> pcm [T * samples_per_token] float32 in [-1, 1]."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return np.zeros(0, dtype=np.float32)
        if ids.min() < 0 or ids.max() >= self.dims.n_codes:
            raise ValueError(f"codec ids must lie in [0, {self.dims.n_codes}), got {ids.tolist()}.")
        if self.feature_decoder is not None:
            return self.synthesize_frames(self.predicted_frames(ids))
        return self.synthesize_vectors(self.codebook[ids])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: LongTensor [T] -> pcm [T * samples_per_token] float32 (CPU), the WindowDecoder call."""
        return torch.from_numpy(self.decode_ids(tokens.detach().cpu().numpy()))


def _interpolate_groups(groups: np.ndarray, frames_per_group: int) -> np.ndarray:
    """Group means [N, D] -> frames [N * frames_per_group, D], linear between group centres
    (held flat before the first and after the last centre)."""
    if frames_per_group == 1:
        return groups
    n = groups.shape[0]
    pos = (np.arange(n * frames_per_group) - (frames_per_group - 1) / 2) / frames_per_group  # in groups
    pos = np.clip(pos, 0.0, n - 1)
    left = np.minimum(np.floor(pos).astype(np.int64), max(0, n - 2))
    right = np.minimum(left + 1, n - 1)
    frac = (pos - left)[:, None]
    return groups[left] * (1.0 - frac) + groups[right] * frac


def _interpolated_log_f0(f0: np.ndarray, floor_hz: float) -> np.ndarray:
    """log f0 with unvoiced frames filled by linear interpolation between voiced ones."""
    voiced = np.flatnonzero(f0 > 0)
    if voiced.size == 0:
        return np.full(f0.shape, math.log(2.0 * floor_hz))
    return np.interp(np.arange(f0.size), voiced, np.log(f0[voiced]))


def load_world_codec(codec_dir: Path | str) -> WorldCodec:
    """Load `codec_dir/{model.json, <codebook_file>}` of a WORLD VQ codec."""
    codec_dir = Path(codec_dir)
    json_path = codec_dir / "model.json"
    raw = read_codec_json(json_path)
    if raw.get("codec_type") != CODEC_TYPE:
        raise ModelLoadError(f"{json_path}: codec_type is {raw.get('codec_type')!r}, not {CODEC_TYPE!r}")
    config = WorldCodecConfig.from_json(raw, str(json_path))
    path = codec_dir / config.codebook_file
    tensors = read_checkpoint(path, "WORLD codec codebook")
    if not isinstance(tensors, dict) or any(k not in tensors for k in CODEBOOK_KEYS):
        found = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
        raise ModelLoadError(f"{path}: expected the tensors {list(CODEBOOK_KEYS)}, found {found}")
    arrays = {k: torch.as_tensor(tensors[k]).double().numpy() for k in CODEBOOK_KEYS}
    net_state = {k[len(NET_PREFIX):]: v for k, v in tensors.items() if k.startswith(NET_PREFIX)}
    extra = [k for k in tensors if k not in CODEBOOK_KEYS and not k.startswith(NET_PREFIX)]
    if extra:
        raise ModelLoadError(f"{path}: unexpected tensors {sorted(extra)}")
    net_dims = config.feature_decoder_dims()
    net = None
    if net_dims is not None:
        net = FeatureDecoder(net_dims)
        load_strict(net, net_state, path)
    elif net_state:
        raise ModelLoadError(f"{path}: has feature-decoder tensors but model.json has no feature_decoder")
    return WorldCodec(config, arrays["codebook"], arrays["mean"], arrays["scale"], net).eval()


def save_world_codec(codec_dir: Path | str, config: WorldCodecConfig, codebook: np.ndarray,
                     mean: np.ndarray, scale: np.ndarray,
                     feature_decoder: FeatureDecoder | None = None) -> None:
    """Write model.json and the codebook file (float32; the feature decoder's weights inside)."""
    codec_dir = Path(codec_dir)
    codec_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"codebook": torch.from_numpy(np.asarray(codebook, dtype=np.float32)),
               "mean": torch.from_numpy(np.asarray(mean, dtype=np.float32)),
               "scale": torch.from_numpy(np.asarray(scale, dtype=np.float32))}
    if feature_decoder is not None:
        tensors.update({NET_PREFIX + k: v.detach().float().cpu().clone()
                        for k, v in feature_decoder.state_dict().items()})
    torch.save(tensors, codec_dir / config.codebook_file)
    (codec_dir / "model.json").write_text(json.dumps(config.to_json(), indent=2) + "\n", encoding="utf-8")
