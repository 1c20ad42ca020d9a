"""One spoken turn from a wav file: listen, answer, speak; with a trace and stage timings."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from assistant.daemon_config import DialogueSettings
from assistant.dialogue import Decision, TurnEnd
from assistant.engine import Engine, ListenResult
from assistant.segmentation import Segment
from assistant.session import SessionState
from quantized_models.frontend import CHUNK_SAMPLES, SAMPLE_RATE_HZ

logger = logging.getLogger(__name__)

TRAILING_SILENCE_S = DialogueSettings.silence_end_s
"""With the model's turn end, a file that ends undecided is followed by up to this much silence,
as a live stream is: the daemon waits `dialogue.silence_end_s` after the user stops for the state
head's decision. Many non-queries are ignored only in that silence (the heads are trained and
evaluated with 2 silent chunks after each turn): without it a recorded cough was answered."""


@dataclass
class StageTimes:
    """Wall-clock seconds spent in each stage of the turn."""

    system_prefill_s: float = 0.0
    listen_s: float = 0.0
    text_s: float = 0.0
    speech_s: float = 0.0
    listen_chunks: int = 0
    text_tokens: int = 0
    first_pcm_after_turn_end_s: float | None = None


@dataclass
class TurnResult:
    chunks: list[ListenResult] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    segments: list[dict[str, Any]] = field(default_factory=list)
    pcm: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    answered: bool = True
    end_reason: str = ""
    times: StageTimes = field(default_factory=StageTimes)

    def trace(self, sample_rate_hz: int) -> dict[str, Any]:
        """The `--trace` JSON document."""
        return {
            "chunks": [
                {"probs": list(c.probs), "decision": c.decision.value} for c in self.chunks
            ],
            "tokens": list(self.tokens),
            "text": self.text,
            "segments": self.segments,
            "sample_rate": sample_rate_hz,
        }


def split_chunks(samples: np.ndarray) -> list[torch.Tensor]:
    """Zero-pad to a whole number of 160 ms chunks (as the official driver does) and split."""
    n_chunks = max(1, -(-len(samples) // CHUNK_SAMPLES))
    padded = np.zeros(n_chunks * CHUNK_SAMPLES, dtype=np.float32)
    padded[: len(samples)] = samples
    return [torch.from_numpy(padded[i * CHUNK_SAMPLES:(i + 1) * CHUNK_SAMPLES]) for i in range(n_chunks)]


def _listen(engine: Engine, state: SessionState, samples: np.ndarray, turn_end: TurnEnd,
            result: TurnResult) -> Decision:
    follow = turn_end is TurnEnd.MODEL
    start = time.perf_counter()
    decision = Decision.CONTINUE
    chunks = split_chunks(samples)
    if follow:
        silent_chunks = math.ceil(TRAILING_SILENCE_S * SAMPLE_RATE_HZ / CHUNK_SAMPLES)
        chunks += [torch.zeros(CHUNK_SAMPLES)] * silent_chunks
    for chunk in chunks:
        listened, state = engine.listen_chunk(state, chunk, follow_decision=follow)
        result.chunks.append(listened)
        decision = listened.decision
        if follow and decision is not Decision.CONTINUE:
            break
    result.times.listen_s = time.perf_counter() - start
    result.times.listen_chunks = len(result.chunks)
    return decision if follow else Decision.RESPOND


def _speak(engine: Engine, state: SessionState, segment: Segment, result: TurnResult,
           pieces: list[np.ndarray], turn_end_time: float) -> None:
    start = time.perf_counter()
    for piece in engine.speak_segment(state, segment):
        if result.times.first_pcm_after_turn_end_s is None and piece.numel() > 0:
            result.times.first_pcm_after_turn_end_s = time.perf_counter() - turn_end_time
        pieces.append(piece.float().cpu().numpy())
    speech = state.speech
    assert speech is not None
    result.segments.append({
        "text": speech.text, "tts_text": speech.tts_text,
        "tts_token_ids": list(speech.tts_token_ids), "codec_tokens": list(speech.codec_tokens),
    })
    result.times.speech_s += time.perf_counter() - start


def _answer(engine: Engine, state: SessionState, result: TurnResult) -> None:
    pieces: list[np.ndarray] = []
    turn_end_time = time.perf_counter()
    text_time = 0.0
    step_start = time.perf_counter()
    token_result, state = engine.start_speaking(state)
    while True:
        text_time += time.perf_counter() - step_start
        for segment in token_result.segments:
            _speak(engine, state, segment, result, pieces, turn_end_time)
        if token_result.finished:
            break
        step_start = time.perf_counter()
        token_result, state = engine.next_token(state)
    assert state.answer is not None
    result.tokens = list(state.answer.tokens)
    result.text = state.answer.detokenizer.text
    result.end_reason = state.answer.end_reason
    result.times.text_s = text_time
    result.times.text_tokens = len(result.tokens)
    result.pcm = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)


def run_turn(engine: Engine, samples: np.ndarray, turn_end: TurnEnd, seed: int | None,
             role: str | None = None) -> TurnResult:
    """Run one user turn (16 kHz float mono samples) through a fresh session.

    `turn_end` is FILE (the whole input) or MODEL (stop at the first respond/ignore).
    """
    if turn_end is TurnEnd.VAD:
        raise ValueError("a file turn ends with the file or by the model; VAD turn end is for live audio")
    result = TurnResult()
    state = engine.new_session(seed)
    start = time.perf_counter()
    engine.prefill_system(state, role)
    result.times.system_prefill_s = time.perf_counter() - start
    decision = _listen(engine, state, samples, turn_end, result)
    if decision is Decision.IGNORE:
        result.answered, result.end_reason = False, "ignored"
        return result
    if decision is Decision.CONTINUE:
        logger.info("the state head never ended the turn (%.1f s of silence after the input); "
                    "answering", TRAILING_SILENCE_S)
    _answer(engine, state, result)
    return result
