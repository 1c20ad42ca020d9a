"""Transcription with a trained checkpoint: the frozen LLM writes what was said.

The layout is the one stage 2 trains (`training.stage2_connect`): the system prefill, then
`<|im_end|>` + user prefix + the `transcribe` task vector + the streamed adapter vectors +
assistant suffix, then greedy decoding until `<|im_end|>`. Encoder and adapter run through
the engine's streaming backend, chunk by chunk, exactly as in a dialogue.
"""
from __future__ import annotations

import math

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


@torch.inference_mode()
def transcribe(models: FreezeOmniModels, samples: np.ndarray, max_tokens: int = DEFAULT_MAX_TOKENS) -> str:
    """Greedy transcript of `samples` ([S] float in ±1 at 16 kHz), at most
    `transcript_token_cap(S, max_tokens)` tokens."""
    llm, tokenizer = models.llm, models.tokenizer
    cache = LlmKvCache()
    llm.prefill_system(None, tokenizer, cache)
    vectors = stream_vectors(models, samples)
    opening_ids = [llm.layout.end_of_turn_id, *llm.layout.user_prefix_ids]
    task = llm.heads.task_embeddings.weight[TRANSCRIBE_TASK_ID:TRANSCRIBE_TASK_ID + 1].to(vectors.dtype)
    embeds = torch.cat([llm.embed_tokens(opening_ids, vectors), task, vectors])
    llm.run(embeds, cache, [*opening_ids] + [None] * (embeds.shape[0] - len(opening_ids)))
    logits, _ = llm.start_answer(cache)
    ids: list[int] = []
    cap = transcript_token_cap(samples.shape[0], max_tokens)
    while len(ids) < cap:
        token = int(torch.argmax(logits))
        if token == llm.layout.end_of_turn_id:
            break
        ids.append(token)
        logits, _ = llm.feed_token(token, cache)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
