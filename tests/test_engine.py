"""Engine step functions on the official tiny model: sessions, turns, edge cases."""
from __future__ import annotations

import pytest
import soundfile
import torch

from assistant.dialogue import Decision, DialogueState, InvalidTransition
from assistant.engine import Engine, EngineOptions
from assistant.respond import TurnEnd, run_turn, split_chunks
from quantized_models.model_dir import load_models
from quantized_models.sampling import TextSamplingConfig
from tests.conftest import load_json

GREEDY = TextSamplingConfig(temperature=1.0, top_k=1, top_p=0.0)


@pytest.fixture(scope="module")
def engine(tiny_dir) -> Engine:
    models = load_models(tiny_dir / "checkpoints", tiny_dir / "llm", torch.device("cpu"), torch.float32)
    options = EngineOptions(text_sampling=GREEDY, speech_top_k=1, max_new_tokens=24, max_speech_tokens=120)
    return Engine(models, options)


def _chunks(tiny_dir, name: str) -> list[torch.Tensor]:
    samples, _ = soundfile.read(tiny_dir / f"inputs/{name}.wav", dtype="float32")
    return split_chunks(samples)


def test_interleaved_sessions_equal_separate_runs(engine, tiny_dir):
    """Model as a server: two dialogues stepped alternately on one engine do not disturb each other."""
    names = ("question", "question_noise_question")
    chunks = {n: _chunks(tiny_dir, n) for n in names}
    states = {n: engine.prefill_system(engine.new_session(seed=1)) for n in names}
    probs = {n: [] for n in names}
    for i in range(max(len(c) for c in chunks.values())):
        for n in names:
            if i < len(chunks[n]):
                result, states[n] = engine.listen_chunk(states[n], chunks[n][i], follow_decision=False)
                probs[n].append(result.probs)
    tokens = {n: [] for n in names}
    results = {n: engine.start_speaking(states[n])[0] for n in names}
    while not all(r.finished for r in results.values()):
        for n in names:
            if not results[n].finished:
                results[n], states[n] = engine.next_token(states[n])
    for n in names:
        tokens[n] = states[n].answer.tokens
        expected_chunks = load_json(tiny_dir / f"expected/{n}/chunks.json")["chunks"]
        assert [pytest.approx([c["p0"], c["p1"], c["p2"]], abs=1e-4) for c in expected_chunks] == [
            list(p) for p in probs[n]]
        assert tokens[n] == load_json(tiny_dir / f"expected/{n}/generation.json")["generated_ids"]


def test_model_turn_end_stops_listening_and_refuses_more_audio(engine, tiny_dir):
    state = engine.prefill_system(engine.new_session(seed=0))
    decisions = []
    for chunk in _chunks(tiny_dir, "question"):
        result, state = engine.listen_chunk(state, chunk, follow_decision=True)
        decisions.append(result.decision)
        if result.decision is Decision.RESPOND:
            break
    # Chunk 2 says ignore (as in the official recording): that turn is dropped and a new one,
    # with fresh encoder caches, opens at chunk 3; listening stops at the first respond.
    assert decisions[2] is Decision.IGNORE and decisions[-1] is Decision.RESPOND
    assert Decision.RESPOND not in decisions[:-1]
    assert state.dialogue is DialogueState.USER_TURN_ENDED
    with pytest.raises(InvalidTransition):
        engine.listen_chunk(state, torch.zeros(2560))


def test_ignored_turn_keeps_words_and_reopens_with_chat_prefix(engine, tiny_dir):
    state = engine.prefill_system(engine.new_session(seed=0))
    chunks = _chunks(tiny_dir, "question")
    lengths = []
    for chunk in chunks[:4]:
        _, state = engine.listen_chunk(state, chunk, follow_decision=True)
        lengths.append(state.llm.seq_length)
    opening = (1 + len(engine.models.llm.layout.user_prefix_ids)
               + engine.models.llm.heads.prompt_embeddings.num_embeddings + 2)
    # turn 1: chunks 0..2 (ignored at chunk 2); turn 2 opens at chunk 3 with the chat prefix again
    assert [b - a for a, b in zip([9] + lengths, lengths)] == [opening, 2, 2, opening]
    assert state.dialogue is DialogueState.LISTENING


def test_first_token_end_of_turn_gives_empty_answer(engine, tiny_dir, monkeypatch):
    """Official crash case (spec §14.4): the first sampled token is <|im_end|>."""
    llm = engine.models.llm
    real_start = llm.start_answer

    def start_with_eot(cache):
        logits, hidden = real_start(cache)
        forced = torch.full_like(logits, -1e4)
        forced[llm.layout.end_of_turn_id] = 0.0
        return forced, hidden

    monkeypatch.setattr(llm, "start_answer", start_with_eot)
    samples, _ = soundfile.read(tiny_dir / "inputs/question.wav", dtype="float32")
    result = run_turn(engine, samples, TurnEnd.FILE, seed=0)
    assert result.tokens == [] and result.segments == [] and len(result.pcm) == 0
    assert result.end_reason == "end_of_turn"


def test_token_cap_and_next_turn(engine, tiny_dir):
    capped = Engine(engine.models, EngineOptions(text_sampling=GREEDY, speech_top_k=1,
                                                 max_new_tokens=3, max_speech_tokens=20))
    state = capped.prefill_system(capped.new_session(seed=0))
    for chunk in _chunks(tiny_dir, "question")[:3]:
        _, state = capped.listen_chunk(state, chunk, follow_decision=False)
    token, state = capped.start_speaking(state)
    steps = 1
    while not token.finished:
        token, state = capped.next_token(state)
        steps += 1
    assert steps == 3 and len(state.answer.tokens) == 3
    assert state.answer.end_reason == "token_cap"
    assert token.segments, "the leftover text must still be spoken"
    assert state.dialogue is DialogueState.IDLE
    pcm = [p for segment in token.segments for p in capped.speak_segment(state, segment)]
    assert sum(p.numel() for p in pcm) == len(state.speech.codec_tokens) * 600
    before = state.llm.seq_length
    _, state = capped.listen_chunk(state, _chunks(tiny_dir, "question")[3], follow_decision=False)
    # a new user turn: <|im_end|> + user prefix + prompt vectors + 2 audio vectors
    assert state.llm.seq_length - before == 1 + 4 + 25 + 2


def test_chunk_of_wrong_size_is_rejected(engine):
    state = engine.prefill_system(engine.new_session(seed=0))
    with pytest.raises(ValueError, match="2560"):
        engine.listen_chunk(state, torch.zeros(1000))


def test_speech_decoder_inputs_match_official(engine, tiny_dir):
    """Segment text → LLM embeddings and hidden states → decoder rows (spec §6.3)."""
    from safetensors.torch import load_file

    from quantized_models.speech_decoder import split_llm_rows

    state = engine.prefill_system(engine.new_session(seed=0))
    for chunk in _chunks(tiny_dir, "question"):
        _, state = engine.listen_chunk(state, chunk, follow_decision=False)
    token, state = engine.start_speaking(state)
    segments = list(token.segments)
    while not token.finished:
        token, state = engine.next_token(state)
        segments += token.segments
    models = engine.models
    expected_segments = load_json(tiny_dir / "expected/question/segments.json")["segments"]
    assert len(segments) == len(expected_segments)
    for i, segment in enumerate(segments):
        expected = load_file(tiny_dir / f"expected/question/segment{i:02d}.safetensors")
        engine.start_segment(state, segment)
        ids = state.speech.tts_token_ids
        like = models.llm.heads.prompt_embeddings.weight
        rows = split_llm_rows(models.llm.embed_tokens(ids, like), models.decoder.dims.idim)
        prefix = split_llm_rows(torch.stack(segment.hidden_states), models.decoder.dims.idim)
        torch.testing.assert_close(rows, expected["decoder_hidden_in"])
        scale = expected["decoder_prefix_in"].abs().max().item()
        torch.testing.assert_close(prefix, expected["decoder_prefix_in"], atol=1e-4 * scale, rtol=0)


def test_segment_without_text_is_silent(engine, tiny_dir):
    """Official crash case (spec §14.4): a final segment with hidden states but no text."""
    from assistant.segmentation import Segment

    state = engine.prefill_system(engine.new_session(seed=0))
    for chunk in _chunks(tiny_dir, "question")[:2]:
        _, state = engine.listen_chunk(state, chunk, follow_decision=False)
    _, state = engine.start_speaking(state)
    hidden = torch.zeros(engine.models.llm.hidden_size)
    assert list(engine.speak_segment(state, Segment(text="", hidden_states=[hidden]))) == []
    assert state.speech.done and state.speech.tts_token_ids == []
    assert state.answer.spoken[-1].finished and state.answer.spoken[-1].samples == 0


class _ScriptedListener:
    """Stand-in engine for `run_turn`: `continue` on every chunk but the `decide_at`-th one fed."""

    def __init__(self, decide_at: int | None, decision: Decision = Decision.IGNORE) -> None:
        self.decide_at, self.decision, self.fed = decide_at, decision, []

    def new_session(self, seed=None):
        return object()

    def prefill_system(self, state, role=None):
        return state

    def listen_chunk(self, state, chunk, follow_decision):
        from assistant.engine import ListenResult

        self.fed.append(chunk)
        decision = self.decision if len(self.fed) == self.decide_at else Decision.CONTINUE
        return ListenResult(torch.zeros(3), (1.0, 0.0, 0.0), decision), state


def test_a_file_turn_ending_undecided_is_followed_by_the_silence_a_live_stream_brings(monkeypatch):
    import math

    import numpy as np

    import assistant.respond as respond

    samples = np.full(3 * 2560, 0.1, dtype=np.float32)  # 3 chunks of sound
    late = _ScriptedListener(decide_at=5)  # the head ignores the sound on the 2nd silent chunk
    result = run_turn(late, samples, TurnEnd.MODEL, seed=0)
    assert not result.answered and result.end_reason == "ignored"
    assert len(late.fed) == 5 and not late.fed[3].any() and not late.fed[4].any()
    answered = []
    monkeypatch.setattr(respond, "_answer", lambda engine, state, result: answered.append(result))
    never = _ScriptedListener(decide_at=None)  # undecided after the whole silence: answered, as before
    run_turn(never, samples, TurnEnd.MODEL, seed=0)
    silent = math.ceil(respond.TRAILING_SILENCE_S / 0.16)
    assert len(never.fed) == 3 + silent == 16 and len(answered) == 1
    whole_file = _ScriptedListener(decide_at=5)
    run_turn(whole_file, samples, TurnEnd.FILE, seed=0)
    assert len(whole_file.fed) == 3 and len(answered) == 2  # the file is the turn: nothing after it
