"""`freeze-omni eval asr|states` and `freeze-omni transcribe`: a trained model on held-out voices.

Both evaluations run the engine's streaming path on the data set's `test` split:
- asr: word error rate of the frozen LLM transcribing each utterance (`training.transcribe`);
- states: every question / non-query is fed chunk by chunk to `Engine.listen_chunk`, followed
  by two silent chunks. A question counts as answered in time when the first decision is
  `respond` at its last chunk or within the 2 chunks after it; a non-query counts as ignored
  when the first decision is `ignore` by then; a mid-utterance pause counts as a false end
  when the first decision falls in a chunk that the pause overlaps.

Both also report the same figures per voice group (`by_voice`: the espeak language voice without
its variant, `piper:...`, `noise:<event>`), because the test split's voices are drawn uniformly
from its held-out combinations, so one held-out accent speaks about half of the test turns.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

RESPONSE_WINDOW_CHUNKS = 2  # a decision up to 2 chunks (320 ms) after the utterance's end is in time
METRIC_KEYS = ("wer", "respond_within_2_chunks", "ignore_rate", "false_end_rate", "n")


def normalise_words(text: str) -> list[str]:
    """Lower-case words without punctuation (apostrophes kept)."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def word_errors(hyp: Sequence[Hashable], ref: Sequence[Hashable]) -> int:
    """Levenshtein distance in words (or in any items that compare equal)."""
    row = list(range(len(ref) + 1))
    for i, h in enumerate(hyp, 1):
        prev, row[0] = row[0], i
        for j, r in enumerate(ref, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (h != r))
    return row[-1]


def spread(entries: list, limit: int | None) -> list:
    """`limit` entries evenly spaced over the list (the manifest is grouped by kind and voice)."""
    if limit is None or limit >= len(entries):
        return entries
    return [entries[i * len(entries) // limit] for i in range(limit)]


def voice_group(voice: str) -> str:
    """`espeak:en-gb+m3` -> `espeak:en-gb` (the language voice, i.e. the accent); others unchanged."""
    return voice.split("+", 1)[0]


def group_by_voice(pairs: list[tuple]) -> dict[str, list[tuple]]:
    """(entry, ...) tuples grouped by `voice_group(entry.voice)`, groups in sorted order."""
    groups: dict[str, list[tuple]] = {}
    for pair in pairs:
        groups.setdefault(voice_group(pair[0].voice), []).append(pair)
    return dict(sorted(groups.items()))


def word_error_rate(scored: list[tuple]) -> dict:
    """`wer` and `n` of (entry, word errors, reference words) triples: errors over words."""
    words = sum(n for _, _, n in scored)
    return {"wer": sum(errors for _, errors, _ in scored) / max(1, words), "n": len(scored)}


def eval_asr(models, data_dir: Path, limit: int | None = None, beam_width: int | None = None,
             no_speech_end_probability: float | None = None, ctc=None) -> dict:
    """WER over the test split's utterances that have text, overall and per voice group
    (transcripts by `transcribe`'s beam search; `beam_width` None: its default; the no-speech
    threshold and the CTC head (`transcribe.CtcDecoding`) as `transcribe` takes them)."""
    from training.data.manifest import read_manifest
    from training.features import load_wav
    from training.transcribe import DEFAULT_BEAM_WIDTH, transcribe

    width = DEFAULT_BEAM_WIDTH if beam_width is None else beam_width
    entries = spread([e for e in read_manifest(data_dir, "test") if normalise_words(e.text)], limit)
    scored = []
    for entry in tqdm(entries, desc="eval asr", unit="utterance", leave=False):
        ref = normalise_words(entry.text)
        text = transcribe(models, load_wav(data_dir / entry.wav), beam_width=width,
                          no_speech_end_probability=no_speech_end_probability, ctc=ctc)
        hyp = normalise_words(text)
        scored.append((entry, word_errors(hyp, ref), len(ref)))
        logger.debug("%s | ref: %s | hyp: %s", entry.id, " ".join(ref), " ".join(hyp))
    by_voice = {group: word_error_rate(pairs) for group, pairs in group_by_voice(scored).items()}
    return word_error_rate(scored) | {"by_voice": by_voice}


@dataclass(frozen=True)
class TurnOutcome:
    """First non-continue decision of one streamed utterance."""

    chunk: int | None
    """Index of the deciding chunk (None: never decided)."""
    decision: str | None
    """`respond` or `ignore`."""


def stream_turn(engine, samples: np.ndarray, seed: int = 0) -> TurnOutcome:
    """Feed one utterance plus RESPONSE_WINDOW_CHUNKS silent chunks to a fresh session."""
    import torch

    from assistant.dialogue import Decision
    from quantized_models.frontend import CHUNK_SAMPLES

    state = engine.prefill_system(engine.new_session(seed=seed))
    n = max(1, -(-samples.shape[0] // CHUNK_SAMPLES)) + RESPONSE_WINDOW_CHUNKS
    padded = torch.zeros(n * CHUNK_SAMPLES)
    padded[: samples.shape[0]] = torch.as_tensor(samples)
    for k in range(n):
        result, state = engine.listen_chunk(state, padded[k * CHUNK_SAMPLES:(k + 1) * CHUNK_SAMPLES])
        if result.decision is not Decision.CONTINUE:
            return TurnOutcome(k, "respond" if result.decision is Decision.RESPOND else "ignore")
    return TurnOutcome(None, None)


def score_turn(kind: str, num_samples: int, pauses: list[list[int]], outcome: TurnOutcome) -> dict:
    """Per-utterance flags: in_time (question answered / non-query ignored in time), false ends."""
    from quantized_models.frontend import CHUNK_SAMPLES

    last = max(1, -(-num_samples // CHUNK_SAMPLES)) - 1
    wanted = "respond" if kind == "question" else "ignore"
    in_time = (outcome.chunk is not None and last <= outcome.chunk <= last + RESPONSE_WINDOW_CHUNKS
               and outcome.decision == wanted)
    false_ends = sum(outcome.chunk is not None
                     and start // CHUNK_SAMPLES <= outcome.chunk <= end // CHUNK_SAMPLES
                     for start, end in pauses)
    return {"in_time": in_time, "false_ends": false_ends}


def state_rates(outcomes) -> dict[str, float | None]:
    """respond_within_2_chunks, ignore_rate and false_end_rate of (entry, TurnOutcome) pairs."""
    counts = {"question": [0, 0], "nonquery": [0, 0]}  # kind -> [in time, total]
    false_ends = pauses = 0
    for entry, outcome in outcomes:
        score = score_turn(entry.kind, entry.num_samples, entry.pause_spans, outcome)
        counts[entry.kind][0] += int(score["in_time"])
        counts[entry.kind][1] += 1
        false_ends += score["false_ends"]
        pauses += len(entry.pause_spans)
    rate = lambda hit, total: hit / total if total else None  # noqa: E731
    return {"respond_within_2_chunks": rate(*counts["question"]), "ignore_rate": rate(*counts["nonquery"]),
            "false_end_rate": rate(false_ends, pauses)}


def state_rates_by_voice(outcomes: list[tuple]) -> dict:
    """`state_rates` and `n` of (entry, TurnOutcome) pairs, overall and under `by_voice`."""
    by_voice = {group: state_rates(pairs) | {"n": len(pairs)}
                for group, pairs in group_by_voice(outcomes).items()}
    return state_rates(outcomes) | {"n": len(outcomes), "by_voice": by_voice}


def eval_states(engine, data_dir: Path, limit: int | None = None) -> dict:
    """respond_within_2_chunks, ignore_rate and false_end_rate over the test split, overall and
    per voice group."""
    from training.data.manifest import read_manifest
    from training.features import load_wav

    dialogue = [e for e in read_manifest(data_dir, "test") if e.kind in ("question", "nonquery")]
    entries = spread(dialogue, limit)
    streamed = [(entry, stream_turn(engine, load_wav(data_dir / entry.wav)))
                for entry in tqdm(entries, desc="eval states", unit="turn", leave=False)]
    return state_rates_by_voice(streamed)
