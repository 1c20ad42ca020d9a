"""Opt-in debug recording: each turn's microphone input, the answer's audio and a state timeline.

One directory per turn, `<session>-<turn>/`:

    input.wav     what the model heard in this turn (16 kHz, pre-roll included)
    output.wav    the answer the model produced for it (24 kHz; what was cut is still here)
    states.json   per 160 ms chunk: P(continue), P(respond), P(ignore) and the decision
    states.png    the same as a plot: respond green, ignore red, continue grey, thresholds dashed

The PNG is drawn here with numpy and zlib (no plotting library in a daemon's dependencies).
"""
from __future__ import annotations

import json
import logging
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from audio_io.wav_file import write_pcm16

logger = logging.getLogger(__name__)

INPUT_RATE_HZ = 16_000
OUTPUT_RATE_HZ = 24_000
PLOT_WIDTH_PX, PLOT_HEIGHT_PX, PLOT_MARGIN_PX = 640, 240, 12
PX_PER_CHUNK = 8  # one 160 ms chunk is this wide, until the plot would exceed PLOT_WIDTH_PX
COLOURS = {"continue": (150, 150, 150), "respond": (0, 150, 60), "ignore": (210, 40, 40)}


@dataclass
class TurnRecording:
    name: str
    inputs: list[np.ndarray] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)
    states: list[dict] = field(default_factory=list)


class DebugRecorder:
    """Collects turns as they happen and writes each one once it is over.

    Args:
        directory: created if missing.
        thresholds: (respond, ignore) probabilities drawn as dashed lines.
    """

    def __init__(self, directory: Path, thresholds: tuple[float, float] = (0.5, 0.5)) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.thresholds = thresholds
        self._listening: TurnRecording | None = None
        self._answering: TurnRecording | None = None
        self._pending: dict[str, TurnRecording] = {}

    def turn_started(self, name: str) -> None:
        """A user turn began (first chunk fed to the model)."""
        self._listening = self._pending.setdefault(name, TurnRecording(name))

    def listened(self, chunk: np.ndarray, probs: tuple[float, float, float], decision: str) -> None:
        if self._listening is None:
            return
        turn = self._listening
        turn.inputs.append(np.asarray(chunk, dtype=np.float32))
        turn.states.append({"chunk": len(turn.states), "p_continue": probs[0], "p_respond": probs[1],
                            "p_ignore": probs[2], "decision": decision})

    def answer_started(self) -> None:
        """The turn being listened to is answered; the previous answer is over."""
        previous, self._answering = self._answering, self._listening
        if previous is not None and previous is not self._answering:
            self._write(previous)

    def spoke(self, pcm_24k: np.ndarray) -> None:
        if self._answering is not None and pcm_24k.size:
            self._answering.outputs.append(np.asarray(pcm_24k, dtype=np.float32))

    def flush(self) -> None:
        """Write every turn collected so far (the daemon is idle, or stopping)."""
        for turn in list(self._pending.values()):
            self._write(turn)
        self._listening = self._answering = None

    def _write(self, turn: TurnRecording) -> None:
        self._pending.pop(turn.name, None)
        if not turn.inputs and not turn.outputs:
            return
        out = self.directory / turn.name
        try:
            out.mkdir(parents=True, exist_ok=True)
            if turn.inputs:
                write_pcm16(out / "input.wav", np.concatenate(turn.inputs), INPUT_RATE_HZ)
            if turn.outputs:
                write_pcm16(out / "output.wav", np.concatenate(turn.outputs), OUTPUT_RATE_HZ)
            thresholds = {"respond": self.thresholds[0], "ignore": self.thresholds[1]}
            (out / "states.json").write_text(json.dumps(
                {"thresholds": thresholds, "chunk_ms": 160, "chunks": turn.states}, indent=1))
            (out / "states.png").write_bytes(state_plot_png(turn.states, self.thresholds))
        except OSError as err:  # a full disk must not stop the assistant
            logger.warning("debug recording of %s failed: %s", turn.name, err)
            return
        logger.info("debug recording: %s (%d chunks)", out, len(turn.states))


def state_plot_png(states: list[dict], thresholds: tuple[float, float]) -> bytes:
    """An RGB PNG of the state probabilities over the turn's chunks."""
    step = max(1, min(PX_PER_CHUNK, (PLOT_WIDTH_PX - 2 * PLOT_MARGIN_PX) // max(1, len(states))))
    width = max(PLOT_WIDTH_PX // 2, 2 * PLOT_MARGIN_PX + step * max(1, len(states)))
    image = np.full((PLOT_HEIGHT_PX, width, 3), 255, dtype=np.uint8)  # (H, W, RGB)
    inner = PLOT_HEIGHT_PX - 2 * PLOT_MARGIN_PX

    def y_of(p: float) -> int:
        return PLOT_MARGIN_PX + int(round((1.0 - min(max(p, 0.0), 1.0)) * (inner - 1)))

    image[PLOT_MARGIN_PX - 1, :] = image[PLOT_HEIGHT_PX - PLOT_MARGIN_PX, :] = 0  # frame: p=1 and p=0
    image[:, PLOT_MARGIN_PX - 1] = 0
    for p, colour in ((thresholds[0], COLOURS["respond"]), (thresholds[1], COLOURS["ignore"])):
        image[y_of(p), PLOT_MARGIN_PX:width - PLOT_MARGIN_PX:6] = colour  # dashed
    for name in ("continue", "ignore", "respond"):  # respond drawn last: on top
        points = [(PLOT_MARGIN_PX + i * step, y_of(s[f"p_{name}"])) for i, s in enumerate(states)]
        for (x0, y0), (x1, y1) in zip(points, points[1:] or points):
            _line(image, x0, y0, x1, y1, COLOURS[name])
    return _png(image)


def _line(image: np.ndarray, x0: int, y0: int, x1: int, y1: int, colour: tuple[int, int, int]) -> None:
    n = max(abs(x1 - x0), abs(y1 - y0), 1) + 1
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    for dy in (0, 1):  # two pixels thick
        image[np.clip(ys + dy, 0, image.shape[0] - 1), xs] = colour


def _png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 → PNG bytes (8-bit RGB, filter 0 on every row)."""
    height, width, _ = image.shape
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), image.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))
