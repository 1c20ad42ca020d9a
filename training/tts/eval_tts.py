"""`freeze-omni eval tts`: intelligibility of the speech output on held-out answers.

For each test question of part 1's text bank with an LLM answer, the answer is spoken twice:
by piper (the reference voice the codec and decoder learn) and by the engine's streaming speech
path (`training.tts.speak.say_text`: segmentation, decoder, codec windows, emission). pocketsphinx
(the English model inside its wheel) transcribes both; `ratio` = WER(engine) / WER(piper), for
speech-decoder top-k 1..5 (the paper's table), with and without the prefix. `eos_rate` is the
share of spoken segments that ended with EOS before the engine's token cap.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


from training.eval import normalise_words, spread, word_errors

logger = logging.getLogger(__name__)

METRIC_KEYS = ("wer", "reference_wer", "ratio", "eos_rate", "n")
RELEASED_TOP_K = 2  # server.json decoder_top_k


@contextlib.contextmanager
def prefix_used(models: Any, use: bool) -> Iterator[None]:
    """Run the decoder with (the trained setting) or without its LLM hidden-state prefix."""
    decoder = models.backends.decoder
    saved = decoder.dims
    decoder.dims = dataclasses.replace(saved, kv_cache_prefix_finetune=saved.kv_cache_prefix_finetune and use)
    try:
        yield
    finally:
        decoder.dims = saved


@dataclasses.dataclass
class Tally:
    """Word errors and segment endings of one setting."""

    errors: int = 0
    words: int = 0
    segments: int = 0
    eos: int = 0

    def wer(self) -> float:
        return self.errors / max(1, self.words)


def held_out_answers(data: Path, limit: int | None) -> list[tuple[str, str]]:
    """(question, answer) of the bank's test split, evenly spread."""
    from training.tts.pairs import load_bank

    bank = load_bank(data)
    pairs = [(q, bank.answers[q]) for q in bank.questions.get("test", []) if bank.answers.get(q)]
    if not pairs:
        raise ValueError(f"{data}: no test question has an LLM answer (build the data with an LLM)")
    return spread(pairs, limit)


def eval_tts(engine: Any, data: Path, top_ks: Sequence[int] = (1, 2, 3, 4, 5),
             prefixes: Sequence[bool] = (True, False), limit: int | None = 30, seed: int = 0,
             speak: Any = None, recognize: Any = None, speech_cache: Path | None = None) -> dict[str, Any]:
    """Metrics per (top-k, prefix) setting; the top-level keys are those of one setting.

    Args:
        engine: an `Engine` over the model directory to evaluate.
        speak: text -> (samples, rate) of the reference voice (default: piper).
        recognize: (samples, rate) -> text (default: pocketsphinx, `training.codec.asr`).
        speech_cache: folder of piper renderings to reuse (see `PiperNative`).
    """
    from training.tts.pairs import PiperNative
    from training.tts.speak import codec_rate_hz, speak_segments
    from training.tts.teacher import teacher_forced_segments

    speak = speak or PiperNative(cache_dir=speech_cache)
    if recognize is None:
        from training.codec.asr import Recognizer

        recognize = Recognizer().transcribe
    answers = held_out_answers(data, limit)
    reference = Tally()
    tallies = {(k, p): Tally() for p in prefixes for k in top_ks}
    for question, answer in answers:
        ref = normalise_words(answer)
        samples, rate = speak(answer)
        reference.errors += word_errors(normalise_words(recognize(samples, rate)), ref)
        reference.words += len(ref)
        models = engine.models  # one teacher-forced LLM pass per answer serves every setting
        segments = teacher_forced_segments(models.llm.causal_lm, models.tokenizer, models.llm.layout, answer,
                                           question, None, engine.options.segmentation)
        for (k, use_prefix), tally in tallies.items():
            with prefix_used(models, use_prefix):
                spoken = speak_segments(_with_top_k(engine, k), segments, seed)
            hyp = normalise_words(recognize(spoken.pcm, codec_rate_hz(engine)))
            tally.errors += word_errors(hyp, ref)
            tally.words += len(ref)
            ends = [s["end_reason"] for s in spoken.segments if s["end_reason"] != "empty"]
            tally.segments += len(ends)
            tally.eos += sum(e == "eos" for e in ends)
            logger.debug("k=%d prefix=%s | ref: %s | hyp: %s", k, use_prefix, " ".join(ref), " ".join(hyp))
    ref_wer = reference.wer()
    table = [{"top_k": k, "prefix": p, "wer": t.wer(),
              "ratio": t.wer() / ref_wer if ref_wer > 0 else None,
              "eos_rate": t.eos / t.segments if t.segments else None}
             for (k, p), t in tallies.items()]
    # The top-level keys report the released setting (top-k 2 with the prefix) when it was run.
    first = next((row for row in table if row["top_k"] == RELEASED_TOP_K and row["prefix"]), table[0])
    return {"wer": first["wer"], "reference_wer": ref_wer, "ratio": first["ratio"],
            "eos_rate": first["eos_rate"], "n": len(answers), "setting": {"top_k": first["top_k"],
            "prefix": first["prefix"]}, "table": table}


def _with_top_k(engine: Any, k: int) -> Any:
    """The same engine (models shared) with another speech-decoder top-k."""
    from assistant.engine import Engine

    return Engine(engine.models, dataclasses.replace(engine.options, speech_top_k=k))
