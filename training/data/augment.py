"""Degradations and sounds without words: background noise, gain, coughs and noise bursts.

Everything here is a pure function of its arguments and a `numpy` generator, so an utterance's
audio follows from its seed. All signals are float32 at 16 kHz.
"""
from __future__ import annotations

import numpy as np
from scipy.signal import butter, sosfilt

from training.data.config import SAMPLE_RATE_HZ

NOISE_COLORS = ("white", "pink", "brown", "hum")
NOISE_EVENTS = ("cough", "burst", "knock", "breath")
PEAK_LIMIT = 0.95  # of full scale, after the gain
_EPS = 1e-12


def _unit_rms(x: np.ndarray) -> np.ndarray:
    return (x / max(float(np.sqrt(np.mean(x**2))), _EPS)).astype(np.float32)


def colored_noise(num_samples: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS background noise: white, pink (1/f), brown (1/f²) or mains hum with harmonics."""
    if num_samples == 0:
        return np.zeros(0, np.float32)
    if color == "hum":
        t = np.arange(num_samples) / SAMPLE_RATE_HZ
        mains_hz = 50.0 if rng.random() < 0.5 else 60.0
        hum = sum(np.sin(2 * np.pi * mains_hz * k * t + rng.uniform(0, 2 * np.pi)) / k for k in (1, 2, 3, 5))
        return _unit_rms(hum + 0.05 * rng.standard_normal(num_samples))
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    freqs = np.fft.rfftfreq(num_samples, d=1.0 / SAMPLE_RATE_HZ)
    freqs[0] = freqs[1] if num_samples > 1 else 1.0
    power = {"white": 0.0, "pink": 0.5, "brown": 1.0}[color]  # amplitude ∝ f^-power
    return _unit_rms(np.fft.irfft(spectrum / freqs**power, n=num_samples))


def speech_rms(samples: np.ndarray) -> float:
    """RMS over the louder half of 20 ms frames, so silences and pauses do not lower it."""
    frame = SAMPLE_RATE_HZ // 50
    usable = samples[: len(samples) // frame * frame].reshape(-1, frame)  # (frames, 320)
    if usable.size == 0:
        return float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0
    energies = np.sort(np.mean(usable**2, axis=1))
    return float(np.sqrt(np.mean(energies[len(energies) // 2:])))


def add_noise(samples: np.ndarray, color: str, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """`samples` plus background noise `snr_db` below the speech level."""
    level = speech_rms(samples) / 10 ** (snr_db / 20)
    return (samples + level * colored_noise(len(samples), color, rng)).astype(np.float32)


def apply_gain(samples: np.ndarray, gain_db: float) -> np.ndarray:
    """Scale by `gain_db`, then scale down if the peak would pass `PEAK_LIMIT` (no clipping)."""
    out = samples * 10 ** (gain_db / 20)
    peak = float(np.abs(out).max()) if out.size else 0.0
    if peak > PEAK_LIMIT:
        out = out * (PEAK_LIMIT / peak)
    return out.astype(np.float32)


def _band(x: np.ndarray, low_hz: float, high_hz: float) -> np.ndarray:
    sos = butter(4, [low_hz, high_hz], btype="bandpass", fs=SAMPLE_RATE_HZ, output="sos")
    return sosfilt(sos, x)


def _envelope(n: int, attack_s: float, decay_s: float) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE_HZ
    return np.minimum(1.0, t / max(attack_s, 1e-4)) * np.exp(-t / decay_s)


def _cough(rng: np.random.Generator) -> np.ndarray:
    """One to three explosive bursts of band-passed noise with a fast attack."""
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        n = int(rng.uniform(0.18, 0.35) * SAMPLE_RATE_HZ)
        low = rng.uniform(200, 500)
        burst = _band(rng.standard_normal(n), low, rng.uniform(2500, 5000)) * _envelope(n, 0.01, 0.08)
        gap = np.zeros(int(rng.uniform(0.05, 0.25) * SAMPLE_RATE_HZ))
        parts += [burst, gap]
    return np.concatenate(parts)


def _burst(rng: np.random.Generator) -> np.ndarray:
    """A rustle, a door or a chair: 0.2–1 s of coloured noise with a random envelope."""
    n = int(rng.uniform(0.2, 1.0) * SAMPLE_RATE_HZ)
    color = NOISE_COLORS[int(rng.integers(3))]
    return colored_noise(n, color, rng) * _envelope(n, rng.uniform(0.005, 0.1), rng.uniform(0.1, 0.5))


def _knock(rng: np.random.Generator) -> np.ndarray:
    """Two to five knocks: damped resonances of a few hundred hertz."""
    parts = []
    for _ in range(int(rng.integers(2, 6))):
        n = int(0.12 * SAMPLE_RATE_HZ)
        t = np.arange(n) / SAMPLE_RATE_HZ
        tone = np.sin(2 * np.pi * rng.uniform(150, 600) * t) * np.exp(-t / 0.02)
        parts += [tone + 0.2 * _band(rng.standard_normal(n), 1000, 6000) * np.exp(-t / 0.005),
                  np.zeros(int(rng.uniform(0.08, 0.3) * SAMPLE_RATE_HZ))]
    return np.concatenate(parts)


def _breath(rng: np.random.Generator) -> np.ndarray:
    """A sigh or breath: slow-rising band-passed noise."""
    n = int(rng.uniform(0.5, 1.2) * SAMPLE_RATE_HZ)
    window = np.hanning(n) ** 0.7
    return _band(rng.standard_normal(n), rng.uniform(300, 800), rng.uniform(2000, 4000)) * window


def noise_event(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A sound without words, peak-normalised to 0.5; `kind` is one of `NOISE_EVENTS`."""
    makers = {"cough": _cough, "burst": _burst, "knock": _knock, "breath": _breath}
    sound = makers[kind](rng)
    return (0.5 * sound / max(float(np.abs(sound).max()), _EPS)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * SAMPLE_RATE_HZ)), np.float32)
