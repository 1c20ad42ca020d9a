"""`freeze-omni client`: a microphone and speaker attached to a remote `freeze-omni serve`.

The audio side is any `AudioPort` (the daemon's protocol; `audio_io.duplex.DuplexStream` on
PyAudio, with echo cancellation, in real use): 160 ms microphone chunks go to the server as
`audio-chunk` events, the answer's 24 kHz audio is played as it arrives, an `interrupted` event
flushes what is queued, and `played` reports how much of the answer was heard. A lost or
refused connection is retried with exponential backoff; each new connection is a new session.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from assistant.daemon import AudioPort, SpeechGate
from assistant.protocol import ProtocolError
from assistant.wire import WireConnection

logger = logging.getLogger(__name__)

AUDIO_IN = {"rate": 16_000, "width": 2, "channels": 1}
EXIT_UNAUTHORIZED = 77  # EX_NOPERM: retrying will not help
EXIT_NO_AUDIO_DEVICE = 69  # EX_UNAVAILABLE, as `freeze-omni run`


@dataclass(frozen=True)
class ClientSettings:
    address: str
    """`HOST:PORT` or `unix:/path/to.sock`."""
    token: str = ""
    turn_end: str = "model"
    """`model`: stream the microphone, the server decides; `client`: a local VAD ends each turn."""
    seed: int | None = None
    reconnect_initial_s: float = 0.5
    """First wait after a failed or lost connection; doubled after each failure."""
    reconnect_max_s: float = 10.0
    ping_interval_s: float = 5.0
    """Keepalive while nothing else is sent."""
    played_report_s: float = 0.2
    """How often `played` is sent while the answer plays."""

    def __post_init__(self) -> None:
        if self.turn_end not in ("model", "client"):
            raise ValueError(f"turn_end must be 'model' or 'client', got {self.turn_end!r}")
        if not 0 < self.reconnect_initial_s <= self.reconnect_max_s:
            raise ValueError("need 0 < reconnect_initial_s <= reconnect_max_s")


class Backoff:
    """Exponential retry delays: initial, 2x, 4x ... capped; `reset()` after a success."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self.next_s = initial_s

    def delay(self) -> float:
        delay, self.next_s = self.next_s, min(self.max_s, self.next_s * 2)
        return delay

    def reset(self) -> None:
        self.next_s = self.initial_s


@dataclass
class ClientCounters:
    connects: int = 0
    failures: int = 0
    answers: int = 0
    interruptions: int = 0
    refused_full: int = 0
    """Session starts refused because the server was full."""


class _Receiver(threading.Thread):
    """Plays what the server sends; notes how the session ends."""

    def __init__(self, conn: WireConnection, audio: AudioPort, client: "Client") -> None:
        super().__init__(name="client-receiver", daemon=True)
        self.conn, self.audio, self.client = conn, audio, client
        self.ended: str | None = None
        self.answer_started_at_played = 0
        self.playing = False

    def run(self) -> None:
        try:
            while True:
                frame = self.conn.recv(timeout_s=None)
                if frame is None:
                    self.ended = "connection closed by the server"
                    return
                if self._on(frame):
                    return
        except (OSError, ProtocolError, ValueError) as err:
            self.ended = f"connection lost: {err}"

    def _on(self, frame) -> bool:
        kind, data = frame.type, frame.data
        if kind == "audio-chunk":
            pcm = np.frombuffer(frame.payload, dtype="<i2").astype(np.float32) / 32768.0
            self.audio.play(pcm)
        elif kind == "speaking":
            self.answer_started_at_played = self.audio.played_samples_24k + self.audio.queued_samples_24k
            self.playing = True
        elif kind == "interrupted":
            dropped = self.audio.flush_playback()
            self.client.counters.interruptions += 1
            logger.info("interrupted: dropped %.2f s of answer audio", dropped / 24_000)
        elif kind == "answer-done":
            self.audio.finish_playback()
            self.client.counters.answers += 1
            self.client.on_answer(data)
            logger.info("answer: %s", data.get("text", ""))
        elif kind in ("error", "session-ended"):
            self.ended = f"{kind}: {data.get('code')}: {data.get('message')}"
            self.client.last_end_code = data.get("code")
            return True
        return False


class Client:
    """Connects, streams, plays, reconnects."""

    def __init__(self, settings: ClientSettings, audio: AudioPort, gate: SpeechGate | None = None,
                 connect: Callable[[str], WireConnection] = WireConnection.connect,
                 sleep: Callable[[float], None] = time.sleep,
                 on_answer: Callable[[dict], None] | None = None) -> None:
        if settings.turn_end == "client" and gate is None:
            raise ValueError("turn_end 'client' needs a speech gate (VAD)")
        self.settings, self.audio, self.gate = settings, audio, gate
        self._connect, self._sleep = connect, sleep
        self.on_answer = on_answer or (lambda data: None)
        self.counters = ClientCounters()
        self.backoff = Backoff(settings.reconnect_initial_s, settings.reconnect_max_s)
        self.last_end_code: str | None = None

    def run(self, should_stop: Callable[[], bool]) -> int:
        """Serve sessions until `should_stop()`; returns an exit status."""
        while not should_stop():
            self.last_end_code = None
            try:
                conn = self._connect(self.settings.address)
            except OSError as err:
                self._wait_before_retry(f"cannot connect to {self.settings.address}: {err}")
                continue
            self.counters.connects += 1
            try:
                reason = self._session(conn, should_stop)
            finally:
                conn.close()
            if self.last_end_code == "unauthorized":
                logger.error("the server refused the token; not retrying")
                return EXIT_UNAUTHORIZED
            if reason is not None and not should_stop():
                self._wait_before_retry(reason)
        return 0

    def _wait_before_retry(self, reason: str) -> None:
        self.counters.failures += 1
        delay = self.backoff.delay()
        logger.warning("%s; retrying in %.1f s", reason, delay)
        self._sleep(delay)

    def _session(self, conn: WireConnection, should_stop: Callable[[], bool]) -> str | None:
        """One connection's session; returns why it ended (None: we stopped it)."""
        start: dict[str, Any] = {"turn_end": self.settings.turn_end, "seed": self.settings.seed}
        if self.settings.token:
            start["token"] = self.settings.token
        try:
            conn.send("session-start", start)
            started = conn.recv(10.0)
        except (OSError, ProtocolError) as err:
            return f"session start failed: {err}"
        if started is None:
            return "the server closed the connection"
        if started.type != "session-started":
            self.last_end_code = started.data.get("code")
            self.counters.refused_full += int(self.last_end_code == "full")
            return f"session refused: {started.data.get('code')}: {started.data.get('message')}"
        conn.sock.settimeout(None)  # the receiver blocks on reads; sends block only if the server stalls
        self.backoff.reset()
        logger.info("connected to %s: session %s", self.settings.address, started.data.get("session_id"))
        receiver = _Receiver(conn, self.audio, self)
        receiver.start()
        try:
            self._stream(conn, receiver, should_stop)
        except OSError as err:
            receiver.ended = receiver.ended or f"connection lost: {err}"
        finally:
            if receiver.ended is None:
                _quietly(lambda: conn.send("session-end"))
            _quietly(lambda: conn.sock.shutdown(socket.SHUT_RDWR))
            receiver.join(5)
        return None if should_stop() and receiver.ended is None else receiver.ended

    def _stream(self, conn: WireConnection, receiver: _Receiver, should_stop: Callable[[], bool]) -> None:
        settings = self.settings
        last_sent = last_played = time.monotonic()
        in_turn = False
        while not should_stop() and receiver.ended is None:
            chunk = self.audio.read_model_chunk(timeout_s=0.05)
            now = time.monotonic()
            if chunk is not None:
                if self.gate is None:
                    self._send_audio(conn, chunk)
                    last_sent = now
                else:
                    started, stopped = self.gate.speech_started(chunk)
                    in_turn = in_turn or started
                    if in_turn:
                        self._send_audio(conn, chunk)
                        last_sent = now
                    if in_turn and stopped:
                        conn.send("turn-end")
                        in_turn = False
            if receiver.playing and now - last_played >= settings.played_report_s:
                played = max(0, self.audio.played_samples_24k - receiver.answer_started_at_played)
                conn.send("played", {"samples": played})
                last_played = last_sent = now
            if now - last_sent >= settings.ping_interval_s:
                conn.send("ping")
                last_sent = now

    @staticmethod
    def _send_audio(conn: WireConnection, chunk: np.ndarray) -> None:
        # x 32768 with rounding: the exact inverse of the server's int16 / 32768
        pcm = np.clip(np.round(np.asarray(chunk) * 32768.0), -32768, 32767).astype("<i2").tobytes()
        conn.send("audio-chunk", AUDIO_IN, pcm)


def _quietly(action: Callable[[], object]) -> None:
    try:
        action()
    except OSError:
        pass


def add_client_arguments(p: Any) -> None:
    p.add_argument("--connect", required=True, metavar="HOST:PORT",
                   help="the server: HOST:PORT or unix:/path/to.sock")
    p.add_argument("--token-env", default="FREEZE_OMNI_SERVER__TOKEN", metavar="VAR",
                   help="environment variable holding the server's token (never pass it on a command line)")
    p.add_argument("--turn-end", choices=["model", "client"], default="model",
                   help="model: stream the microphone, the server decides; client: a local VAD ends turns")
    p.add_argument("--input-device", default=None, help="substring of the microphone's name")
    p.add_argument("--output-device", default=None, help="substring of the speaker's name")
    p.add_argument("--no-aec", dest="aec_enabled", action="store_false", help="no echo cancellation")
    p.add_argument("--reconnect-max-s", type=float, default=10.0, help="longest wait between reconnects")


def run_client_command(args: Any) -> int:
    """`freeze-omni client`: PyAudio (imported lazily by audio_io) on the local devices."""
    import os
    import signal

    from audio_io.aec import AecUnavailableError, HalfDuplexGate, WebRtcEchoCanceller
    from audio_io.devices import NoAudioDeviceError
    from audio_io.duplex import DuplexStream

    settings = ClientSettings(address=args.connect, token=os.environ.get(args.token_env, ""),
                              turn_end=args.turn_end, reconnect_max_s=args.reconnect_max_s)
    echo: Any = HalfDuplexGate()
    if args.aec_enabled:
        try:
            echo = WebRtcEchoCanceller()
        except AecUnavailableError as err:
            logger.warning("echo cancellation unavailable (%s); half duplex", err)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        audio = DuplexStream(args.input_device, args.output_device, echo_canceller=echo)
    except NoAudioDeviceError as err:
        logger.error("%s", err)
        return EXIT_NO_AUDIO_DEVICE
    with audio:
        gate = _client_vad_gate() if args.turn_end == "client" else None
        return Client(settings, audio, gate).run(stop.is_set)


def _client_vad_gate():
    """webrtcvad as a per-chunk speech gate for `turn_end: client`."""
    from audio_io.vad import VadChunkGate, VadGate

    return VadChunkGate(VadGate())
