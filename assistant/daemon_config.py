"""Settings of the full-duplex daemon: nested frozen dataclasses with units in their names."""
from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class EchoSettings:
    aec_enabled: bool = True
    """Cancel the assistant's own voice from the microphone (needs pywebrtc-audio)."""
    aec_warmup_ms: int = 500
    """Barge-in is not allowed during the first moments of each answer, while AEC adapts."""
    half_duplex_tail_ms: int = 300
    """Without AEC: the microphone stays muted this long after playback ends."""


@dataclass(frozen=True)
class DialogueSettings:
    turn_end: TurnEnd = TurnEnd.MODEL
    respond_probability: float = 0.5
    """State-head probability above which the user is answered."""
    ignore_probability: float = 0.5
    """State-head probability above which the user's turn is dropped (words stay in history)."""
    silence_end_s: float = 2.0
    """`turn_end: model`: a turn still undecided this long after VAD stop is closed unanswered;
    `turn_end: vad`: the VAD stop itself ends the turn."""
    max_answer_tokens: int = 500
    max_speech_tokens_per_segment: int = 1000
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
        problems = []
        if self.vad.frame_ms not in (10, 20, 30):
            problems.append(f"vad.frame_ms={self.vad.frame_ms}: webrtcvad takes 10, 20 or 30")
        if not 0 <= self.vad.aggressiveness <= 3:
            problems.append(f"vad.aggressiveness={self.vad.aggressiveness}: use 0..3")
        for name in ("respond_probability", "ignore_probability"):
            value = getattr(self.dialogue, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"dialogue.{name}={value}: use a probability in [0, 1]")
        if self.dialogue.playback_lead_s <= 0 or self.dialogue.max_answer_steps_per_tick < 1:
            problems.append("dialogue.playback_lead_s must be > 0 and max_answer_steps_per_tick >= 1")
        if self.dialogue.turn_end is TurnEnd.FILE:
            problems.append("dialogue.turn_end=file is for `freeze-omni respond`; use model or vad")
        if problems:
            raise ValueError("; ".join(problems))
