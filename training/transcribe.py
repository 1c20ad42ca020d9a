"""Transcription with a trained checkpoint: the frozen LLM writes what was said.

The layout is the one stage 2 trains (`training.stage2_connect`): the system prefill, then
`<|im_end|>` + user prefix + the `transcribe` task vector + the streamed adapter vectors +
assistant suffix, then greedy decoding until `<|im_end|>`. Encoder and adapter run through
the engine's streaming backend, chunk by chunk, exactly as in a dialogue.
"""
from __future__ import annotations

import numpy as np
import torch

from quantized_models.adapter import AdapterCache
from quantized_models.encoder import EncoderCache
from quantized_models.frontend import CHUNK_SAMPLES, FrontendCache, frontend_step
from quantized_models.llm import LlmKvCache
from quantized_models.model_dir import FreezeOmniModels
from training.model_config import TRANSCRIBE_TASK_ID

DEFAULT_MAX_TOKENS = 96


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
    """Greedy transcript of `samples` ([S] float in ±1 at 16 kHz)."""
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
    while len(ids) < max_tokens:
        token = int(torch.argmax(logits))
        if token == llm.layout.end_of_turn_id:
            break
        ids.append(token)
        logits, _ = llm.feed_token(token, cache)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
