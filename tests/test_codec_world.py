"""WORLD VQ codec: encode/decode contract, folder round trips through both loaders, streaming
windows, and a resynthesis check that fails when the codec loses the signal."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quantized_models.codec_stream import CodecStreamConfig, CodecStreamState, flush, push_token
from quantized_models.errors import ModelLoadError
from quantized_models.model_dir import load_codec_folder
from quantized_models.world_codec import WorldCodec, WorldCodecConfig, load_world_codec, pyworld, save_world_codec
from training.codec import load_codec_encoder
from training.codec.fit import FitSettings, fit_codec

RATE_HZ = 24_000
ARTIFACT = Path(__file__).resolve().parents[1] / "training" / "artifacts" / "codec"


def _voice(seconds: float, f0_hz: float, formant_hz: float, seed: int) -> np.ndarray:
    """A buzzy vowel-like signal: harmonics of a gliding f0 shaped by one moving formant,
    with a noise burst in the middle (so voicing and aperiodicity change)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE_HZ)) / RATE_HZ
    f0 = f0_hz * (1.0 + 0.3 * np.sin(2 * np.pi * 1.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / RATE_HZ
    formant = formant_hz * (1.0 + 0.5 * np.sin(2 * np.pi * 0.7 * t + seed))
    x = sum(np.sin(k * phase) * np.exp(-(((k * f0) - formant) / 400.0) ** 2) for k in range(1, 40))
    x = x / np.abs(x).max() * 0.5
    burst = (t > seconds * 0.45) & (t < seconds * 0.55)
    x[burst] = 0.2 * rng.standard_normal(int(burst.sum()))
    return x.astype(np.float32)


def _config(feature_decoder: bool) -> WorldCodecConfig:
    return WorldCodecConfig(
        sampling_rate=RATE_HZ, samples_per_token=480, frames_per_token=4, groups_per_token=1,
        n_codes=32, sp_dims=20, f0_floor_hz=60.0, f0_ceil_hz=400.0, weights=(1.0, 0.5, 0.5, 0.5),
        feature_decoder=(
            {"embed_dims": 16, "channels": 24, "kernel": 3, "layers": 2} if feature_decoder else None
        ),
    )


@pytest.fixture(scope="module")
def signals() -> list[np.ndarray]:
    return [_voice(1.0, 90.0 + 15 * i, 700.0 + 150 * i, i) for i in range(4)]


@pytest.fixture(scope="module")
def codec(signals: list[np.ndarray]) -> WorldCodec:
    settings = FitSettings(kmeans_iters=8, net_steps=120, net_crop_tokens=16, net_batch=8, net_lr=5e-3)
    fitted, _ = fit_codec(_config(True), signals[:3], settings, seed=0)
    return fitted


@pytest.fixture(scope="module")
def codec_dir(codec: WorldCodec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "codec"
    save_world_codec(folder, codec.dims, codec.codebook, codec.mean, codec.scale, codec.feature_decoder)
    return folder


def test_encode_decode_shapes_and_determinism(codec_dir: Path, signals: list[np.ndarray]) -> None:
    enc = load_codec_encoder(codec_dir)
    assert (enc.sample_rate_hz, enc.samples_per_token) == (24_000, 480)
    assert (enc.n_codes, enc.tokens_per_s) == (32, 50.0)
    x = signals[3][:10_000]
    ids = enc.encode_wav(x, RATE_HZ)
    assert ids.dtype == np.int64 and ids.shape == (21,)  # ceil(10000 / 480)
    assert 0 <= ids.min() and ids.max() < 32
    np.testing.assert_array_equal(ids, enc.encode_wav(x, RATE_HZ))
    pcm = enc.decode(ids)
    assert pcm.dtype == np.float32 and pcm.shape == (21 * 480,) and np.abs(pcm).max() <= 1.0
    np.testing.assert_array_equal(pcm, enc.decode(ids))
    ids_16k = enc.encode_wav(x[::3].copy(), 8_000)  # other rates are resampled first
    assert ids_16k.shape == (21,)


def test_folder_round_trip_through_the_engine_loader(codec: WorldCodec, codec_dir: Path) -> None:
    loaded = load_codec_folder(codec_dir)
    assert isinstance(loaded, WorldCodec) and loaded.samples_per_token == 480
    assert loaded.dims.sampling_rate == RATE_HZ and loaded.dims.n_codes == 32
    ids = torch.tensor([0, 5, 7, 7, 31, 2])
    torch.testing.assert_close(loaded.decode(ids), codec.decode(ids), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="codec ids"):
        loaded.decode(torch.tensor([32]))


def test_loader_errors(codec_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "codec"
    bad.mkdir()
    cfg = json.loads((codec_dir / "model.json").read_text())
    (bad / "model.json").write_text(json.dumps({**cfg, "codec_type": "nope"}))
    with pytest.raises(ModelLoadError, match="unknown codec_type"):
        load_codec_folder(bad)
    (bad / "model.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_world_codec(bad)
    (bad / "model.json").write_text(json.dumps({**cfg, "n_codes": 64}))
    (bad / "final.pt").write_bytes((codec_dir / "final.pt").read_bytes())
    with pytest.raises(ModelLoadError):
        load_world_codec(bad)
    with pytest.raises(ModelLoadError, match="not a codec folder"):
        load_codec_encoder(tmp_path / "missing")


def test_streaming_windows_cover_every_token(codec: WorldCodec, signals: list[np.ndarray]) -> None:
    ids = codec.encode(signals[3])  # 50 ids: one first window (20 + 10) and a second
    state = CodecStreamState(CodecStreamConfig(codec.samples_per_token, chunk_tokens=20))
    pieces = [p for t in ids for p in push_token(state, int(t), codec)] + flush(state, codec)
    streamed = torch.cat(pieces)
    assert streamed.numel() == ids.size * codec.samples_per_token
    whole = codec.decode(torch.from_numpy(ids))
    # WORLD restarts its pulse train per window, so samples differ; the energy must not.
    ratio = float(streamed.pow(2).mean() / whole.pow(2).mean())
    assert 0.7 < ratio < 1.4, ratio


def _log_spectrum(x: np.ndarray) -> np.ndarray:
    """Log energy in 32 bands of 375 Hz per 10 ms frame (an envelope, not the harmonics)."""
    frames = np.lib.stride_tricks.sliding_window_view(x, 512)[::240] * np.hanning(512)
    power = np.abs(np.fft.rfft(frames, axis=1))[:, :256] ** 2  # [frames, 256]
    return np.log(power.reshape(power.shape[0], 32, 8).sum(axis=2) + 1e-6)  # [frames, 32]


@pytest.mark.parametrize("with_net", [pytest.param(True, id="feature-decoder"),
                                      pytest.param(False, id="centroids")])
def test_resynthesis_beats_scrambled_ids(codec: WorldCodec, signals: list[np.ndarray],
                                         with_net: bool) -> None:
    codec = codec if with_net else WorldCodec(codec.dims, codec.codebook, codec.mean, codec.scale)
    x = signals[3]
    ids = codec.encode(x)
    scrambled = np.random.default_rng(0).permutation(ids)
    ref = _log_spectrum(x)
    good = np.abs(_log_spectrum(codec.decode_ids(ids)[: x.size]) - ref).mean()
    bad = np.abs(_log_spectrum(codec.decode_ids(scrambled)[: x.size]) - ref).mean()
    assert good < 0.85 * bad, (good, bad)


@pytest.mark.skipif(not (ARTIFACT / "model.json").is_file(), reason="no committed codec artifact")
def test_committed_artifact_loads() -> None:
    enc = load_codec_encoder(ARTIFACT)
    assert enc.sample_rate_hz == 24_000 and enc.n_codes == 1024
    pcm = enc.decode(np.arange(0, 1024, 97))
    assert pcm.shape == (11 * enc.samples_per_token,) and np.isfinite(pcm).all()


def _voiced_log_f0(x: np.ndarray) -> np.ndarray:
    """log f0 of the voiced 5 ms frames of pcm at RATE_HZ (DIO, as the codec analyses)."""
    f0, _ = pyworld().dio(x.astype(np.float64), RATE_HZ, f0_floor=60.0, f0_ceil=400.0, frame_period=5.0)
    return np.log(f0[f0 > 0])


def test_constant_pitch_codes_no_f0_and_speaks_at_the_mean_pitch(
        codec: WorldCodec, signals: list[np.ndarray], tmp_path: Path) -> None:
    config = dataclasses.replace(_config(False), constant_pitch=True)
    flat, _ = fit_codec(config, signals[:3], FitSettings(kmeans_iters=8, net_steps=0), seed=0)
    save_world_codec(tmp_path / "codec", config, flat.codebook, flat.mean, flat.scale)
    loaded = load_codec_folder(tmp_path / "codec")
    assert isinstance(loaded, WorldCodec) and loaded.dims.constant_pitch
    sp = config.sp_dims
    np.testing.assert_array_equal(loaded.codebook[:, sp], 0.0)  # k-means saw no pitch
    assert (loaded.frame_vectors(loaded.token_frames(loaded.frame_features(signals[3].astype(np.float64)),
                                                     signals[3].size))[:, sp] == 0).all()
    x = signals[3]  # f0 glides +-30 % around 135 Hz
    flat_f0 = _voiced_log_f0(loaded.decode_ids(loaded.encode(x)))
    coded_f0 = _voiced_log_f0(WorldCodec(codec.dims, codec.codebook, codec.mean, codec.scale).decode_ids(
        codec.encode(x)))
    assert abs(np.median(flat_f0) - loaded.mean[sp]) < 0.05, (np.exp(np.median(flat_f0)), np.exp(loaded.mean[sp]))
    assert flat_f0.std() < 0.05 < 0.1 < coded_f0.std(), (flat_f0.std(), coded_f0.std())
    cfg = json.loads((tmp_path / "codec" / "model.json").read_text())
    assert cfg["constant_pitch"] is True
    (tmp_path / "codec" / "model.json").write_text(json.dumps({**cfg, "constant_pitch": "yes"}))
    with pytest.raises(ModelLoadError, match="constant_pitch must be true or false"):
        load_codec_folder(tmp_path / "codec")
