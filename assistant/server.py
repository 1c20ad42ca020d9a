"""The session server: network clients (kiosks, remote microphones) as scheduled sessions.

One asyncio loop owns every socket; model work runs on the `Scheduler`'s executors. Each
connection has a bounded send queue: audio for a client that does not read fast enough is
dropped and counted, and a client that keeps falling behind is disconnected. A client that
breaks the protocol (bad JSON, unknown events, wrong audio format, oversized payloads), leaves
the connection idle (nothing received or sent, no answer in hand) past the keepalive timeout or
disconnects ends only its own session, with the reason logged and, where the socket still works,
sent back in an `error` event.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import itertools
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from assistant import protocol
from assistant.config import ServerConfig
from assistant.conversation import Conversation
from assistant.protocol import Frame, ProtocolError
from assistant.scheduler import Scheduler, SchedulerFull
from assistant.voice_session import TurnEndMode, VoiceSession, VoiceSessionSettings

logger = logging.getLogger(__name__)

CHUNK_SAMPLES = 2560
"""One model chunk: 160 ms at 16 kHz."""


@dataclass(frozen=True)
class ServerSettings:
    """What the running server needs; defaults are the `server` config section's (one place)."""

    socket_path: str | None = None
    """Unix socket to listen on (None: none)."""
    tcp_enabled: bool = False
    tcp_host: str = ServerConfig.tcp_host
    """TCP address; anything but loopback needs `token`."""
    tcp_port: int = ServerConfig.tcp_port
    """TCP port (0: any free port)."""
    token: str = ""
    """Shared secret a TCP client gives in `session-start` (required for a non-local bind)."""
    max_payload_bytes: int = ServerConfig.max_payload_bytes
    """Largest payload of one event (bytes)."""
    send_queue_events: int = ServerConfig.send_queue_events
    """Events queued for one client at most; audio beyond it is dropped."""
    max_dropped_events: int = ServerConfig.max_dropped_events
    """A client that has lost this many events is disconnected as a slow reader."""
    keepalive_timeout_s: float = ServerConfig.keepalive_timeout_s
    """A client silent (not even `ping`) for this long is disconnected."""
    max_lead_s: float = ServerConfig.client_lead_s
    """Audio generated ahead of a client's playback at most (seconds)."""
    min_barge_in_chunks: int = 3
    """`turn_end: model`: interruptions shorter than this many 160 ms chunks are ignored."""

    def __post_init__(self) -> None:
        if self.tcp_enabled and not self.token and not _is_loopback(self.tcp_host):
            raise ValueError(f"TCP bind to {self.tcp_host} is not local: set server.token so that "
                             "clients must authenticate, or bind to 127.0.0.1")
        if self.socket_path is None and not self.tcp_enabled:
            raise ValueError("the server needs a Unix socket path or TCP enabled")
        if self.max_payload_bytes < 1024 or self.send_queue_events < 8 or self.keepalive_timeout_s <= 0:
            raise ValueError("max_payload_bytes >= 1024, send_queue_events >= 8, keepalive_timeout_s > 0")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServerStats:
    connections: int = 0
    sessions_started: int = 0
    refused: int = 0
    dropped_events: int = 0
    ended: dict[str, int] = field(default_factory=dict)
    """Why sessions or connections ended: reason code → count."""

    def count_end(self, code: str) -> None:
        self.ended[code] = self.ended.get(code, 0) + 1


class Connection:
    """One client socket: reads events, feeds its session, writes queued events."""

    def __init__(self, server: "SessionServer", reader, writer, peer: str, needs_token: bool) -> None:
        self.server, self.reader, self.writer, self.peer = server, reader, writer, peer
        self.needs_token = needs_token
        self.session: VoiceSession | None = None
        self._queue: deque[bytes] = deque()
        self._ready = asyncio.Event()
        self._end: tuple[str, str, str] | None = None  # (event, code, message) to send, then close
        self._pcm = bytearray()
        self.dropped = 0
        self._last_sent_s = time.monotonic()

    # -- sending (any thread) ---------------------------------------------------------
    def send_threadsafe(self, kind: str, data: dict, payload: bytes = b"") -> None:
        if self._end is not None:
            return
        frame = protocol.encode(kind, data, payload)
        try:
            self.server.loop.call_soon_threadsafe(self._enqueue, frame, kind == "audio-chunk")
        except RuntimeError:  # the loop has gone (server stopping): nobody to send to
            logger.debug("dropped %s for %s: server loop closed", kind, self.peer)

    def _enqueue(self, frame: bytes, droppable: bool) -> None:
        limit = self.server.settings.send_queue_events
        if len(self._queue) >= limit and (droppable or len(self._queue) >= 2 * limit):
            self.dropped += 1
            self.server.stats.dropped_events += 1
            if self.dropped >= self.server.settings.max_dropped_events:
                self.end("error", "slow-reader", f"client does not read: {self.dropped} events dropped")
            return
        self._queue.append(frame)
        self._ready.set()

    def end(self, event: str, code: str, message: str) -> None:
        """Finish after sending `event` (error / session-ended); on the loop thread."""
        if self._end is None:
            self._end = (event, code, message)
            self._ready.set()
            if code == "slow-reader":  # its socket buffer is full: writing more would block forever
                self.writer.transport.abort()

    async def write_loop(self) -> None:
        try:
            await self._write_loop()
        except (ConnectionError, OSError, asyncio.TimeoutError) as err:
            self.end("session-ended", "disconnected", f"connection lost while sending: {err}")

    async def _write_loop(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._queue and (self._end is None or self._end[1] != "slow-reader"):
                self.writer.write(self._queue.popleft())
                await self.writer.drain()
                self._last_sent_s = time.monotonic()
            if self._end is not None:
                event, code, message = self._end
                if code not in ("slow-reader", "disconnected"):
                    self.writer.write(protocol.encode(event, {"code": code, "message": message}))
                    await asyncio.wait_for(self.writer.drain(), 1.0)
                return

    # -- reading ------------------------------------------------------------------------
    async def read_loop(self) -> None:
        settings = self.server.settings
        while self._end is None:
            try:
                frame = await self._next_frame()
            except asyncio.TimeoutError:
                self.end("error", "timeout", f"idle for {settings.keepalive_timeout_s:g} s "
                         "(nothing received or sent, no answer in hand); send ping while idle")
                return
            except ProtocolError as err:
                self.end("error", err.code, str(err))
                return
            if frame is None:
                self.end("session-ended", "disconnected", "client closed the connection")
                return
            try:
                self._handle(frame)
            except ProtocolError as err:
                self.end("error", err.code, str(err))
                return

    async def _next_frame(self) -> Frame | None:
        """The next frame, or TimeoutError once the connection has been idle for the keepalive time:
        nothing received, nothing sent, and no work of the client's in hand. A client that waits in
        silence for an answer is not idle, however slowly a loaded machine produces it."""
        settings = self.server.settings
        quiet_since_s = time.monotonic()
        # One read for the whole wait: cancelling it between a header and its payload would lose the frame.
        read = asyncio.ensure_future(protocol.read_frame(self.reader, settings.max_payload_bytes))
        try:
            while True:
                now_s = time.monotonic()
                if self.session is not None and self.session.working_for_client:
                    quiet_since_s = now_s
                quiet_since_s = max(quiet_since_s, self._last_sent_s)
                remaining_s = quiet_since_s + settings.keepalive_timeout_s - now_s
                if remaining_s <= 0:
                    raise asyncio.TimeoutError
                # Polled: the session's work state changes on executor threads, without a wake-up.
                poll_s = min(remaining_s, settings.keepalive_timeout_s / 4)
                done, _ = await asyncio.wait({read}, timeout=poll_s)
                if done:
                    return read.result()
        finally:
            if not read.done():
                read.cancel()

    def _handle(self, frame: Frame) -> None:
        kind = frame.type
        if kind not in protocol.CLIENT_EVENTS:
            raise ProtocolError("unknown-event", f"unknown event type {kind[:40]!r}")
        if kind == "describe":
            self.send_threadsafe("info", self.server.info())
        elif kind == "ping":
            self.send_threadsafe("pong", {})
        elif kind == "pong":
            pass
        elif kind == "session-start":
            self._start_session(frame.data)
        elif self.session is None:
            raise ProtocolError("no-session", f"{kind} before session-start")
        elif kind == "audio-chunk":
            protocol.check_audio_format(frame.data, frame.payload)
            self._audio(frame.payload)
        elif kind == "turn-end":
            self.session.push_turn_end()
        elif kind == "played":
            samples = frame.data.get("samples")
            if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
                raise ProtocolError("bad-frame", "played needs a non-negative integer 'samples'")
            self.session.report_played(samples)
        elif kind == "session-end":
            self.end("session-ended", "client-ended", "the client ended the session")

    def _start_session(self, data: dict) -> None:
        if self.session is not None:
            raise ProtocolError("bad-frame", "session already started")
        token, expected = data.get("token", ""), self.server.settings.token
        valid = isinstance(token, str) and hmac.compare_digest(token.encode(), expected.encode())
        if self.needs_token and not valid:
            raise ProtocolError("unauthorized", "a valid token is required on this address")
        try:
            turn_end = TurnEndMode(data.get("turn_end", "model"))
        except ValueError as err:
            raise ProtocolError("bad-frame", "turn_end must be 'model' or 'client'") from err
        seed = data.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ProtocolError("bad-frame", "seed must be an integer")
        try:
            self.session = self.server.open_session(self, turn_end, seed)
        except SchedulerFull as err:
            self.server.stats.refused += 1
            raise ProtocolError("full", str(err)) from err
        started = {"session_id": self.session.session_id, **self.server.formats()}
        self.send_threadsafe("session-started", started)
        self.send_threadsafe("listening", {})

    def _audio(self, payload: bytes) -> None:
        assert self.session is not None
        self._pcm += payload
        chunk_bytes = CHUNK_SAMPLES * protocol.SAMPLE_WIDTH_BYTES
        while len(self._pcm) >= chunk_bytes:
            ints = np.frombuffer(bytes(self._pcm[:chunk_bytes]), dtype="<i2")
            del self._pcm[:chunk_bytes]
            self.session.push_audio(ints.astype(np.float32) / 32768.0)


class SessionServer:
    """Listens on a Unix socket and/or TCP; every client session runs on the shared scheduler."""

    def __init__(self, settings: ServerSettings, scheduler: Scheduler,
                 make_conversation: Callable[[int | None], Conversation], name: str = "freeze-omni") -> None:
        self.settings, self.scheduler, self.make_conversation = settings, scheduler, make_conversation
        self.name = name
        self.stats = ServerStats()
        self.loop: asyncio.AbstractEventLoop
        self.tcp_port: int | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[Connection] = set()
        self._handlers: set[asyncio.Task] = set()
        self._ids = itertools.count(1)

    def formats(self) -> dict:
        fmt = {"width": protocol.SAMPLE_WIDTH_BYTES, "channels": protocol.CHANNELS}
        return {"audio_in": {"rate": protocol.INPUT_RATE_HZ, **fmt},
                "audio_out": {"rate": protocol.OUTPUT_RATE_HZ, **fmt}}

    def info(self) -> dict:
        return {"name": self.name, "protocol": protocol.PROTOCOL_VERSION, **self.formats(),
                "chunk_samples": CHUNK_SAMPLES, "max_payload_bytes": self.settings.max_payload_bytes,
                "keepalive_timeout_s": self.settings.keepalive_timeout_s,
                "sessions": {"active": self.scheduler.session_count,
                             "max": self.scheduler.settings.max_sessions}}

    def open_session(self, conn: Connection, turn_end: TurnEndMode, seed: int | None) -> VoiceSession:
        session_id = f"s{next(self._ids)}"
        settings = VoiceSessionSettings(turn_end=turn_end, max_lead_s=self.settings.max_lead_s, seed=seed,
                                        min_barge_in_chunks=self.settings.min_barge_in_chunks)

        def on_close(reason: str) -> None:  # from an executor: idle timeout or a failed step
            code = "idle" if reason == "idle timeout" else "internal-error"
            self.loop.call_soon_threadsafe(conn.end, "error", code, reason)

        session = VoiceSession(session_id, self.make_conversation(seed), conn.send_threadsafe, settings,
                               clock=self.scheduler.clock, on_close=on_close, wake=self.scheduler.notify)
        self.scheduler.add(session)
        self.stats.sessions_started += 1
        logger.info("session %s started for %s (turn end %s)", session_id, conn.peer, turn_end.value)
        return session

    # -- serving ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        limit = protocol.MAX_HEADER_BYTES
        if self.settings.socket_path:
            path = Path(self.settings.socket_path)
            if path.is_socket():
                path.unlink()
            server = await asyncio.start_unix_server(
                lambda r, w: self._serve(r, w, needs_token=False), path=str(path), limit=limit)
            os.chmod(path, 0o660)
            self._servers.append(server)
            logger.info("listening on unix:%s", path)
        if self.settings.tcp_enabled:
            server = await asyncio.start_server(
                lambda r, w: self._serve(r, w, needs_token=bool(self.settings.token)),
                host=self.settings.tcp_host, port=self.settings.tcp_port, limit=limit)
            self.tcp_port = server.sockets[0].getsockname()[1]
            self._servers.append(server)
            logger.info("listening on tcp:%s:%d", self.settings.tcp_host, self.tcp_port)

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Stop listening, tell every client, and wait (bounded) for their handlers to finish."""
        for server in self._servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + timeout_s
        # A connection accepted just before the close starts its handler (and session) a few loop
        # iterations later: give it that time, and loop until no handler is left.
        await asyncio.sleep(0.02)
        while self._handlers and loop.time() < deadline_s:
            for conn in list(self._connections):
                conn.end("session-ended", "server-stopping", "the server is shutting down")
            await asyncio.wait(set(self._handlers), timeout=min(0.1, deadline_s - loop.time()))
        late = set(self._handlers)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=timeout_s)
        for server in self._servers:
            await server.wait_closed()
        self._servers = []

    async def _serve(self, reader, writer, needs_token: bool) -> None:
        peer = str(writer.get_extra_info("peername") or "unix")
        self.stats.connections += 1
        conn = Connection(self, reader, writer, peer, needs_token)
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        self._connections.add(conn)
        writer_task = asyncio.create_task(conn.write_loop())
        reader_task = asyncio.create_task(self._read(conn))
        try:
            await asyncio.wait({reader_task, writer_task}, return_when=asyncio.FIRST_COMPLETED)
            reader_task.cancel()  # the writer finished: the session has been ended from our side
            await asyncio.wait({writer_task}, timeout=2.0)
        finally:
            writer_task.cancel()
            self._finish(conn)
            writer.close()
            self._connections.discard(conn)
            if handler is not None:
                self._handlers.discard(handler)

    @staticmethod
    async def _read(conn: Connection) -> None:
        try:
            await conn.read_loop()
        except (ConnectionError, OSError) as err:
            conn.end("session-ended", "disconnected", f"connection lost: {err}")

    def _finish(self, conn: Connection) -> None:
        event, code, message = conn._end or ("session-ended", "disconnected", "connection lost")
        self.stats.count_end(code)
        who = conn.session.session_id if conn.session is not None else "-"
        log = logger.info if event == "session-ended" else logger.warning
        log("session %s (%s) ended: %s: %s", who, conn.peer, code, message)
        if conn.session is not None:
            self.scheduler.remove(conn.session.session_id)
            conn.session.close(f"{code}: {message}")


class ServerThread:
    """The server's event loop on a background thread (tests, `freeze-omni run`)."""

    def __init__(self, server: SessionServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="session-server", daemon=True)

    def start(self) -> "ServerThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
