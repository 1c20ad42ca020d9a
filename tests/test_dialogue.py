"""Dialogue state machine: the transition table, decisions and thresholds."""
from __future__ import annotations

import itertools

import pytest

from assistant.dialogue import (
    Decision,
    DecisionThresholds,
    DialogueState as S,
    Event as E,
    InvalidTransition,
    StateLabel,
    decide,
    event_for,
    next_state,
)

# Written out independently of assistant.dialogue.TRANSITIONS, so a change there must be deliberate.
LEGAL = {
    (S.NEW, E.SYSTEM_PREFILLED): S.IDLE,
    (S.IDLE, E.AUDIO_CHUNK): S.LISTENING,
    (S.LISTENING, E.AUDIO_CHUNK): S.LISTENING,
    (S.LISTENING, E.MODEL_RESPOND): S.USER_TURN_ENDED,
    (S.LISTENING, E.MODEL_IGNORE): S.IDLE,
    (S.LISTENING, E.RESPONSE_REQUESTED): S.USER_TURN_ENDED,
    (S.USER_TURN_ENDED, E.ANSWER_TOKEN): S.SPEAKING,
    (S.USER_TURN_ENDED, E.ANSWER_DONE): S.IDLE,
    (S.SPEAKING, E.ANSWER_TOKEN): S.SPEAKING,
    (S.SPEAKING, E.ANSWER_DONE): S.IDLE,
}


@pytest.mark.parametrize(
    "state,event", list(itertools.product(S, E)), ids=lambda v: v.name
)
def test_every_state_event_pair(state, event):
    if (state, event) in LEGAL:
        assert next_state(state, event) is LEGAL[(state, event)]
    else:
        with pytest.raises(InvalidTransition, match=event.name):
            next_state(state, event)


def test_official_dialogue_sequence():
    """pre → sl → cl … → ss → cs … → sl, then an ignored turn."""
    state = S.NEW
    for event in [E.SYSTEM_PREFILLED, E.AUDIO_CHUNK, E.AUDIO_CHUNK, E.MODEL_RESPOND,
                  E.ANSWER_TOKEN, E.ANSWER_TOKEN, E.ANSWER_DONE, E.AUDIO_CHUNK, E.MODEL_IGNORE]:
        state = next_state(state, event)
    assert state is S.IDLE


@pytest.mark.parametrize(
    "p_respond,p_ignore,expected",
    [
        pytest.param(0.1, 0.1, Decision.CONTINUE, id="both-low"),
        pytest.param(0.6, 0.1, Decision.RESPOND, id="respond"),
        pytest.param(0.1, 0.6, Decision.IGNORE, id="ignore"),
        pytest.param(0.5, 0.5, Decision.CONTINUE, id="exactly-threshold-is-not-above"),
        pytest.param(0.51, 0.49, Decision.RESPOND, id="just-above"),
    ],
)
def test_decide_official_thresholds(p_respond, p_ignore, expected):
    assert decide(p_respond, p_ignore, DecisionThresholds()) is expected


def test_ignore_wins_when_both_thresholds_are_exceeded():
    low = DecisionThresholds(ignore_probability=0.2, respond_probability=0.2)
    assert decide(0.4, 0.3, low) is Decision.IGNORE


def test_thresholds_are_validated():
    with pytest.raises(ValueError, match="respond_probability"):
        DecisionThresholds(respond_probability=1.5)


def test_labels_and_events():
    assert [int(x) for x in StateLabel] == [0, 1, 2]
    assert event_for(Decision.CONTINUE) is None
    assert event_for(Decision.RESPOND) is E.MODEL_RESPOND
    assert event_for(Decision.IGNORE) is E.MODEL_IGNORE
