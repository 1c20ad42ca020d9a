"""Barge-in on the official tiny model: cut answers keep only what was heard, nothing said is lost."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import soundfile
import torch

from assistant.barge_in import (
    commit_barge_in,
    cut_answer,
    flush_pending_turns,
    fork_listener,
    heard_tokens,
    keep_ignored_turn,
)
from assistant.dialogue import DialogueState
from assistant.engine import Engine, EngineOptions
from assistant.respond import split_chunks
from assistant.session import SpokenSegment
from quantized_models.model_dir import load_models
from quantized_models.sampling import TextSamplingConfig

GREEDY = TextSamplingConfig(temperature=1.0, top_k=1, top_p=0.0)


@pytest.fixture(scope="module")
def engine(tiny_dir) -> Engine:
    models = load_models(tiny_dir / "checkpoints", tiny_dir / "llm", torch.device("cpu"), torch.float32)
    return Engine(models, EngineOptions(text_sampling=GREEDY, speech_top_k=1, max_new_tokens=24,
                                        max_speech_tokens=120))


@pytest.fixture(scope="module")
def chunks(tiny_dir):
    out = {}
    for name in ("question", "question_noise_question"):
        samples, _ = soundfile.read(tiny_dir / f"inputs/{name}.wav", dtype="float32")
        out[name] = split_chunks(samples)
    return out


def _answer(tokens: int, segments: list[tuple[int, int, bool]]):
    return SimpleNamespace(tokens=list(range(tokens)),
                           spoken=[SpokenSegment(tokens=k, samples=n, finished=f) for k, n, f in segments])


@pytest.mark.parametrize(
    "played,expected",
    [
        pytest.param(0, 0, id="nothing-played"),
        pytest.param(1000, 2, id="first-segment-whole"),
        pytest.param(1500, 4, id="half-of-second"),
        pytest.param(3000, 6, id="all-of-second-but-it-is-still-being-synthesised"),
        pytest.param(10**6, 6, id="more-than-produced"),
    ],
)
def test_heard_tokens(played, expected):
    answer = _answer(9, [(2, 1000, True), (5, 1000, False)])
    assert heard_tokens(answer, played) == expected


def _speak_first_segment(engine, state):
    """Answer the question and speak its first text segment; returns the segment's PCM samples."""
    token, state = engine.start_speaking(state)
    while not token.segments:
        token, state = engine.next_token(state)
    pieces = list(engine.speak_segment(state, token.segments[0]))
    return sum(p.numel() for p in pieces), state


def _listen(engine, state, chunk_list):
    for chunk in chunk_list:
        _, state = engine.listen_chunk(state, chunk, follow_decision=False)
    return state


def test_barge_in_keeps_heard_tokens_and_equals_a_fresh_dialogue(engine, chunks):
    main = _listen(engine, engine.prefill_system(engine.new_session(seed=0)), chunks["question"])
    start = main.llm.seq_length
    segment_samples, main = _speak_first_segment(engine, main)
    spoken_tokens = main.answer.spoken[0].tokens
    fork = _listen(engine, fork_listener(main), chunks["question_noise_question"][:6])
    played = segment_samples // 2
    heard = heard_tokens(main.answer, played)
    assert 0 < heard < spoken_tokens
    all_tokens = list(main.answer.tokens)
    main = commit_barge_in(engine, main, fork, played)
    assert main.dialogue is DialogueState.USER_TURN_ENDED
    assert main.answer.tokens == all_tokens[:heard]
    suffix = len(engine.models.llm.layout.assistant_suffix_ids)
    opening = 1 + len(engine.models.llm.layout.user_prefix_ids) + 25
    assert main.llm.seq_length == start + suffix + heard + opening + 2 * 6

    # The same dialogue built without any barge-in gives the same next answer.
    llm = engine.models.llm
    ref_state = _listen(engine, engine.prefill_system(engine.new_session(seed=0)), chunks["question"])
    ref = ref_state.llm
    llm.start_answer(ref)
    for token in all_tokens[:heard]:
        llm.feed_token(token, ref)
    for i, vectors in enumerate(fork.turn_vectors):
        llm.listen(vectors, first_of_turn=(i == 0), cache=ref)
    expected_logits, _ = llm.start_answer(ref)
    got_logits, _ = llm.start_answer(main.llm)
    assert ref.seq_length == main.llm.seq_length
    scale = expected_logits.abs().max().item()
    torch.testing.assert_close(got_logits, expected_logits, atol=1e-4 * scale, rtol=0)


def test_ignored_barge_in_is_kept_after_the_answer(engine, chunks):
    main = _listen(engine, engine.prefill_system(engine.new_session(seed=0)), chunks["question"])
    _, main = _speak_first_segment(engine, main)
    fork = _listen(engine, fork_listener(main), chunks["question_noise_question"][:3])
    keep_ignored_turn(main, fork)
    before_tokens = len(main.answer.tokens)
    while main.dialogue is not DialogueState.IDLE:
        _, main = engine.next_token(main)
    assert len(main.answer.tokens) > before_tokens, "the answer went on"
    length = main.llm.seq_length
    main = flush_pending_turns(engine, main)
    assert main.llm.seq_length == length + 1 + 4 + 25 + 2 * 3
    assert main.pending_turns == [] and main.dialogue is DialogueState.IDLE


def test_cut_before_any_audio_keeps_no_answer_tokens(engine, chunks):
    main = _listen(engine, engine.prefill_system(engine.new_session(seed=0)), chunks["question"])
    start = main.llm.seq_length
    token, main = engine.start_speaking(main)
    for _ in range(3):
        token, main = engine.next_token(main)
    main = cut_answer(engine, main, played_samples=0)
    assert main.answer.tokens == [] and main.answer.heard_text == ""
    assert main.llm.seq_length == start + len(engine.models.llm.layout.assistant_suffix_ids)
    assert main.dialogue is DialogueState.IDLE and main.answer.end_reason == "cancelled"
