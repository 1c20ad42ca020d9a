"""`freeze-omni eval dialogue`: does speech keep the frozen LLM's text intelligence?

Each held-out spoken question (the data set's `test` split: held-out voices) is answered twice,
greedily and under the same system role the answers were written with (`ANSWER_SYSTEM_ROLE`):
- spoken: through the engine, the whole recording as the user turn (encoder, adapter, prompt
  embeddings, frozen LLM), then the LLM's answer tokens;
- typed: by the same frozen LLM reading the question's text through its chat template.
`agreement` is the share whose first sentences are the same words; `keyword_agreement` the share
where at least half of the typed first sentence's content words appear in the spoken answer's
first sentence (the paper's claim: the speech input leaves the LLM's answers as they were).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.eval import normalise_words, spread

logger = logging.getLogger(__name__)

DIALOGUE_METRIC_KEYS = ("agreement", "keyword_agreement", "n")
ANSWER_MAX_TOKENS = 40  # a first sentence is rarely longer; the answers in the data set are cut there
KEYWORD_SHARE = 0.5
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
STOPWORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been being am "
    "it its it's this that these those there here i you he she we they me him her us them my your "
    "his our their do does did can could will would should may might must shall not no yes so "
    "than then too very just also about into over under up down out what which who whom whose "
    "when where why how all any some each every more most other such only own same s t".split())


def first_sentence(text: str) -> str:
    """Text up to and including its first `.`, `!` or `?` (all of it when there is none)."""
    text = " ".join(text.split())
    match = _SENTENCE_END.search(text)
    return text[: match.end()] if match else text


def content_words(text: str) -> set[str]:
    return {w for w in normalise_words(text) if w not in STOPWORDS}


@dataclass(frozen=True)
class AnswerPair:
    question: str
    spoken: str
    typed: str

    @property
    def agrees(self) -> bool:
        return normalise_words(first_sentence(self.spoken)) == normalise_words(first_sentence(self.typed))

    @property
    def keywords_agree(self) -> bool:
        wanted = content_words(first_sentence(self.typed))
        if not wanted:
            return self.agrees
        return len(wanted & content_words(first_sentence(self.spoken))) >= KEYWORD_SHARE * len(wanted)


def spoken_answer(engine, samples: np.ndarray, role: str, max_tokens: int = ANSWER_MAX_TOKENS) -> str:
    """Greedy answer of the engine to one recording, the whole recording being the user turn."""
    import torch

    from quantized_models.frontend import CHUNK_SAMPLES

    state = engine.prefill_system(engine.new_session(seed=0), role=role)
    n = max(1, -(-samples.shape[0] // CHUNK_SAMPLES))
    padded = torch.zeros(n * CHUNK_SAMPLES)
    padded[: samples.shape[0]] = torch.as_tensor(samples)
    for k in range(n):
        _, state = engine.listen_chunk(state, padded[k * CHUNK_SAMPLES:(k + 1) * CHUNK_SAMPLES],
                                       follow_decision=False)
    result, state = engine.start_speaking(state)
    while not result.finished and len(state.answer.tokens) < max_tokens:
        if _SENTENCE_END.search(state.answer.detokenizer.text):
            break  # the first sentence is all that is compared
        result, state = engine.next_token(state)
    return state.answer.detokenizer.text


def greedy_engine(models):
    from assistant.engine import Engine, EngineOptions
    from quantized_models.sampling import TextSamplingConfig

    return Engine(models, EngineOptions(text_sampling=TextSamplingConfig(temperature=1.0, top_k=1, top_p=0.0),
                                        max_new_tokens=ANSWER_MAX_TOKENS))


def eval_dialogue(models, llm_dir: Path, data_dir: Path, limit: int | None = None) -> dict:
    """agreement, keyword_agreement and n over the test split's spoken questions."""
    from training.data.llm_texts import ANSWER_SYSTEM_ROLE, TextLlm
    from training.data.manifest import read_manifest
    from training.features import load_wav

    entries = spread([e for e in read_manifest(data_dir, "test") if e.kind == "question" and e.text], limit)
    if not entries:
        raise ValueError(f"{data_dir}: the test split holds no spoken questions")
    engine, text_llm = greedy_engine(models), TextLlm.load(llm_dir)
    pairs = []
    for entry in tqdm(entries, desc="eval dialogue", unit="question", leave=False):
        spoken = spoken_answer(engine, load_wav(data_dir / entry.wav), ANSWER_SYSTEM_ROLE)
        prompt = text_llm.chat_prompt(ANSWER_SYSTEM_ROLE, entry.text)
        typed = text_llm.generate([prompt], ANSWER_MAX_TOKENS, sample=False, seed=0,
                                  stop=lambda text: _SENTENCE_END.search(text) is not None)[0]
        pairs.append(AnswerPair(entry.text, spoken, typed))
        logger.debug("%s | typed: %s | spoken: %s", entry.text, first_sentence(typed), first_sentence(spoken))
    return {"agreement": sum(p.agrees for p in pairs) / len(pairs),
            "keyword_agreement": sum(p.keywords_agree for p in pairs) / len(pairs), "n": len(pairs)}
