"""Settings of the full-duplex daemon: nested frozen dataclasses with units in their names."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from assistant.dialogue import TurnEnd


@dataclass(frozen=True)
class AudioSettings:
    input_device: str | None = None
    """Substring of the microphone's name (None: system default)."""
    output_device: str | None = None
    """Substring of the speaker's name (None: system default)."""
    block_ms: int = 20
    """Size of one PortAudio callback block."""
    reopen_interval_s: float = 0.5
    """How often a lost device is looked for again."""


@dataclass(frozen=True)
class VadSettings:
    aggressiveness: int = 2
    """webrtcvad aggressiveness, 0 (least) to 3 (most)."""
    frame_ms: int = 30
    """webrtcvad frame: 10, 20 or 30 ms."""
    start_ms: int = 90
    """Speech needed before a VAD start (hysteresis)."""
    stop_ms: int = 600
    """Silence needed before a VAD stop (hysteresis)."""
    preroll_ms: int = 480
    """Audio before the VAD start that is fed to the model too (rounded up to 160 ms chunks)."""
    min_level_dbfs: float = -60.0
    """Quieter frames are never speech (webrtcvad alone hears speech in −70 dBFS echo residue)."""


@dataclass(frozen=True)
class EchoSettings:
    aec_enabled: bool = True
    """Cancel the assistant's own voice from the microphone (needs pywebrtc-audio)."""
    aec_warmup_ms: int = 800
    """Speech heard during the first moments of each answer, while AEC re-adapts, cannot barge in."""
    half_duplex_tail_ms: int = 300
    """Without AEC: the microphone stays muted this long after playback ends."""
    near_end_margin_db: float | None = 20.0
    """With AEC: microphone audio this far above the loudest echo the room has shown passes as
    the user's voice, so barge-in works over a headset or a quiet speaker (None: AEC3 alone)."""


MIN_NEAR_END_MARGIN_DB = 6.0


@dataclass(frozen=True)
class DialogueSettings:
    turn_end: TurnEnd = TurnEnd.MODEL
    """What ends a user turn: `model` (the state head decides) or `vad` (the VAD stop)."""
    respond_probability: float = 0.5
    """State-head probability above which the user is answered."""
    ignore_probability: float = 0.5
    """State-head probability above which the user's turn is dropped (words stay in history)."""
    silence_end_s: float = 2.0
    """`turn_end: model`: a turn still undecided this long after VAD stop is closed unanswered;
    `turn_end: vad`: the VAD stop itself ends the turn."""
    max_answer_tokens: int = 500
    """Longest answer, in text tokens."""
    max_speech_tokens_per_segment: int = 1000
    """Codec tokens one text segment may take at most (a runaway speech decoder is cut)."""
    idle_timeout_s: float = 600.0
    """The dialogue history is forgotten after this long without speech."""
    playback_lead_s: float = 0.6
    """Generation runs ahead of the speaker by at most this much queued audio."""
    min_barge_in_ms: int = 400
    """An interruption shorter than this (speech heard after its VAD start) is ignored."""
    max_answer_steps_per_tick: int = 8
    """Answer work units between two microphone reads: listening always comes first."""


@dataclass(frozen=True)
class DaemonSettings:
    audio: AudioSettings = field(default_factory=AudioSettings)
    vad: VadSettings = field(default_factory=VadSettings)
    echo: EchoSettings = field(default_factory=EchoSettings)
    dialogue: DialogueSettings = field(default_factory=DialogueSettings)
    events_path: str | None = None
    """JSON-lines file receiving one record per turn (latencies), or None."""

    def __post_init__(self) -> None:
        problems = settings_problems(self.audio, self.vad, self.echo, self.dialogue)
        if problems:
            raise ValueError("; ".join(f"{key}={_shown(self, key)}: {message}" for key, message in problems))


def settings_problems(audio: AudioSettings, vad: VadSettings, echo: EchoSettings,
                      dialogue: DialogueSettings) -> list[tuple[str, str]]:
    """Every (key, what is wrong and how to fix it) in the daemon's sections; empty when usable.

    Keys name the dataclass path (`vad.frame_ms`); `assistant.config` reports them against the
    file or variable the value came from.
    """
    problems = []
    if vad.frame_ms not in (10, 20, 30):
        problems.append(("vad.frame_ms", "webrtcvad takes 10, 20 or 30"))
    if not 0 <= vad.aggressiveness <= 3:
        problems.append(("vad.aggressiveness", "use 0..3"))
    for name in ("respond_probability", "ignore_probability"):
        if not 0.0 <= getattr(dialogue, name) <= 1.0:
            problems.append((f"dialogue.{name}", "use a probability in [0, 1]"))
    if dialogue.playback_lead_s <= 0:
        problems.append(("dialogue.playback_lead_s", "must be > 0"))
    if dialogue.max_answer_steps_per_tick < 1:
        problems.append(("dialogue.max_answer_steps_per_tick", "must be >= 1"))
    if dialogue.turn_end is TurnEnd.FILE:
        problems.append(("dialogue.turn_end", "file is for `freeze-omni respond`; use model or vad"))
    if echo.near_end_margin_db is not None and echo.near_end_margin_db < MIN_NEAR_END_MARGIN_DB:
        problems.append(("echo.near_end_margin_db", f"use at least {MIN_NEAR_END_MARGIN_DB:g} dB (smaller "
                         "margins let the assistant's own echo through as the user), or null to turn it off"))
    if not 1 <= audio.block_ms <= 200:
        problems.append(("audio.block_ms", "use 1..200 ms"))
    for section, values in (("audio", audio), ("vad", vad), ("echo", echo), ("dialogue", dialogue)):
        problems += _negative_amounts(section, values)
    return problems


def _negative_amounts(section: str, values: object) -> list[tuple[str, str]]:
    """Durations and counts (fields named *_ms, *_s, *_tokens...) are never negative."""
    problems = []
    for name, value in vars(values).items():
        if name.endswith(("_ms", "_s", "_tokens", "_segment")) and isinstance(value, (int, float)) \
                and value < 0:
            problems.append((f"{section}.{name}", "must not be negative"))
    return problems


def _shown(settings: DaemonSettings, key: str) -> object:
    section, name = key.split(".")
    value = getattr(getattr(settings, section), name)
    return value.value if isinstance(value, Enum) else value
