"""Listening while speaking, cutting answers, and keeping the history equal to what was heard.

While the assistant speaks, a new user utterance is listened to on a *fork* of the session
(one copy of the LLM cache per barge-in, never per step). Its decision then either
- `respond`: the answer is cut after the tokens whose audio reached the speaker, the LLM
  cache is cropped to match, and the user's turn is replayed on top (`commit_barge_in`); or
- `ignore`: the answer goes on; the user's words are appended to the context once the
  answer has ended (`keep_ignored_turn`, `flush_pending_turns`), so nothing said is lost.
"""
from __future__ import annotations

import copy
import logging

import torch

from assistant.dialogue import DialogueState, Event, next_state
from assistant.engine import Engine
from assistant.session import AnswerState, SessionState
from quantized_models.adapter import AdapterCache
from quantized_models.encoder import EncoderCache
from quantized_models.llm import LlmKvCache

logger = logging.getLogger(__name__)


def heard_tokens(answer: AnswerState, played_samples: int) -> int:
    """Answer tokens whose audio has been played, given the samples played so far.

    Within a segment the tokens are assumed to be spread evenly over its audio (the decoder
    gives no finer alignment); a segment still being synthesised counts by what it produced.
    """
    heard, remaining = 0, max(0, played_samples)
    for segment in answer.spoken:
        if segment.finished and remaining >= segment.samples:
            heard += segment.tokens
            remaining -= segment.samples
            continue
        if segment.samples > 0:
            share = int(segment.tokens * min(remaining, segment.samples) / segment.samples)
            # An unfinished segment has more audio to come for its last token.
            heard += share if segment.finished else min(share, segment.tokens - 1)
        break
    return min(heard, len(answer.tokens))


def cut_answer(engine: Engine, state: SessionState, played_samples: int) -> SessionState:
    """Stop the answer and crop the context to the tokens that were heard."""
    answer = state.answer
    if answer is None:
        return state
    kept = heard_tokens(answer, played_samples)
    suffix = len(engine.models.llm.layout.assistant_suffix_ids)
    state.llm.crop(min(state.llm.seq_length, answer.llm_length_at_start + suffix + kept))
    dropped = len(answer.tokens) - kept
    del answer.tokens[kept:]
    answer.heard_text = engine.models.tokenizer.decode(answer.tokens, skip_special_tokens=True)
    if not answer.finished:
        answer.finished, answer.end_reason, answer.last_token = True, "cancelled", None
    if state.dialogue in (DialogueState.SPEAKING, DialogueState.USER_TURN_ENDED):
        state.dialogue = next_state(state.dialogue, Event.ANSWER_DONE)
    state.speech = None
    logger.debug("answer cut: %d tokens heard, %d dropped", kept, dropped)
    return state


def fork_listener(state: SessionState) -> SessionState:
    """A session that listens to a new user turn on top of the current dialogue."""
    return SessionState(
        frontend=copy.deepcopy(state.frontend),
        encoder=EncoderCache(), adapter=AdapterCache(),
        llm=LlmKvCache(past=copy.deepcopy(state.llm.past), history_ids=list(state.llm.history_ids)),
        rng=state.rng, dialogue=DialogueState.IDLE,
    )


def replay_user_turn(engine: Engine, state: SessionState, vectors: list[torch.Tensor]) -> SessionState:
    """Append a whole user turn (its LLM input vectors) to the context in one LLM call."""
    if not vectors:
        return state
    engine.models.llm.listen(torch.cat(vectors), first_of_turn=True, cache=state.llm)
    state.dialogue = next_state(state.dialogue, Event.AUDIO_CHUNK)
    return state


def commit_barge_in(engine: Engine, main: SessionState, fork: SessionState,
                    played_samples: int) -> SessionState:
    """`respond` heard during the answer: cut it, then make the fork's turn the user's turn."""
    main = cut_answer(engine, main, played_samples)
    main = flush_pending_turns(engine, main)
    main = replay_user_turn(engine, main, fork.turn_vectors)
    main.dialogue = next_state(main.dialogue, Event.MODEL_RESPOND)
    main.frontend = fork.frontend
    main.reset_listening()
    return main


def keep_ignored_turn(main: SessionState, fork: SessionState) -> None:
    """`ignore` heard during the answer: remember the words, let the answer go on."""
    if fork.turn_vectors:
        main.pending_turns.append(list(fork.turn_vectors))
    main.frontend = fork.frontend


def flush_pending_turns(engine: Engine, state: SessionState) -> SessionState:
    """Append remembered ignored turns to an idle dialogue, each closed as ignored."""
    if state.dialogue is not DialogueState.IDLE:
        return state
    while state.pending_turns:
        state = replay_user_turn(engine, state, state.pending_turns.pop(0))
        state.dialogue = next_state(state.dialogue, Event.MODEL_IGNORE)
    return state
