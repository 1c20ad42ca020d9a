"""The voice catalogue and which voices are held out for the test split.

A voice is a TTS engine plus a speaker: `espeak:<language voice>+<variant>` or `piper:<model>`.
Whole voices are held out: every espeak combination whose language voice is in
`HELD_OUT_LANGUAGE_VOICES` or whose variant is in `HELD_OUT_VARIANTS` is heard only in the test
split, and the test's pitch range is wider than training's. Speed and pitch vary per utterance.

A third set, `UNHEARD_VARIANTS` on the training language voices, is heard by neither train nor
test: `train data --valid-voices unheard` speaks the valid split with it, so choices made on
valid (the state-head refit's operating point, which stage-3 run to keep) are judged on voices
the model never heard, as the test is, without looking at the test.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from training.data.config import VoiceSettings

# English voices of espeak-ng 1.51 (`espeak-ng --voices=en`; the mbrola ones need extra packages).
ESPEAK_LANGUAGE_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp",
                          "en-029", "en-us-nyc", "en-gb-x-gbcwmd")
# Variants under espeak-ng-data/voices/!v that sound like a person (robotic, whispering and
# effect variants left out).
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
                   "Alex", "Andy", "Annie", "adam", "anika", "aunty", "benjamin", "boris", "caleb",
                   "david", "ed", "edward", "grandma", "grandpa", "iven", "john", "linda", "max",
                   "michel", "norbert", "paul", "quincy", "rob", "robert", "shelby", "steph",
                   "travis", "victor", "zac", "Michael", "Mike", "Lee", "Hugo", "Denis", "Gene",
                   "Jacky")
HELD_OUT_LANGUAGE_VOICES = ("en-gb-x-gbcwmd",)  # West Midlands: an accent never heard in training
HELD_OUT_VARIANTS = ("f4", "m7", "grandpa", "linda", "Hugo", "victor")
# Further human-sounding variants of espeak-ng 1.51, in neither list above (echo, flutter and
# robotic variants left out): the valid split's voices under `valid_voices="unheard"`.
UNHEARD_VARIANTS = ("Alicia", "Andrea", "Diogo", "Henrique", "Marco", "Mario", "Nguyen", "antonio",
                    "belinda", "gustave", "marcelo", "miguel", "pedro", "sandro")
PIPER_VOICE = "piper:en_US-joe-medium"


@dataclass(frozen=True)
class Voice:
    """One speaker of one TTS engine."""

    name: str
    """Manifest name: `espeak:en-us+m3`, `piper:en_US-joe-medium` or `noise:<event>`."""
    engine: str
    """`espeak`, `piper` or `noise`."""

    @property
    def espeak_voice(self) -> str:
        """The `-v` argument of espeak-ng (`en-us+m3`)."""
        return self.name.split(":", 1)[1]


def espeak_voices(held_out: bool) -> list[Voice]:
    """All espeak voices of the test split (`held_out`) or of train/valid."""
    voices = []
    for language, variant in itertools.product(ESPEAK_LANGUAGE_VOICES, ESPEAK_VARIANTS):
        is_held_out = language in HELD_OUT_LANGUAGE_VOICES or variant in HELD_OUT_VARIANTS
        if is_held_out == held_out:
            voices.append(Voice(f"espeak:{language}+{variant}", "espeak"))
    return voices


def unheard_voices() -> list[Voice]:
    """Voices of neither train nor test: the training language voices with `UNHEARD_VARIANTS`."""
    return [Voice(f"espeak:{language}+{variant}", "espeak")
            for language, variant in itertools.product(ESPEAK_LANGUAGE_VOICES, UNHEARD_VARIANTS)
            if language not in HELD_OUT_LANGUAGE_VOICES]


@dataclass(frozen=True)
class Delivery:
    """How one utterance is spoken (decided when the run is planned)."""

    voice: Voice
    """The speaker."""
    speed_wpm: int = 175
    """espeak-ng rate, words per minute."""
    pitch: int = 50
    """espeak-ng pitch, 0–99."""
    length_scale: float = 1.0
    """piper phoneme length scale (< 1 is faster)."""


class VoicePicker:
    """Draws a speaker and its speed/pitch per utterance, keeping held-out voices in the test.

    `unheard_rng` draws the valid split's voices when `settings.valid_voices` is "unheard". The
    usual draw is made from `rng` all the same and dropped, so the train and test splits are the
    same as without the option, utterance for utterance.
    """

    def __init__(self, settings: VoiceSettings, use_piper: bool, unheard_rng: np.random.Generator) -> None:
        self.settings = settings
        self.use_piper = use_piper and settings.piper_share > 0
        self.train_voices = espeak_voices(held_out=False)
        self.test_voices = espeak_voices(held_out=True)
        self.unheard_rng, self.unheard_voices = unheard_rng, unheard_voices()

    def pick(self, split: str, rng: np.random.Generator) -> Delivery:
        s = self.settings
        usual = self._usual(split, rng)
        if split == "valid" and s.valid_voices == "unheard":
            return self._espeak(self.unheard_voices, s.test_pitch, self.unheard_rng)
        return usual

    def _usual(self, split: str, rng: np.random.Generator) -> Delivery:
        s = self.settings
        if split != "test" and self.use_piper and rng.random() < s.piper_share:
            scale = float(rng.uniform(*s.piper_length_scale))
            return Delivery(Voice(PIPER_VOICE, "piper"), length_scale=round(scale, 3))
        if split == "test":
            return self._espeak(self.test_voices, s.test_pitch, rng)
        return self._espeak(self.train_voices, s.train_pitch, rng)

    def _espeak(self, voices: list[Voice], pitch: tuple[int, int], rng: np.random.Generator) -> Delivery:
        s = self.settings
        return Delivery(voice=voices[rng.integers(len(voices))],
                        speed_wpm=int(rng.integers(s.speed_wpm[0], s.speed_wpm[1] + 1)),
                        pitch=int(rng.integers(pitch[0], pitch[1] + 1)))
