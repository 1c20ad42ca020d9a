"""Texts written by the frozen LLM: questions and statements from topic prompts, and its answers.

The paper regenerates every answer with the backbone so that stage 3's targets match the LLM's
own distribution; here the same frozen SmolLM2 writes them greedily under `ANSWER_SYSTEM_ROLE`.
Stage 3 must prefill that same system role for the targets to be the LLM's own continuation.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from training.data import templates
from training.data.texts import clean_spoken, dedup

logger = logging.getLogger(__name__)

ANSWER_SYSTEM_ROLE = "You are a helpful voice assistant. Answer in one or two short sentences."
TOPICS = (
    "cooking", "the weather", "travel", "sports", "music", "movies", "history", "space", "animals",
    "plants", "gardening", "health", "sleep", "exercise", "money", "shopping", "cars", "trains",
    "computers", "phones", "school", "science", "math", "geography", "the ocean", "birds", "pets",
    "books", "art", "holidays", "birthdays", "coffee", "tea", "breakfast", "baking", "the city",
    "camping", "hiking", "the beach", "winter", "summer", "rain", "friends", "family", "jobs",
    "the kitchen", "cleaning", "clothes", "shoes", "the moon", "the sun", "dinosaurs", "insects",
    "rivers", "mountains", "languages", "games", "the news", "time", "maps", "airports", "hotels",
    "restaurants", "fruit", "vegetables", "chocolate", "bicycles", "the internet", "robots", "doctors",
)
# Few-shot list prompts: the LLM continues a bulleted list with one more line about the topic.
# (A chat request such as "write a question about X" yields about one usable line in five; a
# list continuation about four in five.) The two examples are drawn from the templates per
# prompt so that the LLM does not keep echoing the same wording.
QUESTION_PROMPT = "Questions that people asked their voice assistant about {topic}:\n- {a}\n- {b}\n-"
STATEMENT_PROMPT = "Sentences that people said in conversations about {topic}:\n- {a}\n- {b}\n-"
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
BATCH_SIZE = 64
SAMPLING = {"do_sample": True, "temperature": 0.9, "top_p": 0.95, "top_k": 0}
WRITE_MAX_TOKENS = 28


@dataclass
class TextLlm:
    """The frozen LLM and its tokenizer, used only for text generation."""

    model: Any
    """A transformers causal LM in eval mode with no trainable parameters."""
    tokenizer: Any
    """Its tokenizer, padding on the left for batched generation."""

    @classmethod
    def load(cls, llm_dir: Path) -> "TextLlm":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32, local_files_only=True)
        model.eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
        tokenizer.padding_side = "left"  # batched generation appends on the right
        return cls(model, tokenizer)

    def chat_prompt(self, system: str, user: str) -> str:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], max_new_tokens: int, sample: bool, seed: int,
                 stop: Callable[[str], bool] | None = None) -> list[str]:
        """Continuations of `prompts` (one batch), greedy or sampled with a seeded generator."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.tokenizer
        enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        start = enc.input_ids.shape[1]

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
                texts = tok.batch_decode(input_ids[:, start:], skip_special_tokens=True)
                return torch.tensor([stop(t) for t in texts], dtype=torch.bool)

        torch.manual_seed(seed)  # generate() samples from the global generator
        sampling = SAMPLING if sample else {"do_sample": False}
        out = self.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                  stopping_criteria=StoppingCriteriaList([_Stop()]) if stop else None,
                                  **sampling)
        return tok.batch_decode(out[:, start:], skip_special_tokens=True)


def first_sentences(text: str, max_sentences: int = 2, enough_words: int = 8) -> str:
    """The first sentence, plus the second when the first is shorter than `enough_words` words.

    A text cut off by the token cap keeps only its complete sentences (or all of it if none is).
    """
    text = " ".join(text.split())
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not ends:
        return text
    cut = ends[0]
    if len(text[:cut].split()) < enough_words and max_sentences > 1 and len(ends) > 1:
        cut = ends[1]
    return text[:cut].strip()


def _two_sentences_done(text: str) -> bool:
    return len(_SENTENCE_END.findall(text)) >= 2


def write_texts(llm: TextLlm, kind: str, n: int, seed: int) -> list[str]:
    """`n` distinct questions (kind "question") or statements written by the LLM from topic prompts.

    Sampling is seeded per batch; lines that fail `clean_spoken` are dropped, so more candidates
    are drawn than kept (at most 8× `n`).
    """
    question = kind == "question"
    prompt, ending = (QUESTION_PROMPT, "?") if question else (STATEMENT_PROMPT, ".")
    examples = list(templates.question_texts() if question else templates.statement_texts())
    rng = np.random.default_rng([seed, 1 if question else 2])
    kept: list[str] = []
    seen: set[str] = set()
    bar = tqdm(total=n, desc=f"LLM {kind}s", unit="text", leave=False)
    for batch in range(max(1, 8 * n // BATCH_SIZE)):
        prompts = []
        for _ in range(BATCH_SIZE):
            a, b = rng.choice(len(examples), size=2, replace=False)
            topic = TOPICS[rng.integers(len(TOPICS))]
            prompts.append(prompt.format(topic=topic, a=examples[a], b=examples[b]))
        outs = llm.generate(prompts, WRITE_MAX_TOKENS, sample=True, seed=seed * 100_003 + batch,
                            stop=lambda t: "\n" in t.strip())
        lines = [clean_spoken(out.strip().split("\n")[0], ending) for out in outs]
        new = dedup((line for line in lines if line), seen)[: n - len(kept)]
        kept += new
        bar.update(len(new))
        if len(kept) >= n:
            break
    bar.close()
    if len(kept) < n:
        logger.warning("the LLM wrote only %d usable %ss of %d asked for", len(kept), kind, n)
    return kept


def answer_questions(llm: TextLlm, questions: Sequence[str], max_tokens: int) -> dict[str, str]:
    """Greedy answers under `ANSWER_SYSTEM_ROLE`, cut to their first sentence or two."""
    answers: dict[str, str] = {}
    # Similar lengths in a batch waste less on padding; the order does not change greedy output
    # beyond float noise, and the result is saved with the run anyway.
    order = sorted(questions, key=len)
    bar = tqdm(total=len(order), desc="LLM answers", unit="answer", leave=False)
    for i in range(0, len(order), BATCH_SIZE):
        batch = order[i:i + BATCH_SIZE]
        prompts = [llm.chat_prompt(ANSWER_SYSTEM_ROLE, q) for q in batch]
        outs = llm.generate(prompts, max_tokens, sample=False, seed=0, stop=_two_sentences_done)
        answers.update((q, first_sentences(a)) for q, a in zip(batch, outs))
        bar.update(len(batch))
    bar.close()
    return {q: answers[q] for q in questions}
