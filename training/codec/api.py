"""`load_codec_encoder(codec_dir)`: audio <-> codec ids with a trained WORLD VQ or piper-unit codec (see __init__)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from audio_io.resample import resample as resample_audio
from quantized_models.errors import ModelLoadError
from quantized_models.piper_unit_codec import CODEC_TYPE as UNIT_CODEC_TYPE
from quantized_models.piper_unit_codec import PiperUnitCodec, load_piper_unit_codec
from quantized_models.world_codec import CODEC_TYPE as WORLD_CODEC_TYPE
from quantized_models.world_codec import WorldCodec, load_world_codec, read_codec_json


def resample(samples: np.ndarray, rate_hz: int, target_hz: int) -> np.ndarray:
    """Mono float32 [S'] at `target_hz` (the project's one polyphase resampler)."""
    return resample_audio(np.asarray(samples, dtype=np.float32).reshape(-1), int(rate_hz), int(target_hz))


class CodecEncoder:
    """Encode speech to codec ids and decode ids to speech, both at the codec's settings."""

    def __init__(self, codec: WorldCodec | PiperUnitCodec) -> None:
        self.codec = codec

    @property
    def n_codes(self) -> int:
        return self.codec.dims.n_codes

    @property
    def samples_per_token(self) -> int:
        return self.codec.dims.samples_per_token

    @property
    def sample_rate_hz(self) -> int:
        return self.codec.dims.sampling_rate

    @property
    def tokens_per_s(self) -> float:
        return self.codec.dims.tokens_per_s

    @property
    def codebook(self) -> np.ndarray:
        """[n_codes, D] code vectors in the space the ids were clustered in (WORLD: normalised and
        weighted features; piper units: the voice's prior frames)."""
        return self.codec.codebook

    def encode_wav(self, samples: np.ndarray, rate_hz: int) -> np.ndarray:
        """Mono float pcm [S] at `rate_hz` -> ids int64: ceil(S * sample_rate_hz / rate_hz / spt) of
        them for WORLD; for piper units one per voice frame, ceil(S * voice_rate_hz / rate_hz / hop)."""
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be positive, got {rate_hz}")
        if isinstance(self.codec, PiperUnitCodec):  # straight to the voice's rate: one resampling only
            return self.codec.encode_voice_rate(resample(samples, rate_hz, self.codec.dims.voice_rate_hz))
        return self.codec.encode(resample(samples, rate_hz, self.sample_rate_hz))

    def decode(self, tokens: np.ndarray | Sequence[int]) -> np.ndarray:
        """ids [T] -> float32 pcm [T * samples_per_token] at sample_rate_hz."""
        return self.codec.decode_ids(np.asarray(tokens, dtype=np.int64))


def load_codec_encoder(codec_dir: Path | str) -> CodecEncoder:
    """The codec in `codec_dir` (a model's `codec/` folder: model.json + final.pt).

    Raises:
        ModelLoadError: the folder or a file is missing, or not a codec that can encode
            (WORLD VQ or piper units; the released TiCodec has no encoder here).
    """
    codec_dir = Path(codec_dir)
    if not (codec_dir / "model.json").is_file():
        raise ModelLoadError(f"{codec_dir} is not a codec folder: {codec_dir / 'model.json'} is missing "
                             "(train one with: freeze-omni train unit-codec --out DIR)")
    codec_type = read_codec_json(codec_dir / "model.json").get("codec_type")
    if codec_type == UNIT_CODEC_TYPE:
        return CodecEncoder(load_piper_unit_codec(codec_dir))
    if codec_type == WORLD_CODEC_TYPE:
        return CodecEncoder(load_world_codec(codec_dir))
    raise ModelLoadError(f"{codec_dir / 'model.json'}: codec_type {codec_type!r} cannot encode audio here "
                         f"(known: {UNIT_CODEC_TYPE!r}, {WORLD_CODEC_TYPE!r})")
