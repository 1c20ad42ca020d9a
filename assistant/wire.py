"""Blocking client side of the protocol (`docs/PROTOCOL.md`): connect, send and receive events.

Used by `freeze-omni client` and the tests; no audio here.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

from assistant import protocol
from assistant.protocol import Frame, ProtocolError


def parse_address(address: str) -> tuple[int, object]:
    """`unix:/run/x.sock`, `/path/x.sock` or `HOST:PORT` → (socket family, address)."""
    if address.startswith("unix:"):
        return socket.AF_UNIX, address[len("unix:"):]
    if address.startswith("/") or address.startswith("."):
        return socket.AF_UNIX, address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r}: expected HOST:PORT or unix:/path/to.sock")
    return socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET, (host.strip("[]"), int(port))


class WireConnection:
    """One connection to a session server."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._file = sock.makefile("rb")

    @classmethod
    def connect(cls, address: str | Path, timeout_s: float = 5.0) -> "WireConnection":
        family, target = parse_address(str(address))
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(target)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    def send(self, kind: str, data: dict | None = None, payload: bytes = b"") -> None:
        self.sock.sendall(protocol.encode(kind, data, payload))

    def recv(self, timeout_s: float | None = 5.0) -> Frame | None:
        """The next event; None when the server closed the connection."""
        self.sock.settimeout(timeout_s)
        line = self._file.readline(protocol.MAX_HEADER_BYTES + 1)
        if not line:
            return None
        kind, data, data_length, payload_length = protocol.parse_header(line)
        if data_length:
            data = {**data, **json.loads(self._file.read(data_length))}
        payload = self._file.read(payload_length) if payload_length else b""
        if len(payload) != payload_length:
            raise ProtocolError("bad-frame", "connection closed inside a frame")
        return Frame(kind, data, payload)

    def recv_until(self, kind: str, timeout_s: float = 30.0) -> tuple[Frame | None, list[Frame]]:
        """Events up to and including the first of type `kind` (None if the stream ended)."""
        seen: list[Frame] = []
        while True:
            frame = self.recv(timeout_s)
            if frame is None:
                return None, seen
            seen.append(frame)
            if frame.type == kind:
                return frame, seen

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self.sock.close()
