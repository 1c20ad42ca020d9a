"""The client protocol's framing: one JSON header line per event, then an optional binary payload.

In the style of the Wyoming protocol (Home Assistant satellites): a header is one line of UTF-8
JSON ending in `\\n`, `{"type": ..., "data": {...}, "data_length": n, "payload_length": m}`;
`data_length` bytes of extra JSON data (merged into `data`) and `payload_length` bytes of
payload follow it. `docs/PROTOCOL.md` is the full specification.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Final

PROTOCOL_VERSION: Final = "1.0"
MAX_HEADER_BYTES: Final = 65_536
"""Longest header line, newline included."""
MAX_DATA_BYTES: Final = 65_536
"""Longest `data_length` block."""
INPUT_RATE_HZ: Final = 16_000
OUTPUT_RATE_HZ: Final = 24_000
SAMPLE_WIDTH_BYTES: Final = 2
CHANNELS: Final = 1

CLIENT_EVENTS: Final = frozenset({
    "describe", "session-start", "audio-chunk", "turn-end", "played", "ping", "pong", "session-end",
})
"""Every event a client may send; anything else is a protocol error."""


class ProtocolError(ValueError):
    """The peer broke the protocol; `code` is sent back in an `error` event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Frame:
    type: str
    data: dict = field(default_factory=dict)
    payload: bytes = b""


def encode(kind: str, data: dict | None = None, payload: bytes = b"") -> bytes:
    """One event as bytes on the wire."""
    header: dict = {"type": kind}
    if data:
        header["data"] = data
    if payload:
        header["payload_length"] = len(payload)
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n" + payload


def parse_header(line: bytes) -> tuple[str, dict, int, int]:
    """Header line → (type, data, data_length, payload_length); raises `ProtocolError`."""
    try:
        header = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError("bad-frame", f"header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise ProtocolError("bad-frame", "header must be a JSON object")
    kind, data = header.get("type"), header.get("data", {})
    if not isinstance(kind, str) or not kind:
        raise ProtocolError("bad-frame", "header needs a string 'type'")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProtocolError("bad-frame", "'data' must be a JSON object")
    lengths = []
    for key in ("data_length", "payload_length"):
        value = header.get(key, 0) or 0
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ProtocolError("bad-frame", f"'{key}' must be a non-negative integer")
        lengths.append(value)
    return kind, data, lengths[0], lengths[1]


async def read_frame(reader: asyncio.StreamReader, max_payload_bytes: int) -> Frame | None:
    """The next event, or None at a clean end of stream; raises `ProtocolError`."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as err:
        if not err.partial.strip():
            return None
        raise ProtocolError("bad-frame", "connection closed inside a header") from err
    except asyncio.LimitOverrunError as err:
        raise ProtocolError("header-too-large", f"header line longer than {MAX_HEADER_BYTES} bytes") from err
    if len(line) > MAX_HEADER_BYTES:
        raise ProtocolError("header-too-large", f"header line longer than {MAX_HEADER_BYTES} bytes")
    if not line.strip():
        raise ProtocolError("bad-frame", "empty header line")
    kind, data, data_length, payload_length = parse_header(line)
    if data_length > MAX_DATA_BYTES:
        raise ProtocolError("payload-too-large", f"data_length {data_length} > {MAX_DATA_BYTES}")
    if payload_length > max_payload_bytes:
        raise ProtocolError("payload-too-large", f"payload_length {payload_length} > {max_payload_bytes}")
    try:
        if data_length:
            extra = json.loads((await reader.readexactly(data_length)).decode("utf-8"))
            if not isinstance(extra, dict):
                raise ProtocolError("bad-frame", "extra data must be a JSON object")
            data = {**data, **extra}
        payload = await reader.readexactly(payload_length) if payload_length else b""
    except asyncio.IncompleteReadError as err:
        raise ProtocolError("bad-frame", "connection closed inside a frame") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError("bad-frame", f"extra data is not JSON: {err}") from err
    return Frame(kind, data, payload)


def check_audio_format(data: dict, payload: bytes) -> None:
    """An `audio-chunk` from a client must be 16 kHz, 16-bit, mono, whole samples."""
    fmt = (data.get("rate"), data.get("width"), data.get("channels"))
    if fmt != (INPUT_RATE_HZ, SAMPLE_WIDTH_BYTES, CHANNELS):
        raise ProtocolError(
            "bad-audio-format",
            f"audio must be rate={INPUT_RATE_HZ} width={SAMPLE_WIDTH_BYTES} channels={CHANNELS}, "
            f"got rate={fmt[0]!r} width={fmt[1]!r} channels={fmt[2]!r}")
    if len(payload) % (SAMPLE_WIDTH_BYTES * CHANNELS):
        raise ProtocolError("bad-audio-format", f"payload of {len(payload)} bytes is not whole samples")
