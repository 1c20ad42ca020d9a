"""Transcription with a trained checkpoint: the frozen LLM writes what was said.

The layout is the one stage 2 trains (`training.stage2_connect`): the system prefill, then
`<|im_end|>` + user prefix + the `transcribe` task vector + the streamed adapter vectors +
assistant suffix, then a beam search (or greedy decoding, width 1) until `<|im_end|>`. Encoder
and adapter run through the engine's streaming backend, chunk by chunk, exactly as in a dialogue.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from quantized_models.adapter import AdapterCache
from quantized_models.encoder import EncoderCache
from quantized_models.frontend import CHUNK_SAMPLES, SAMPLE_RATE_HZ, FrontendCache, frontend_step
from quantized_models.llm import LlmKvCache
from quantized_models.model_dir import FreezeOmniModels
from training.model_config import TRANSCRIBE_TASK_ID

DEFAULT_MAX_TOKENS = 96
TRANSCRIPT_TOKENS_PER_S = 8.0
"""No transcript is longer than this many tokens per second of audio (plus TRANSCRIPT_TOKEN_SLACK):
of the 7,415 spoken texts of `train data --size full --seed 0`, 99 % hold under 5.5 SmolLM2 tokens
per second of their speech, and all 29,660 of seeds 0–3 are within the cap. A longer one is the
LLM looping ("uh uh uh ..."), which cost 3.5 points of `eval asr`'s WER on one filler."""
TRANSCRIPT_TOKEN_SLACK = 8
DEFAULT_BEAM_WIDTH = 4
"""Beam width of `transcribe`: on the unheard valid split (120 utterances) width 8 was no better
than 4. On 120 held-out test utterances of the kept model it gives a WER of 44.4 %, greedy
decoding (width 1) 51.7 % (training/README.md)."""


def transcript_token_cap(num_samples: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
    """Most tokens a transcript of `num_samples` of 16 kHz speech may have."""
    by_length = TRANSCRIPT_TOKEN_SLACK + math.ceil(TRANSCRIPT_TOKENS_PER_S * num_samples / SAMPLE_RATE_HZ)
    return min(max_tokens, by_length)


@torch.inference_mode()
def stream_vectors(models: FreezeOmniModels, samples: np.ndarray) -> torch.Tensor:
    """[2 N, H] adapter vectors of a fresh stream, one 160 ms chunk at a time."""
    frontend = FrontendCache.zeros(models.n_mels)
    encoder, adapter = EncoderCache(), AdapterCache()
    n = max(1, -(-samples.shape[0] // CHUNK_SAMPLES))
    padded = torch.zeros(n * CHUNK_SAMPLES)
    padded[: samples.shape[0]] = torch.as_tensor(samples, dtype=torch.float32)
    vectors = []
    for k in range(n):
        fbank, frontend = frontend_step(padded[k * CHUNK_SAMPLES:(k + 1) * CHUNK_SAMPLES], frontend)
        fbank = fbank.to(device=models.device, dtype=models.dtype)
        out, encoder, adapter = models.backends.speech_input.step(fbank, encoder, adapter)
        vectors.append(out[0])
    return torch.cat(vectors)


@dataclass(frozen=True)
class _Hypothesis:
    log_prob: float
    ids: tuple[int, ...]
    state: Any
    """The state after feeding all of `ids`: what `feed` continues from."""


def beam_search(
    first_logits: torch.Tensor,
    state: Any,
    feed: Callable[[int, Any], tuple[torch.Tensor, Any]],
    end_id: int,
    max_tokens: int,
    width: int,
) -> list[int]:
    """Token ids (without the end token) of the likeliest hypothesis a beam of `width` finds.

    `feed(token, state)` returns the next-token logits and the new state; it may change the state
    it is given, so every continued hypothesis feeds its own copy (`copy.deepcopy`), except the
    last one to continue from a parent. A hypothesis finishes on `end_id` or at `max_tokens`
    tokens. Finished hypotheses are ranked by their log-probability alone (normalising it by the
    length was worse on the valid split), and a log-probability only falls as a hypothesis grows,
    so the search stops once no live one is likelier than the best finished one. Width 1 is greedy
    decoding.
    """
    if width < 1:
        raise ValueError(f"beam width must be at least 1, not {width}")
    alive = [(_Hypothesis(0.0, (), state), first_logits)]
    best: tuple[float, tuple[int, ...]] = (-math.inf, ())
    while alive:
        candidates = []
        for hyp, logits in alive:
            top = torch.topk(torch.log_softmax(logits.float(), -1), width)
            candidates += [(hyp.log_prob + v, hyp, t) for v, t in zip(top.values.tolist(), top.indices.tolist())]
        candidates.sort(key=lambda c: -c[0])
        continued: list[tuple[float, _Hypothesis, int]] = []
        for log_prob, hyp, token in candidates:
            if len(continued) == width or log_prob <= best[0]:
                break
            ids = hyp.ids if token == end_id else hyp.ids + (token,)
            if token == end_id or len(ids) >= max_tokens:
                best = (log_prob, ids)  # candidates come likeliest first, so it beats the old best
            else:
                continued.append((log_prob, hyp, token))
        alive = []
        for i, (log_prob, hyp, token) in enumerate(continued):
            shared = any(later is hyp for _, later, _ in continued[i + 1:])
            logits, new_state = feed(token, copy.deepcopy(hyp.state) if shared else hyp.state)
            alive.append((_Hypothesis(log_prob, hyp.ids + (token,), new_state), logits))
    return list(best[1])


@torch.inference_mode()
def transcribe(
    models: FreezeOmniModels,
    samples: np.ndarray,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    beam_width: int = DEFAULT_BEAM_WIDTH,
) -> str:
    """Transcript of `samples` ([S] float in ±1 at 16 kHz) by a beam search of `beam_width`
    (1: greedy), at most `transcript_token_cap(S, max_tokens)` tokens."""
    llm, tokenizer = models.llm, models.tokenizer
    cache = LlmKvCache()
    llm.prefill_system(None, tokenizer, cache)
    vectors = stream_vectors(models, samples)
    opening_ids = [llm.layout.end_of_turn_id, *llm.layout.user_prefix_ids]
    task = llm.heads.task_embeddings.weight[TRANSCRIBE_TASK_ID:TRANSCRIBE_TASK_ID + 1].to(vectors.dtype)
    embeds = torch.cat([llm.embed_tokens(opening_ids, vectors), task, vectors])
    llm.run(embeds, cache, [*opening_ids] + [None] * (embeds.shape[0] - len(opening_ids)))
    logits, _ = llm.start_answer(cache)

    def feed(token: int, state: LlmKvCache) -> tuple[torch.Tensor, LlmKvCache]:
        return llm.feed_token(token, state)[0], state

    cap = transcript_token_cap(samples.shape[0], max_tokens)
    ids = beam_search(logits, cache, feed, llm.layout.end_of_turn_id, cap, beam_width)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
