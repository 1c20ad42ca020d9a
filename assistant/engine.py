"""The streaming Freeze-Omni engine: step functions over a `SessionState`.

Every step takes the session state and returns it; the engine itself holds only the
shared, read-only models and options, so one engine serves any number of sessions.

Steps: `prefill_system` → `listen_chunk` (per 160 ms) → `start_speaking` →
`next_token` (per token, yields finished text segments) → `start_segment` +
`speech_step` (per codec token, yields 24 kHz PCM pieces).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch

from assistant.detokenizer import IncrementalDetokenizer
from assistant.dialogue import (
    Decision,
    DecisionThresholds,
    DialogueState,
    Event,
    decide,
    event_for,
    next_state,
)
from assistant.segmentation import Segment, Segmenter, SegmentationRule, normalize_tts_text
from assistant.session import AnswerState, SessionState, SpeechState, SpokenSegment
from quantized_models.adapter import AdapterCache
from quantized_models import codec_stream as cs
from quantized_models.codec_stream import CodecStreamConfig, CodecStreamState, flush, push_token
from quantized_models.encoder import EncoderCache
from quantized_models.frontend import CHUNK_SAMPLES, FrontendCache, frontend_step
from quantized_models.llm import LlmKvCache
from quantized_models.model_dir import FreezeOmniModels
from quantized_models.sampling import TextSamplingConfig, sample_text_token
from quantized_models.speech_decoder import DecoderCache, mask_non_codec, sample_speech_token, split_llm_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeechEmission:
    """Codec window sizes and quiet-point thresholds (spec §8.2–8.3, §9.3)."""

    first_segment_chunk_tokens: int = cs.OFFLINE_CHUNK_TOKENS
    chunk_tokens: int = cs.OFFLINE_CHUNK_TOKENS
    padding_tokens: int = cs.PADDING_TOKENS
    quiet_window_samples: int = cs.QUIET_WINDOW_SAMPLES
    first_segment_quiet_threshold: float = cs.OFFLINE_THRESHOLD
    quiet_threshold: float = cs.OFFLINE_THRESHOLD

    @classmethod
    def from_server_json(cls, settings: dict) -> "SpeechEmission":
        """The demo server's values (eager segmentation)."""
        return cls(
            first_segment_chunk_tokens=int(
                settings.get("decoder_first_chunk_size", cs.SERVER_FIRST_CHUNK_TOKENS)),
            chunk_tokens=int(settings.get("decoder_chunk_size", cs.OFFLINE_CHUNK_TOKENS)),
            padding_tokens=int(settings.get("decoder_chunk_overlap_size", cs.PADDING_TOKENS)),
            quiet_window_samples=int(settings.get("decoder_N", cs.QUIET_WINDOW_SAMPLES)),
            first_segment_quiet_threshold=float(
                settings.get("decoder_seg_threshold_first_pack", cs.SERVER_FIRST_THRESHOLD)),
            quiet_threshold=float(settings.get("decoder_seg_threshold", cs.SERVER_THRESHOLD)),
        )


@dataclass(frozen=True)
class EngineOptions:
    """Decoding options of one engine (all sessions share them)."""

    text_sampling: TextSamplingConfig = field(
        default_factory=lambda: TextSamplingConfig(temperature=0.7, top_k=5, top_p=0.8)
    )
    speech_top_k: int = 2
    max_new_tokens: int = 128
    """Answer tokens at most, the first one included."""
    max_speech_tokens: int = 1000
    """Codec tokens per text segment at most."""
    max_user_turn_chunks: int = 375
    """A user turn longer than this (160 ms chunks; 375 = 60 s) is answered as it stands."""
    segmentation: SegmentationRule = SegmentationRule.SENTENCE
    thresholds: DecisionThresholds = field(default_factory=DecisionThresholds)
    emission: SpeechEmission = field(default_factory=SpeechEmission)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.max_speech_tokens < 1:
            raise ValueError("max_speech_tokens must be at least 1")
        if self.speech_top_k < 1:
            raise ValueError("speech_top_k must be at least 1")


@dataclass(frozen=True)
class ListenResult:
    logits: torch.Tensor
    """Raw state-head logits of the last position [C]."""
    probs: tuple[float, float, float]
    """P(continue), P(respond), P(ignore)."""
    decision: Decision


@dataclass(frozen=True)
class TokenResult:
    token_id: int | None
    """The new answer token, or None when the answer ended without one."""
    text: str
    """Full answer text so far."""
    segments: list[Segment]
    """Text segments completed by this step, ready for speech."""
    finished: bool


class Engine:
    """Step functions of the Freeze-Omni dialogue over shared, loaded models."""

    def __init__(self, models: FreezeOmniModels, options: EngineOptions) -> None:
        self.models = models
        self.options = options

    # -- sessions ---------------------------------------------------------------
    def new_session(self, seed: int | None = None) -> SessionState:
        rng = torch.Generator(device=self.models.device)
        if seed is None:
            rng.seed()
        else:
            rng.manual_seed(seed)
        return SessionState(
            frontend=FrontendCache.zeros(self.models.n_mels), encoder=EncoderCache(),
            adapter=AdapterCache(),
            llm=LlmKvCache(), rng=rng,
        )

    def prefill_system(self, state: SessionState, role: str | None = None) -> SessionState:
        """Spec 'pre': feed the system header and role."""
        self.models.llm.prefill_system(role, self.models.tokenizer, state.llm)
        state.dialogue = next_state(state.dialogue, Event.SYSTEM_PREFILLED)
        return state

    # -- listening --------------------------------------------------------------
    @torch.inference_mode()
    def listen_chunk(
        self, state: SessionState, samples: torch.Tensor, follow_decision: bool = True
    ) -> tuple[ListenResult, SessionState]:
        """Feed one 160 ms chunk (2560 float samples in ±1 at 16 kHz).

        Args:
            follow_decision: when True a respond/ignore decision ends the user turn;
                when False decisions are only reported (the official offline driver).
        """
        if samples.shape != (CHUNK_SAMPLES,):
            raise ValueError(f"a chunk has {CHUNK_SAMPLES} samples, got {tuple(samples.shape)}")
        first_of_turn = state.turn_chunks == 0
        if first_of_turn:
            state.reset_listening()
        state.dialogue = next_state(state.dialogue, Event.AUDIO_CHUNK)
        models = self.models
        fbank, state.frontend = frontend_step(samples.float().cpu(), state.frontend)
        fbank = fbank.to(device=models.device, dtype=models.dtype)
        vectors, state.encoder, state.adapter = models.backends.speech_input.step(
            fbank, state.encoder, state.adapter
        )
        logits, probs = models.llm.listen(vectors[0], first_of_turn, state.llm)
        state.turn_chunks += 1
        state.turn_vectors.append(vectors[0])
        p = tuple(float(x) for x in probs.tolist())
        decision = decide(p[1], p[2], self.options.thresholds)
        if state.turn_chunks >= self.options.max_user_turn_chunks and decision is Decision.CONTINUE:
            logger.info("user turn reached %d chunks; answering now", state.turn_chunks)
            decision = Decision.RESPOND
        if follow_decision:
            event = event_for(decision)
            if event is not None:
                state.dialogue = next_state(state.dialogue, event)
                state.turn_chunks = 0
        return ListenResult(logits=logits.float().cpu(), probs=p, decision=decision), state

    # -- text generation ----------------------------------------------------------
    @torch.inference_mode()
    def start_speaking(self, state: SessionState) -> tuple[TokenResult, SessionState]:
        """Spec 'ss': close the user turn, feed the assistant suffix, sample the first token."""
        if state.dialogue is DialogueState.LISTENING:
            state.dialogue = next_state(state.dialogue, Event.RESPONSE_REQUESTED)
        if state.dialogue is not DialogueState.USER_TURN_ENDED:
            raise ValueError(f"cannot start speaking in state {state.dialogue.name}")
        state.reset_listening()
        state.answer = AnswerState(
            detokenizer=IncrementalDetokenizer(self.models.tokenizer),
            segmenter=Segmenter(self.options.segmentation),
            llm_length_at_start=state.llm.seq_length,
        )
        logits, hidden = self.models.llm.start_answer(state.llm)
        return self._accept_token(state, logits, hidden), state

    @torch.inference_mode()
    def next_token(self, state: SessionState) -> tuple[TokenResult, SessionState]:
        """Spec 'cs': feed the last token and sample the next one."""
        answer = state.answer
        if answer is None or answer.finished or answer.last_token is None:
            raise ValueError("no answer in progress")
        logits, hidden = self.models.llm.feed_token(answer.last_token, state.llm)
        return self._accept_token(state, logits, hidden), state

    def _accept_token(
        self, state: SessionState, logits: torch.Tensor, hidden: torch.Tensor
    ) -> TokenResult:
        answer = state.answer
        assert answer is not None
        token = sample_text_token(logits, self.options.text_sampling, state.rng)
        if token == self.models.llm.layout.end_of_turn_id:
            return self._finish_answer(state, "end_of_turn", None)
        answer.tokens.append(token)
        answer.last_token = token
        state.dialogue = next_state(state.dialogue, Event.ANSWER_TOKEN)
        text = answer.detokenizer.push(token)
        segment = answer.segmenter.push(text, hidden.detach())
        if len(answer.tokens) >= self.options.max_new_tokens:
            return self._finish_answer(state, "token_cap", token, [segment] if segment else [])
        return TokenResult(token, text, [segment] if segment else [], finished=False)

    def _finish_answer(
        self, state: SessionState, reason: str, token: int | None, done: list[Segment] | None = None
    ) -> TokenResult:
        answer = state.answer
        assert answer is not None
        answer.finished, answer.end_reason, answer.last_token = True, reason, None
        state.dialogue = next_state(state.dialogue, Event.ANSWER_DONE)
        segments = list(done or [])
        leftover = answer.segmenter.finish()
        if leftover is not None and leftover.hidden_states:
            segments.append(leftover)
        logger.debug("answer finished (%s) after %d tokens", reason, len(answer.tokens))
        return TokenResult(token, answer.detokenizer.text, segments, finished=True)

    # -- speech -------------------------------------------------------------------
    @torch.inference_mode()
    def start_segment(self, state: SessionState, segment: Segment) -> SessionState:
        """Prefill the speech decoder for one text segment (spec §6.3, §7.2 steps 1–5)."""
        models = self.models
        tts_text = normalize_tts_text(segment.text)
        ids = models.tokenizer.encode(tts_text, add_special_tokens=False)
        if not ids or not segment.hidden_states:
            return self._silent_segment(state, segment, tts_text)
        like = models.llm.heads.prompt_embeddings.weight
        idim = models.decoder.dims.idim
        text_rows = split_llm_rows(models.llm.embed_tokens(ids, like), idim)  # (4n, idim)
        hidden = torch.stack(segment.hidden_states).to(like.dtype)  # (k, H)
        prefix_rows = split_llm_rows(hidden, idim)  # (4k, idim)
        cache = DecoderCache(max_new_tokens=self.options.max_speech_tokens)
        decoder_cache = models.backends.decoder.prefill(text_rows, prefix_rows, cache)
        # The demo server's "first segment" settings apply to the answer's first segment.
        first = state.answer is None or not state.answer.spoken
        emission = self.options.emission
        codec_state = CodecStreamState(CodecStreamConfig(
            samples_per_token=models.backends.codec.samples_per_token,
            chunk_tokens=emission.first_segment_chunk_tokens if first else emission.chunk_tokens,
            padding_tokens=emission.padding_tokens,
            quiet_window_samples=emission.quiet_window_samples,
            threshold=emission.first_segment_quiet_threshold if first else emission.quiet_threshold,
        ))
        state.speech = SpeechState(
            decoder=decoder_cache, codec=codec_state, text=segment.text, tts_text=tts_text,
            tts_token_ids=list(ids), top_k=self.options.speech_top_k,
            max_tokens=self.options.max_speech_tokens,
        )
        if state.answer is not None:
            state.answer.spoken.append(SpokenSegment(tokens=len(segment.hidden_states)))
        return state

    def _silent_segment(self, state: SessionState, segment: Segment, tts_text: str) -> SessionState:
        """A segment with no text to speak (official crash case, spec §14.4): no audio."""
        logger.debug("segment %r has nothing to speak", segment.text)
        state.speech = SpeechState(
            decoder=DecoderCache(max_new_tokens=1), codec=CodecStreamState(CodecStreamConfig(
                samples_per_token=self.models.backends.codec.samples_per_token)),
            text=segment.text, tts_text=tts_text, tts_token_ids=[], top_k=self.options.speech_top_k,
            max_tokens=0, done=True, end_reason="empty",
        )
        if state.answer is not None:
            state.answer.spoken.append(SpokenSegment(tokens=len(segment.hidden_states), finished=True))
        return state

    @torch.inference_mode()
    def speech_step(self, state: SessionState) -> tuple[list[torch.Tensor], SessionState]:
        """Generate one codec token; returns the PCM pieces (24 kHz float) released by it."""
        speech = state.speech
        if speech is None or speech.done:
            raise ValueError("no speech segment in progress")
        decoder = self.models.backends.decoder
        previous = speech.codec_tokens[-1] if speech.codec_tokens else decoder.dims.sos_id
        logits, speech.decoder = decoder.step(previous, speech.decoder)
        token = sample_speech_token(mask_non_codec(logits, decoder.dims), speech.top_k, state.rng)
        if token == decoder.dims.eos_id:
            pieces = self._finish_segment(state, "eos")
            self._count_audio(state, pieces)
            return pieces, state
        speech.codec_tokens.append(token)
        pieces = push_token(speech.codec, token, self.models.backends.codec)
        if len(speech.codec_tokens) >= speech.max_tokens:
            pieces += self._finish_segment(state, "token_cap")
        self._count_audio(state, pieces)
        return pieces, state

    @staticmethod
    def _count_audio(state: SessionState, pieces: list[torch.Tensor]) -> None:
        if state.answer is not None and state.answer.spoken:
            current = state.answer.spoken[-1]
            current.samples += sum(int(p.numel()) for p in pieces)
            current.finished = state.speech is not None and state.speech.done

    def _finish_segment(self, state: SessionState, reason: str) -> list[torch.Tensor]:
        speech = state.speech
        assert speech is not None
        speech.done, speech.end_reason = True, reason
        return flush(speech.codec, self.models.backends.codec)

    def speak_segment(self, state: SessionState, segment: Segment) -> Iterator[torch.Tensor]:
        """Convenience: all PCM pieces of one segment, as they are released."""
        self.start_segment(state, segment)
        assert state.speech is not None
        while not state.speech.done:
            pieces, state = self.speech_step(state)
            yield from pieces
