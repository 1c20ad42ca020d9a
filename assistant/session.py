"""Per-session state: every cache of one dialogue, owned by the session, not by the models.

Because nothing of a dialogue lives inside the shared models, any executor can serve
any session's next step ("model as a server", spec §10.1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from assistant.detokenizer import IncrementalDetokenizer
from assistant.dialogue import DialogueState
from assistant.segmentation import Segmenter
from quantized_models.adapter import AdapterCache
from quantized_models.codec_stream import CodecStreamState
from quantized_models.encoder import EncoderCache
from quantized_models.frontend import FrontendCache
from quantized_models.llm import LlmKvCache
from quantized_models.speech_decoder import DecoderCache


@dataclass
class AnswerState:
    """The answer being generated."""

    detokenizer: IncrementalDetokenizer
    segmenter: Segmenter
    tokens: list[int] = field(default_factory=list)
    """Generated answer token ids (the end-of-turn token is never included)."""
    last_token: int | None = None
    """Token to feed at the next step (None before the first one)."""
    finished: bool = False
    end_reason: str = ""
    """'end_of_turn', 'token_cap' or 'cancelled' once finished."""
    llm_length_at_start: int = 0
    """LLM cache length before the assistant suffix: where a cut answer is cropped."""
    heard_text: str | None = None
    """After a cut: the text of the answer tokens that were played."""
    spoken: list["SpokenSegment"] = field(default_factory=list)
    """Per text segment handed to speech: its answer tokens and the PCM emitted so far."""


@dataclass
class SpokenSegment:
    """How many answer tokens one text segment covers and how much audio it produced."""

    tokens: int
    samples: int = 0
    finished: bool = False


@dataclass
class SpeechState:
    """Speech decoder and codec state of the text segment being spoken."""

    decoder: DecoderCache
    codec: CodecStreamState
    text: str
    """Segment text as generated."""
    tts_text: str
    """Normalised text that was re-tokenised for the decoder."""
    tts_token_ids: list[int]
    top_k: int
    max_tokens: int
    codec_tokens: list[int] = field(default_factory=list)
    done: bool = False
    end_reason: str = ""
    """'eos' or 'token_cap' once done."""


@dataclass
class SessionState:
    """Everything one dialogue needs between two steps."""

    frontend: FrontendCache
    encoder: EncoderCache
    adapter: AdapterCache
    llm: LlmKvCache
    rng: torch.Generator
    """Random stream for text and speech sampling (seeded per session)."""
    dialogue: DialogueState = DialogueState.NEW
    turn_chunks: int = 0
    """Chunks fed in the current user turn (0: the next chunk opens a turn)."""
    turn_vectors: list[torch.Tensor] = field(default_factory=list)
    """LLM input vectors [2, H] of the current user turn, kept to replay the turn elsewhere
    (barge-in commits it on top of the cut answer); bounded by the turn length cap."""
    pending_turns: list[list[torch.Tensor]] = field(default_factory=list)
    """Ignored user turns heard while speaking; appended to the context when the answer ends."""
    answer: AnswerState | None = None
    speech: SpeechState | None = None

    def reset_listening(self) -> None:
        """Fresh encoder/adapter caches and positional index for a new user turn (spec §5)."""
        self.encoder.reset()
        self.adapter.reset()
        self.turn_chunks = 0
        self.turn_vectors = []
