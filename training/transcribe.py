"""Transcription with a trained checkpoint: the frozen LLM writes what was said.

The layout is the one stage 2 trains (`training.stage2_connect`): the system prefill, then
`<|im_end|>` + user prefix + the `transcribe` task vector + the streamed adapter vectors +
assistant suffix, then a beam search (or greedy decoding, width 1) until `<|im_end|>`. Encoder
and adapter run through the engine's streaming backend, chunk by chunk, exactly as in a dialogue.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from quantized_models.adapter import AdapterCache
from quantized_models.encoder import EncoderCache
from quantized_models.frontend import CHUNK_SAMPLES, SAMPLE_RATE_HZ, FrontendCache, frontend_step
from quantized_models.llm import LlmKvCache, run_trunk
from quantized_models.model_dir import FreezeOmniModels
from training.llm_sequence import VECTORS_PER_CHUNK
from training.model_config import INFO_NAME, TRANSCRIBE_TASK_ID

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 96
TRANSCRIPT_TOKENS_PER_S = 8.0
"""No transcript is longer than this many tokens per second of audio (plus TRANSCRIPT_TOKEN_SLACK):
of the 7,415 spoken texts of `train data --size full --seed 0`, 99 % hold under 5.5 SmolLM2 tokens
per second of their speech, and all 29,660 of seeds 0–3 are within the cap. A longer one is the
LLM looping ("uh uh uh ..."), which cost 3.5 points of `eval asr`'s WER on one filler."""
TRANSCRIPT_TOKEN_SLACK = 8
NO_SPEECH_END_PROBABILITY = 10 ** -4.5
"""The no-speech threshold `train export` records for the models this package trains: `transcribe`
returns no words when the frozen LLM's probability of ending the transcript before its first token
is at least this. Stage 2 never showed it audio without words, so it writes a fluent sentence for
a cough or for silence, yet it is then far readier to end at once: for the kept model, on the
unheard valid split, every one of 335 spoken utterances stayed below 10^-4.8, while 20 of 28
coughs, bursts, knocks, breaths, silences and hisses reached 10^-4.5 (training/README.md). Another
model (the released one) has its own scale, so a model directory without it gets no threshold."""
NO_SPEECH_KEY = "no_speech_end_probability"
"""Its key in the model directory's `TRAINING.json`."""
CTC_WEIGHT_KEY = "ctc_weight"
"""Key in `TRAINING.json` of the weight of the model directory's CTC head (`ctc_head.pt`)."""
DEFAULT_CTC_WEIGHT = 0.2
"""Weight of the CTC scores, chosen on the unheard valid split (120 utterances) of the kept model
with its head of 3 convolutions that look 480 ms ahead: WER 15.9 % at 0.2, 16.5 % at 0.3, 16.3 %
at 0.5 (with `DEFAULT_CTC_NBEST` and the `spelled_out` fallback). The LLM alone: 30.7 %. The
earlier causal heads did best at 0.1-0.15: heavier weights made the beam spell what the head hears
through single letters. The ensemble of four such heads: 12.0 % at 0.2, 12.3 % at 0.3 on 240
utterances (with `strays_from_head`; training/README.md)."""
DEFAULT_CTC_CANDIDATES = 16
"""LLM tokens per hypothesis the CTC head judges at each step (8: 25.6 % at weight 0.1)."""
DEFAULT_CTC_NBEST = 4
"""The head's likeliest transcripts of words that one LLM token spells (`ctc_prefix.Lexicon`), which
the LLM spells out as more candidates beside the beam's (`ctc_spelling`; 0: none). On the valid
split: 21.6 %. Without the lexicon, 23.1 % spelled greedily, 22.8 % by a beam of 3 per transcript,
the same with 8 transcripts; those 4 beside the lexicon's 4 gave 21.6 % too, only slower."""
SPELLED_OUT_LETTERS = 2
"""One-letter words (other than "a" and "I") that mark a joint transcript as spelled out. On the
unheard valid split (120 utterances) with the kept head at weight 0.3, replacing such transcripts
by the LLM's spelling of the head's own took the WER from 18.3 to 16.5 %; at weight 0.2 the head's
own text as it stands gave 16.0 % (training/README.md)."""
REPEATED_WORD_RUN = 3
"""The same word this many times in a row marks a joint transcript as looping ("The rai a a a a a a
a a", "ai i i i i i"); "a" and "I" do not count as spelled out. Seen first on the test split, where
such loops held 136 of 830 word errors; on the unheard valid split (240 utterances) the rule took
the WER from 15.4 to 14.5 %."""
DISAGREEMENT_SHARE = 0.5
"""A joint transcript that differs from the head's greedy one in more than this share of its
characters (edit distance) gives way to it: the LLM wrote a sentence of its own ("Dad, I saw a lion."
for "does anyone smoke"). On the unheard valid split (240 utterances, the kept head at weight 0.2):
WER 15.4 % with the spelled-out rule alone, 14.5 % with loops too, then by share 16.1 % at 0.3,
14.6 % at 0.4, 14.0 % at 0.5 and 0.6, 14.3 % at 0.8 (training/README.md)."""
CTC_NBEST_WIDTH = 8
"""Prefix beam width of the head's n-best search (`ctc_prefix.ctc_nbest`)."""
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


BatchFeed = Callable[[list[int], list[int], Any], tuple[torch.Tensor, Any]]
"""`feed(tokens, parents, state) -> (logits [N, V], state)`: row i of the new state is row
`parents[i]` of the given one continued by `tokens[i]`, and row i of the logits predicts its next
token. The given state is not used again, so `feed` may change it in place."""


class JointScore(Protocol):
    """A second score added to the LLM's log-probability in the beam (e.g. `CtcJointScore`)."""

    candidates: int
    """LLM tokens per hypothesis that the joint score judges (at least the beam width is used)."""

    def initial(self) -> Any:
        """The state of the empty transcript."""

    def extend(self, states: list[Any], tokens: list[int], end_id: int) -> tuple[list[Any], list[float]]:
        """(new states, weighted scores) of `states[i]` continued by `tokens[i]`; `end_id` finishes
        the transcript. A score may only fall as a transcript grows, and finishing may not raise it."""


def beam_search(*args: Any, **kwargs: Any) -> list[int]:
    """The token ids of `scored_beam_search` (same arguments), without its score."""
    return scored_beam_search(*args, **kwargs)[1]


def scored_beam_search(
    first_logits: torch.Tensor,
    state: Any,
    feed: BatchFeed,
    end_id: int,
    max_tokens: int,
    width: int,
    joint: JointScore | None = None,
) -> tuple[float, list[int]]:
    """(score, token ids without the end token) of the likeliest hypothesis a beam of `width` finds.

    `state` holds one row, the context before the first token; every step then feeds all live
    hypotheses' next tokens in one batched call (`BatchFeed`). A hypothesis finishes on `end_id` or
    at `max_tokens` tokens. Finished hypotheses are ranked by their log-probability alone
    (normalising it by the length was worse on the valid split), plus `joint`'s score when given
    (a hypothesis cut at `max_tokens` takes the score of a finished one). Neither can rise as a
    hypothesis grows, so the search stops once no live one is likelier than the best finished one.
    Width 1 is greedy decoding.
    """
    if width < 1:
        raise ValueError(f"beam width must be at least 1, not {width}")
    per_row = width if joint is None else max(width, joint.candidates)
    # (LLM log-probability, ids, joint state, joint score) per state row
    alive: list[tuple[float, tuple[int, ...], Any, float]] = [(0.0, (), joint and joint.initial(), 0.0)]
    logits = first_logits.reshape(1, -1)
    best: tuple[float, tuple[int, ...]] = (-math.inf, ())
    while alive:
        top = torch.topk(torch.log_softmax(logits.float(), -1), per_row)
        candidates = [
            (log_prob + value, row, token)
            for row, (log_prob, *_) in enumerate(alive)
            for value, token in zip(top.values[row].tolist(), top.indices[row].tolist())
        ]
        if joint is None:
            judged = [(llm, row, token, None, 0.0) for llm, row, token in candidates]
        else:
            # A joint score is never above 0 (it starts at 0 and only falls), so a candidate the
            # LLM alone ranks at or below the best finished one cannot win: it is not scored.
            candidates = [c for c in candidates if c[0] > best[0]]
            states, scores = joint.extend([alive[row][2] for _, row, _ in candidates],
                                          [token for *_, token in candidates], end_id)
            scores = _finish_cut(joint, candidates, alive, states, list(scores), end_id, max_tokens)
            judged = [(llm, row, token, s, score)
                      for (llm, row, token), s, score in zip(candidates, states, scores)]
        judged.sort(key=lambda c: -(c[0] + c[4]))
        continued: list[tuple[float, int, int, Any, float]] = []
        for llm, row, token, joint_state, joint_score in judged:
            total = llm + joint_score
            if len(continued) == width or total <= best[0]:
                break
            ids = alive[row][1] if token == end_id else alive[row][1] + (token,)
            if token == end_id or len(ids) >= max_tokens:
                best = (total, ids)  # candidates come likeliest first, so it beats the old best
            else:
                continued.append((llm, row, token, joint_state, joint_score))
        if not continued:
            break
        tokens, parents = [c[2] for c in continued], [c[1] for c in continued]
        logits, state = feed(tokens, parents, state)
        alive = [(llm, alive[row][1] + (token,), s, score) for llm, row, token, s, score in continued]
    return best[0], list(best[1])


def _finish_cut(joint: JointScore, candidates: list[tuple[float, int, int]], alive: list, states: list,
                scores: list[float], end_id: int, max_tokens: int) -> list[float]:
    """`scores` with the candidates that reach `max_tokens` without `end_id` scored as finished
    transcripts. With their prefix scores, a beam could pad a transcript with separators up to
    the cap ("Is it going to rain??||:||:…" at CTC weight 0.6) and leave the rest of the audio
    unexplained at no cost."""
    cut = [i for i, (_, row, token) in enumerate(candidates)
           if token != end_id and len(alive[row][1]) + 1 >= max_tokens]
    if cut:
        _, finished = joint.extend([states[i] for i in cut], [end_id] * len(cut), end_id)
        for i, score in zip(cut, finished):
            scores[i] = score
    return scores


def spelled_out(words: list[str], letters: int = SPELLED_OUT_LETTERS) -> bool:
    """Whether `words` (normalised) hold at least `letters` words of one letter other than "a" and
    "i": the joint beam's sign that the LLM found no word for what the head hears ("the r l o d e
    r t"), so it followed the head's characters one letter at a time."""
    return sum(len(w) == 1 and w.isalpha() and w not in ("a", "i") for w in words) >= letters


def repeats_a_word(words: list[str], run: int = REPEATED_WORD_RUN) -> bool:
    """Whether one word comes `run` times in a row in `words`."""
    return any(len(set(words[i:i + run])) == 1 for i in range(len(words) - run + 1))


def strays_from_head(text: str, heard: str, share: float = DISAGREEMENT_SHARE) -> bool:
    """Whether the joint transcript `text` should give way to `heard`, the head's greedy transcript
    (lower case, words as `eval asr` counts them): it is spelled out (`spelled_out`), it loops
    (`repeats_a_word`), or more than `share` of `heard`'s characters would have to change to make it."""
    from training.eval import normalise_words
    from training.stage1_encoder import _edit_distance

    words = normalise_words(text)
    return (spelled_out(words) or repeats_a_word(words)
            or _edit_distance(" ".join(words), heard) > share * max(1, len(heard)))


def batched_feed(llm: Any) -> BatchFeed:
    """`BatchFeed` over a `FrozenLlm`'s transformers KV cache: its rows are first reordered to the
    parents (`reorder_cache`), then every row takes its token in one batched call. On one CPU core
    a step of 4 rows took 106 ms against 57 ms for one row, where 4 calls of one row would take
    4 times as long: `eval asr` on 120 utterances ran in 182 s instead of 306 s (training/README.md)."""
    head = llm.causal_lm.get_output_embeddings()
    like = llm.heads.prompt_embeddings.weight  # device and dtype of the token embeddings
    rows = 1  # the cache's batch size: the context before the first token is one row

    def feed(tokens: list[int], parents: list[int], past: Any) -> tuple[torch.Tensor, Any]:
        nonlocal rows
        if parents != list(range(rows)):  # greedy decoding never reorders
            past.reorder_cache(torch.tensor(parents, device=like.device))
        hidden, past = run_trunk(llm.causal_lm.model, llm.embed_tokens(tokens, like).unsqueeze(1), past)
        rows = len(tokens)
        return head(hidden[:, -1]), past

    return feed


@dataclass
class CtcDecoding:
    """Decode jointly with a CTC head on the encoder (`training.ctc_head`): each hypothesis's
    score is the LLM's log-probability plus `weight` × the head's CTC prefix score."""

    head: Any
    """A `training.ctc_head.CtcHead` or `CtcHeadEnsemble`."""
    weight: float = DEFAULT_CTC_WEIGHT
    candidates: int = DEFAULT_CTC_CANDIDATES
    nbest: int = DEFAULT_CTC_NBEST
    pieces: dict[int, str] = field(default_factory=dict, repr=False)
    """Cache: token id -> its text."""
    spellings: Any = field(default=None, repr=False)
    """Cache: the tokenizer's `ctc_spelling.TokenSpellings`."""
    lexicon: Any = field(default=None, repr=False)
    """Cache: the `ctc_prefix.Lexicon` of the words one token of the tokenizer spells."""

    def search(self, models: FreezeOmniModels, samples: np.ndarray, first_logits: torch.Tensor,
               past: Any, max_tokens: int, width: int) -> list[int]:
        """Token ids of the best joint score among the joint beam's transcript and the LLM's
        spellings of the head's `nbest` likeliest transcripts of the lexicon's words; where that
        strays from the head's own greedy transcript (`strays_from_head`), the head's. `past`
        (the LLM's cache after the context, one row) is used up."""
        from training.ctc_head import ctc_log_probs
        from training.ctc_prefix import CtcJointScore, CtcPrefixScorer, ctc_nbest
        from training.ctc_spelling import spell_with_llm
        from training.features import utterance_chunks

        scorer = CtcPrefixScorer(ctc_log_probs(models.encoder, self.head,
                                               utterance_chunks(samples, models.n_mels)))
        end_id, piece = models.llm.layout.end_of_turn_id, self._piece(models.tokenizer)
        spare = copy.deepcopy(past) if self.nbest else None  # the beam changes `past` in place
        joint = CtcJointScore(scorer, piece, self.weight, self.candidates)
        best = scored_beam_search(first_logits, past, batched_feed(models.llm), end_id, max_tokens, width,
                                  joint)
        if self.nbest:
            likeliest = ctc_nbest(scorer, self.nbest, CTC_NBEST_WIDTH, scorer.log_probs.shape[0],
                                  self._lexicon(models.tokenizer))
            # A spelling whose LLM log-probability falls to its bar can no longer beat the beam's.
            bars = [best[0] - self.weight * ctc_score for ctc_score, _ in likeliest]
            spelled = spell_with_llm(first_logits, spare, batched_feed(models.llm),
                                     end_id, [t for _, t in likeliest], self._spellings(models.tokenizer),
                                     max_tokens, bars)
            for (ctc_score, _), (llm_score, ids) in zip(likeliest, spelled):
                if llm_score + self.weight * ctc_score > best[0]:
                    best = (llm_score + self.weight * ctc_score, ids)
        text, heard = "".join(piece(token) for token in best[1]), self._heard(scorer)
        if strays_from_head(text, heard):
            logger.debug("joint transcript %r replaced by the head's own: %r", text, heard)
            return self._own_transcript(models, heard)
        return best[1]

    @staticmethod
    def _heard(scorer: Any) -> str:
        """The head's greedy transcript (lower case, single spaces)."""
        from training.features import CharVocab

        return " ".join(CharVocab().greedy(scorer.log_probs.argmax(-1).tolist()).split())

    @staticmethod
    def _own_transcript(models: FreezeOmniModels, heard: str) -> list[int]:
        """The tokens of the head's greedy transcript as it stands (its first letter capitalised).
        The LLM's spelling of it kept the letters but cased them oddly ("How many carS, RU, pOcKtAR")."""
        return models.tokenizer.encode(heard[:1].upper() + heard[1:], add_special_tokens=False)

    def _lexicon(self, tokenizer: Any) -> Any:
        from training.ctc_prefix import Lexicon

        if self.lexicon is None:
            self.lexicon = Lexicon(self._spellings(tokenizer).whole_words())
        return self.lexicon

    def _spellings(self, tokenizer: Any) -> Any:
        from training.ctc_spelling import TokenSpellings, vocabulary_pieces

        if self.spellings is None:
            self.spellings = TokenSpellings(vocabulary_pieces(tokenizer, self._piece(tokenizer)))
        return self.spellings

    def _piece(self, tokenizer: Any) -> Callable[[int], str]:
        def piece(token: int) -> str:
            if token not in self.pieces:
                self.pieces[token] = tokenizer.decode([token])
            return self.pieces[token]
        return piece


@torch.inference_mode()
def transcribe(
    models: FreezeOmniModels,
    samples: np.ndarray,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    beam_width: int = DEFAULT_BEAM_WIDTH,
    no_speech_end_probability: float | None = None,
    ctc: CtcDecoding | None = None,
) -> str:
    """Transcript of `samples` ([S] float in ±1 at 16 kHz) by a beam search of `beam_width`
    (1: greedy), at most `transcript_token_cap(S, max_tokens)` tokens; "" when the LLM would end
    the transcript at once with at least `no_speech_end_probability` (None: never). With `ctc`
    (weight > 0) the beam adds its head's CTC prefix scores."""
    llm, tokenizer = models.llm, models.tokenizer
    cache = LlmKvCache()
    llm.prefill_system(None, tokenizer, cache)
    opening_ids = [llm.layout.end_of_turn_id, *llm.layout.user_prefix_ids]
    cap = transcript_token_cap(samples.shape[0], max_tokens)
    _check_fits_context(llm, samples.shape[0], cache.seq_length + len(opening_ids) + 1 + cap)
    vectors = stream_vectors(models, samples)
    task = llm.heads.task_embeddings.weight[TRANSCRIBE_TASK_ID:TRANSCRIBE_TASK_ID + 1].to(vectors.dtype)
    embeds = torch.cat([llm.embed_tokens(opening_ids, vectors), task, vectors])
    llm.run(embeds, cache, [*opening_ids] + [None] * (embeds.shape[0] - len(opening_ids)))
    logits, _ = llm.start_answer(cache)
    if no_speech_end_probability is not None:
        end_probability = float(torch.softmax(logits.float(), -1)[llm.layout.end_of_turn_id])
        if end_probability >= no_speech_end_probability:
            logger.info("no speech: the LLM would end the transcript at once with probability %.2g",
                        end_probability)
            return ""
    if ctc is not None and ctc.weight > 0:
        ids = ctc.search(models, samples, logits, cache.past, cap, beam_width)
    else:
        ids = beam_search(logits, cache.past, batched_feed(llm), llm.layout.end_of_turn_id, cap, beam_width)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _check_fits_context(llm: Any, num_samples: int, other_positions: int) -> None:
    """Refuse, before encoding anything, audio whose vectors would overflow the LLM's context."""
    chunks = max(1, -(-num_samples // CHUNK_SAMPLES))
    room = llm.max_context_tokens - other_positions - len(llm.layout.assistant_suffix_ids)  # for vectors
    if VECTORS_PER_CHUNK * chunks > room:
        longest_s = room // VECTORS_PER_CHUNK * CHUNK_SAMPLES / SAMPLE_RATE_HZ
        raise ValueError(
            f"{num_samples / SAMPLE_RATE_HZ:.0f} s of audio do not fit the LLM's context of "
            f"{llm.max_context_tokens} positions; split it into parts of at most {int(longest_s)} s"
        )


def _training_info(model_dir: Path) -> dict:
    """The model directory's `TRAINING.json` (INFO_NAME), {} when there is none."""
    info_file = Path(model_dir) / INFO_NAME
    if not info_file.is_file():
        return {}
    try:
        info = json.loads(info_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{info_file} is not JSON ({err}); export the model again") from err
    if not isinstance(info, dict):
        raise ValueError(f"{info_file} is not a JSON object; export the model again")
    return info


def model_ctc_decoding(model_dir: Path, weight: float | None = None,
                       nbest: int = DEFAULT_CTC_NBEST) -> CtcDecoding | None:
    """The model directory's CTC head (`ctc_head.pt`) with `weight`, by default the one its
    `TRAINING.json` records (else DEFAULT_CTC_WEIGHT), and its `nbest` transcripts spelled by the
    LLM as candidates; None without a head or at weight 0."""
    from training.ctc_head import CTC_HEAD_NAME, load_ctc_head

    if weight is not None and weight < 0:
        raise ValueError(f"the CTC weight must be 0 (off) or positive, not {weight}")
    if nbest < 0:
        raise ValueError(f"the CTC n-best must be 0 (off) or positive, not {nbest}")
    head_file = Path(model_dir) / CTC_HEAD_NAME
    if not head_file.is_file() or weight == 0:
        return None
    if weight is None:
        weight = _training_info(model_dir).get(CTC_WEIGHT_KEY, DEFAULT_CTC_WEIGHT)
        if not (isinstance(weight, (int, float)) and weight >= 0):
            raise ValueError(f"{Path(model_dir) / INFO_NAME}: {CTC_WEIGHT_KEY} must be a number >= 0, "
                             f"not {weight!r}")
    if weight == 0:
        return None
    logger.info("transcripts decoded with the CTC head %s at weight %g, its %d best spelled out",
                head_file, weight, nbest)
    return CtcDecoding(load_ctc_head(head_file), float(weight), nbest=nbest)


def model_no_speech_probability(model_dir: Path) -> float | None:
    """The no-speech threshold a model directory's `TRAINING.json` (INFO_NAME) records, or None (none there)."""
    info_file = Path(model_dir) / INFO_NAME
    value = _training_info(model_dir).get(NO_SPEECH_KEY)
    if value is not None and not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"{info_file}: {NO_SPEECH_KEY} must be a probability in (0, 1], not {value!r}")
    return None if value is None else float(value)
