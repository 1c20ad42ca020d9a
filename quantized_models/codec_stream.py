"""Streaming codec: token windows with context margins (spec 8.2) and quiet-point emission (8.3).

Per text segment, codec tokens arrive one at a time. A window of
`left + chunk + right` tokens is decoded as soon as it is complete; the audio of the context
tokens is cut, and the kept slice goes through `find_min_sum_index`, which releases audio
only up to a quiet sample. The concatenation of all pieces equals the concatenation of the
kept slices (`samples_per_token` samples per token): emission changes timing, never samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

OFFLINE_CHUNK_TOKENS = 40  # bin/inference.py codec_chunk_size
SERVER_FIRST_CHUNK_TOKENS = 20  # server.json decoder_first_chunk_size (first segment of an answer)
PADDING_TOKENS = 10  # codec_padding_size / decoder_chunk_overlap_size
QUIET_WINDOW_SAMPLES = 2401  # decoder_N: width of the sliding |x| sum
OFFLINE_THRESHOLD = 0.01  # inference.py default seg_threshold (mean |x| of the quietest window)
SERVER_FIRST_THRESHOLD = 0.1  # server.json decoder_seg_threshold_first_pack
SERVER_THRESHOLD = 0.015  # server.json decoder_seg_threshold


class WindowDecoder(Protocol):
    """What the stream needs from the codec (`quantized_models.codec.CodecDecoder`)."""

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """LongTensor [T] -> pcm [T * samples_per_token]."""
        ...


@dataclass(frozen=True)
class CodecStreamConfig:
    """Window and emission parameters of one segment."""

    samples_per_token: int
    """Product of the codec's upsample rates (600 for the released codec)."""
    chunk_tokens: int = OFFLINE_CHUNK_TOKENS
    """Tokens of new audio per window."""
    padding_tokens: int = PADDING_TOKENS
    """Context tokens decoded (and cut) on each side of a window."""
    quiet_window_samples: int = QUIET_WINDOW_SAMPLES
    """N of find_min_sum_index."""
    threshold: float = OFFLINE_THRESHOLD
    """Emit only if the quietest window's mean |x| is below this."""
    keep_records: bool = False
    """Keep decoded windows and emission decisions in the state (tests, debugging)."""

    def __post_init__(self) -> None:
        if self.samples_per_token < 1 or self.chunk_tokens < 1 or self.padding_tokens < 0:
            raise ValueError("samples_per_token and chunk_tokens must be >= 1, padding_tokens >= 0.")
        if self.quiet_window_samples < 1:
            raise ValueError("quiet_window_samples must be >= 1.")


@dataclass
class WindowRecord:
    """One decoded window."""

    token_start: int  # index (within the segment) of the window's first token
    tokens: list[int]  # the decoded ids
    pcm: torch.Tensor  # [len(tokens) * samples_per_token], full decode incl. margins
    kept: tuple[int, int]  # [start, end) samples of `pcm` that were kept


@dataclass
class EmissionRecord:
    """One find_min_sum_index decision (same fields as the fixture's segments.json)."""

    buffer_len_in: int
    syn_len: int
    N: int
    threshold: float
    emitted: bool
    buffer_len_out: int
    cut_index: int | None = None
    piece_len: int | None = None


@dataclass
class CodecStreamState:
    """Streaming state of one segment (create or `reset()` per segment).

    Tokens are bounded by one window; `held` grows only while no quiet point is found, so it
    is bounded by the segment's token cap (as in the official code, loud speech is held back).
    """

    config: CodecStreamConfig
    tokens: list[int] = field(default_factory=list)
    """Token buffer, at most padding + chunk + padding ids."""
    left_tokens: int = 0
    """Left-context tokens at the head of `tokens` (0 before the first window)."""
    consumed: int = 0
    """Segment tokens that have left `tokens` (so tokens[0] is segment token `consumed`)."""
    held: torch.Tensor | None = None
    """[H] audio waiting for a quiet cut point, or None."""
    windows: list[WindowRecord] = field(default_factory=list)
    emissions: list[EmissionRecord] = field(default_factory=list)

    def reset(self) -> None:
        self.tokens, self.left_tokens, self.consumed, self.held = [], 0, 0, None
        self.windows, self.emissions = [], []


def find_min_sum_index(
    held: torch.Tensor | None, syn: torch.Tensor, n: int, threshold: float
) -> tuple[torch.Tensor | None, torch.Tensor | None, EmissionRecord]:
    """Official quiet-point search, including its double-counted offset.

    Args:
        held: [H] audio not yet emitted, or None.
        syn: [L] newly kept slice.
        n: sliding window width in samples.
        threshold: emit when min(window sum) / n < threshold.
    Returns:
        (new held [H'] or None, emitted piece [P] or None, record).
    """
    held_len = 0 if held is None else held.numel()
    length = syn.numel()
    record = EmissionRecord(held_len, length, n, threshold, False, held_len + length)
    if length < n:  # the official conv would be empty and crash; hold the audio instead
        return _cat(held, syn), None, record
    sums = F.conv1d(syn.abs().view(1, 1, -1), syn.new_ones(1, 1, n)).view(-1)  # [L - n + 1]
    search_from = length // 2 - n // 2
    best = int(torch.argmin(sums[search_from:]))
    start = search_from + best
    end = min(length, start + best + n)  # quirk: `best` is counted twice in the official code
    cut = start + int(torch.argmin(syn[start:end].abs()))
    if float(sums[search_from + best]) / n >= threshold:
        return _cat(held, syn), None, record
    piece = _cat(held, syn[:cut])
    rest = syn[cut:]
    record.emitted, record.buffer_len_out = True, rest.numel()
    record.cut_index, record.piece_len = cut, piece.numel()
    return rest, piece, record


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat((a, b))


def _decode_window(state: CodecStreamState, codec: WindowDecoder, right_tokens: int) -> torch.Tensor:
    """Decode the buffer; return the slice without `left_tokens` and `right_tokens` context."""
    spt = state.config.samples_per_token
    ids = torch.tensor(state.tokens, dtype=torch.long)
    pcm = codec.decode(ids)  # [len(tokens) * spt]
    kept = (state.left_tokens * spt, (len(state.tokens) - right_tokens) * spt)
    if state.config.keep_records:
        state.windows.append(WindowRecord(state.consumed, list(state.tokens), pcm, kept))
    return pcm[kept[0] : kept[1]]


def push_token(state: CodecStreamState, token: int, codec: WindowDecoder) -> list[torch.Tensor]:
    """Add one codec id; returns the pieces ready for playback (zero or one)."""
    cfg = state.config
    state.tokens.append(int(token))
    if len(state.tokens) < state.left_tokens + cfg.chunk_tokens + cfg.padding_tokens:
        return []
    syn = _decode_window(state, codec, cfg.padding_tokens)
    keep = 2 * cfg.padding_tokens  # next window: 10 left context + the 10 right context just cut
    state.consumed += len(state.tokens) - keep
    state.tokens = state.tokens[len(state.tokens) - keep :]
    state.left_tokens = cfg.padding_tokens
    state.held, piece, record = find_min_sum_index(
        state.held, syn, cfg.quiet_window_samples, cfg.threshold
    )
    if cfg.keep_records:
        state.emissions.append(record)
    return [] if piece is None else [piece]


def flush(state: CodecStreamState, codec: WindowDecoder) -> list[torch.Tensor]:
    """End of segment: decode what is buffered and emit it with the held audio."""
    piece = state.held
    if len(state.tokens) > state.left_tokens:
        piece = _cat(piece, _decode_window(state, codec, right_tokens=0))
    state.consumed += len(state.tokens)
    state.tokens, state.held = [], None
    return [] if piece is None or piece.numel() == 0 else [piece]
