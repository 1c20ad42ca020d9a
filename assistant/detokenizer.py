"""Incremental detokenizer: the full-decode text of a growing answer without re-decoding it.

The official pipeline decodes the whole token list again after every generated token (spec §4.5,
§12 item 13: O(n²) per answer). Segmentation (§6.1) depends on that exact text, character for
character — including the U+FFFD shown while a character's UTF-8 bytes are still incomplete — so
this module reproduces `tokenizer.decode(ids, skip_special_tokens=True)` after every token with a
constant amount of decoding work per token.

For byte-level BPE tokenizers (GPT-2 style, e.g. Qwen2) a full decode is: map every kept token
to its bytes, concatenate, and decode as UTF-8 with invalid sequences replaced. Python's UTF-8
decoder replaces the same maximal ill-formed subsequences as the Rust `from_utf8_lossy` used by
the `tokenizers` library, so an incremental decoder, plus a final decode of its still-pending
bytes, gives the identical string (checked against full decodes in tests/test_detokenizer.py).

Other tokenizers fall back to decoding a bounded window of recent ids: exact for well-formed
text, best effort around undecodable bytes (the window is force-committed after
`MAX_PENDING_WINDOW_TOKENS` undecided ids to stay bounded).
"""
from __future__ import annotations

import codecs
import logging
from typing import Any, Final

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR: Final = "\ufffd"
"""What a decode shows for bytes that do not (yet) form a valid UTF-8 character."""

MAX_PENDING_WINDOW_TOKENS: Final = 16
"""Window fallback only: ids left undecided before their text is committed regardless."""


def byte_to_unicode_table() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: each byte value -> the printable character standing for it.

    Printable Latin-1 bytes stand for themselves; the remaining 68 bytes (controls, space,
    NBSP, soft hyphen, ...) are mapped in increasing order to U+0100 and upwards.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(next_code_point)
            next_code_point += 1
    return table


def _is_byte_level(tokenizer: Any) -> bool:
    """True when `tokenizer` is a `tokenizers`-backed byte-level BPE without text clean-up."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or type(decoder).__name__ != "ByteLevel":
        return False
    # A clean-up pass rewrites spaces around punctuation after decoding; bytes cannot express it.
    return not getattr(tokenizer, "clean_up_tokenization_spaces", False)


class IncrementalDetokenizer:
    """Text of `tokenizer.decode(ids, skip_special_tokens=True)` for a growing list of ids.

    Usage: `text = detok.push(token_id)` after every generated token; `detok.text` holds the
    latest full text; `reset()` starts a new answer.

    Args:
        tokenizer: A Hugging Face tokenizer.
        byte_level: Force (True) or forbid (False) the byte-level path; None detects it.
    """

    def __init__(self, tokenizer: Any, *, byte_level: bool | None = None) -> None:
        self._tokenizer = tokenizer
        self._byte_level = _is_byte_level(tokenizer) if byte_level is None else byte_level
        if not self._byte_level:
            logger.info("tokenizer is not byte-level BPE; decoding a bounded window of ids")
        self._char_to_byte = {char: byte for byte, char in byte_to_unicode_table().items()}
        self._skipped_ids = {
            token_id
            for token_id, token in tokenizer.added_tokens_decoder.items()
            if getattr(token, "special", False)
        }
        # id -> bytes cache; bounded by the vocabulary size.
        self._id_bytes: dict[int, bytes] = {}
        self.reset()

    def reset(self) -> None:
        """Forget all pushed ids (start of a new answer)."""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stable_text = ""
        self._text = ""
        # Window fallback state: ids not yet committed, preceded by `_context_len` context ids.
        self._window: list[int] = []
        self._context_len = 0
        self._context_text = ""

    @property
    def text(self) -> str:
        """Full decoded text of all ids pushed since the last reset."""
        return self._text

    def push(self, token_id: int) -> str:
        """Append one id and return the full decoded text so far.

        Args:
            token_id: The generated token id (special tokens contribute no text).

        Returns:
            The same string as decoding all ids pushed since `reset()` in one call.
        """
        if self._byte_level:
            self._push_bytes(int(token_id))
        else:
            self._push_window(int(token_id))
        return self._text

    # -- byte-level path ---------------------------------------------------------------------

    def _token_bytes(self, token_id: int) -> bytes:
        cached = self._id_bytes.get(token_id)
        if cached is not None:
            return cached
        if token_id in self._skipped_ids:
            raw = b""
        else:
            token = self._tokenizer.convert_ids_to_tokens(token_id)
            if token is None:  # an id the tokenizer does not know: decode skips it silently
                raw = b""
            else:
                try:
                    raw = bytes(self._char_to_byte[char] for char in token)
                except KeyError:
                    # Like the `tokenizers` ByteLevel decoder: a token with a character outside
                    # the byte alphabet (e.g. an added token) contributes its own UTF-8 bytes.
                    raw = token.encode("utf-8")
        self._id_bytes[token_id] = raw
        return raw

    def _push_bytes(self, token_id: int) -> None:
        raw = self._token_bytes(token_id)
        if not raw:
            return
        self._stable_text += self._utf8.decode(raw)
        pending_bytes, _ = self._utf8.getstate()
        # A full decode ends the text here. The decoder holds back at most 3 bytes, usually a
        # valid prefix (one U+FFFD) but sometimes already invalid (e.g. a surrogate lead such
        # as ED AF, two U+FFFD), so decode them as a final chunk rather than guess.
        tail = pending_bytes.decode("utf-8", errors="replace") if pending_bytes else ""
        self._text = self._stable_text + tail

    # -- window fallback ---------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _push_window(self, token_id: int) -> None:
        self._window.append(token_id)
        window_text = self._decode(self._window)
        # Context ids are decoded along with the new ones so that tokenizers which strip or add
        # leading spaces at the start of a decode see the same neighbourhood as a full decode.
        new_text = window_text[len(self._context_text) :]
        self._text = self._stable_text + new_text
        n_pending = len(self._window) - self._context_len
        complete = new_text and not new_text.endswith(REPLACEMENT_CHAR)
        if complete or n_pending >= MAX_PENDING_WINDOW_TOKENS:
            self._stable_text += new_text
            self._window = self._window[self._context_len :]
            self._context_len = len(self._window)
            self._context_text = self._decode(self._window)
