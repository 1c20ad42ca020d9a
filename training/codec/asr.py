"""Word error rate with the offline recognizer pocketsphinx (its wheel's English model)."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from audio_io.resample import resample
from quantized_models.errors import ModelLoadError
from training.eval import normalise_words, word_errors

logger = logging.getLogger(__name__)

ASR_RATE_HZ = 16_000  # pocketsphinx's en-us acoustic model is trained on 16 kHz speech


class Recognizer:
    """One pocketsphinx decoder, reused for every utterance (loading it takes about 1 s).

    Its feature front end is reset before each utterance: without that, a transcript depended on
    the utterances heard before it (29 of 132 ordered pairs of 12 espeak utterances changed), so
    every WER moved with evaluation order. `reinit_feat` costs milliseconds; a fresh decoder per
    utterance (0.25 s) gives the same transcripts.
    """

    def __init__(self) -> None:
        try:
            from pocketsphinx import Decoder
        except ImportError as err:
            raise ModelLoadError("the codec evaluation needs pocketsphinx: pip install pocketsphinx") from err
        self._decoder: Any = Decoder(samprate=ASR_RATE_HZ, loglevel="FATAL")

    def transcribe(self, samples: np.ndarray, rate_hz: int) -> str:
        """Transcript of float pcm [S] at `rate_hz` (resampled to 16 kHz)."""
        samples = resample(samples, rate_hz, ASR_RATE_HZ)
        pcm16 = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        dec = self._decoder
        dec.reinit_feat()  # forget the previous utterances' feature statistics
        dec.start_utt()
        dec.process_raw(pcm16, full_utt=True)
        dec.end_utt()
        hyp = dec.hyp()
        return hyp.hypstr if hyp is not None else ""

    def errors(self, samples: np.ndarray, rate_hz: int, reference: str) -> tuple[int, int]:
        """(word errors, reference words) of one utterance."""
        ref = normalise_words(reference)
        hyp = normalise_words(self.transcribe(samples, rate_hz))
        logger.debug("ref: %s | hyp: %s", " ".join(ref), " ".join(hyp))
        return word_errors(hyp, ref), len(ref)
