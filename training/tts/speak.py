"""Speak a given text through the engine's real speech path (`freeze-omni say`).

The text is teacher-forced as the assistant's answer (`training.tts.teacher`), so the speech
decoder gets what it gets in a dialogue: each segment's re-tokenised text and the LLM's hidden
states as prefix. Segments then go through `Engine.start_segment` / `speech_step`: decoder AR
steps, codec windows and quiet-point emission, as in `freeze-omni respond`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from assistant.detokenizer import IncrementalDetokenizer
from assistant.engine import Engine
from assistant.segmentation import Segment
from assistant.session import AnswerState
from training.tts.teacher import teacher_forced_segments

logger = logging.getLogger(__name__)


@dataclass
class SpokenText:
    """What `say_text` produced."""

    pcm: np.ndarray
    """[S] float32 at the codec's rate."""
    segments: list[dict] = field(default_factory=list)
    """Per segment: text, tts_text, codec_tokens, end_reason (`eos`, `token_cap` or `empty`)."""


def say_text(engine: Engine, text: str, question: str | None = None, seed: int | None = 0,
             role: str | None = None) -> SpokenText:
    """Synthesize `text` as the answer (to `question`, if given) through the engine."""
    if not text.strip():
        raise ValueError("nothing to say: the text is empty")
    models = engine.models
    segments = teacher_forced_segments(models.llm.causal_lm, models.tokenizer, models.llm.layout, text,
                                       question, role, engine.options.segmentation)
    return speak_segments(engine, segments, seed)


def speak_segments(engine: Engine, segments: list[Segment], seed: int | None = 0) -> SpokenText:
    """The engine's speech for the segments of one answer, in a fresh session."""
    models = engine.models
    state = engine.new_session(seed)
    # An answer record makes the engine apply its first-segment emission settings once.
    state.answer = AnswerState(detokenizer=IncrementalDetokenizer(models.tokenizer),
                               segmenter=None)  # type: ignore[arg-type]
    pieces: list[np.ndarray] = []
    out = SpokenText(np.zeros(0, dtype=np.float32))
    for segment in segments:
        hidden = [h.to(device=models.device, dtype=models.dtype) for h in segment.hidden_states]
        for piece in engine.speak_segment(state, Segment(segment.text, hidden)):
            pieces.append(piece.float().cpu().numpy())
        speech = state.speech
        assert speech is not None
        out.segments.append({"text": speech.text, "tts_text": speech.tts_text,
                             "codec_tokens": list(speech.codec_tokens), "end_reason": speech.end_reason})
    out.pcm = np.concatenate(pieces) if pieces else out.pcm
    logger.info("said %d segments, %.2f s", len(out.segments), out.pcm.size / codec_rate_hz(engine))
    return out


def codec_rate_hz(engine: Engine) -> int:
    """Sample rate of the engine's codec output."""
    return int(engine.models.codec.dims.sampling_rate)


@torch.inference_mode()
def say_to_wav(engine: Engine, text: str, path: Path | str, question: str | None = None,
               seed: int | None = 0) -> SpokenText:
    """`say_text` and write a 16-bit mono wav at the codec's rate."""
    from audio_io.wav_file import write_pcm16

    spoken = say_text(engine, text, question, seed)
    write_pcm16(path, spoken.pcm, codec_rate_hz(engine))
    return spoken
