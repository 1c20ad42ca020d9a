"""Dialogue states, state-head labels and the pure transition function.

Freeze-Omni's string states map as follows: 'pre' → NEW, 'sl' → IDLE (the next chunk
opens a user turn), 'cl' → LISTENING, 'ss' → USER_TURN_ENDED (answer due), 'cs' →
SPEAKING; 'el' (ignore) closes the turn and returns to IDLE, keeping the user's words
in the LLM context.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum, auto


class DialogueState(Enum):
    NEW = auto()
    """System role not prefilled yet."""
    IDLE = auto()
    """Waiting for the user; the next audio chunk opens a user turn."""
    LISTENING = auto()
    """Inside a user turn."""
    USER_TURN_ENDED = auto()
    """The user finished and wants an answer; nothing generated yet."""
    SPEAKING = auto()
    """Generating the answer."""


class StateLabel(IntEnum):
    """Indices of the state head's outputs (spec §4.5, §5)."""

    CONTINUE_LISTENING = 0
    START_SPEAKING = 1
    IGNORE = 2


class Decision(Enum):
    """What the state head says after one chunk."""

    CONTINUE = "continue"
    RESPOND = "respond"
    IGNORE = "ignore"


class Event(Enum):
    SYSTEM_PREFILLED = auto()
    AUDIO_CHUNK = auto()
    """A chunk of user audio was fed to the LLM."""
    MODEL_RESPOND = auto()
    """The state head decided the user finished and wants an answer."""
    MODEL_IGNORE = auto()
    """The state head decided the user finished and must not be answered."""
    RESPONSE_REQUESTED = auto()
    """The caller ends the user turn and asks for an answer (end of file, VAD end)."""
    ANSWER_TOKEN = auto()
    """A non-final answer token was generated."""
    ANSWER_DONE = auto()
    """The answer ended (end-of-turn token, token cap or cancellation)."""


class TurnEnd(Enum):
    """What ends a user's turn."""

    MODEL = "model"
    """The state head (respond / ignore), the Freeze-Omni way."""
    FILE = "file"
    """The end of the input file; decisions are only recorded (official offline driver)."""
    VAD = "vad"
    """A stretch of VAD silence; the turn is answered (untrained state heads, tests)."""


class InvalidTransition(ValueError):
    """An event arrived in a state where it has no meaning (a caller bug)."""


_S = DialogueState
_E = Event
TRANSITIONS: dict[tuple[DialogueState, Event], DialogueState] = {
    (_S.NEW, _E.SYSTEM_PREFILLED): _S.IDLE,
    (_S.IDLE, _E.AUDIO_CHUNK): _S.LISTENING,
    (_S.LISTENING, _E.AUDIO_CHUNK): _S.LISTENING,
    (_S.LISTENING, _E.MODEL_RESPOND): _S.USER_TURN_ENDED,
    (_S.LISTENING, _E.MODEL_IGNORE): _S.IDLE,
    (_S.LISTENING, _E.RESPONSE_REQUESTED): _S.USER_TURN_ENDED,
    (_S.USER_TURN_ENDED, _E.ANSWER_TOKEN): _S.SPEAKING,
    (_S.USER_TURN_ENDED, _E.ANSWER_DONE): _S.IDLE,
    (_S.SPEAKING, _E.ANSWER_TOKEN): _S.SPEAKING,
    (_S.SPEAKING, _E.ANSWER_DONE): _S.IDLE,
}
"""Every legal (state, event) pair; anything else is an `InvalidTransition`."""


def next_state(state: DialogueState, event: Event) -> DialogueState:
    """Pure transition function of the dialogue state machine."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(f"event {event.name} is not allowed in state {state.name}") from None


@dataclass(frozen=True)
class DecisionThresholds:
    """Probabilities above which the state head ends the user turn (official: 0.5 both)."""

    ignore_probability: float = 0.5
    respond_probability: float = 0.5

    def __post_init__(self) -> None:
        for name in ("ignore_probability", "respond_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must lie in [0, 1]")


def decide(p_respond: float, p_ignore: float, thresholds: DecisionThresholds) -> Decision:
    """Official rule: ignore wins over respond when both exceed their thresholds."""
    if p_ignore > thresholds.ignore_probability:
        return Decision.IGNORE
    if p_respond > thresholds.respond_probability:
        return Decision.RESPOND
    return Decision.CONTINUE


def event_for(decision: Decision) -> Event | None:
    """Event that a model decision triggers when decisions drive the dialogue (None: keep listening)."""
    return {
        Decision.CONTINUE: None,
        Decision.RESPOND: Event.MODEL_RESPOND,
        Decision.IGNORE: Event.MODEL_IGNORE,
    }[decision]
