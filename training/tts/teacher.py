"""The LLM's hidden states of a known answer, cut into speech segments as the engine cuts them.

The frozen LLM is teacher-forced on: system header + role, `<|im_end|>` + user prefix + the
question's tokens (or nothing), the assistant suffix, then the answer's tokens. The hidden
state paired with answer token j is the one that produced it (the suffix's last position for
the first token, token j-1's position after that), exactly what `Engine._accept_token` hands
the segmenter; the tokens then go through the engine's detokenizer and `Segmenter`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from assistant.detokenizer import IncrementalDetokenizer
from assistant.segmentation import Segment, SegmentationRule, Segmenter
from quantized_models.llm import ChatLayout


def context_ids(tokenizer: Any, layout: ChatLayout, question: str | None,
                role: str | None = None) -> list[int]:
    """Token ids before the first answer token (system, user turn, assistant suffix)."""
    text_role = layout.default_role if role is None else role
    ids = tokenizer.encode(layout.system_header + text_role, add_special_tokens=False)
    ids += [layout.end_of_turn_id, *layout.user_prefix_ids]
    if question:
        ids += tokenizer.encode(question, add_special_tokens=False)
    return ids + list(layout.assistant_suffix_ids)


@torch.no_grad()
def answer_hidden_states(causal_lm: nn.Module, context: list[int], answer: list[int]) -> torch.Tensor:
    """[len(answer), H] final-norm hidden states that produce each answer token."""
    if not answer:
        raise ValueError("the answer has no tokens")
    device = causal_lm.get_input_embeddings().weight.device
    ids = torch.tensor([context + answer[:-1]], dtype=torch.long, device=device)
    hidden = causal_lm.model(input_ids=ids).last_hidden_state[0]  # [T, H]
    return hidden[len(context) - 1:]


def segments_of(tokenizer: Any, answer: list[int], hidden: torch.Tensor,
                rule: SegmentationRule = SegmentationRule.SENTENCE) -> list[Segment]:
    """The engine's segments of an answer given token by token with its hidden states."""
    detokenizer, segmenter = IncrementalDetokenizer(tokenizer), Segmenter(rule)
    segments = []
    for token, h in zip(answer, hidden):
        segment = segmenter.push(detokenizer.push(token), h)
        if segment is not None:
            segments.append(segment)
    leftover = segmenter.finish()
    if leftover is not None and leftover.hidden_states:
        segments.append(leftover)
    return segments


def teacher_forced_segments(causal_lm: nn.Module, tokenizer: Any, layout: ChatLayout, answer_text: str,
                            question: str | None = None, role: str | None = None,
                            rule: SegmentationRule = SegmentationRule.SENTENCE) -> list[Segment]:
    """Segments (text, hidden states) of `answer_text` spoken as the assistant's answer."""
    answer = tokenizer.encode(answer_text, add_special_tokens=False)
    hidden = answer_hidden_states(causal_lm, context_ids(tokenizer, layout, question, role), answer)
    return segments_of(tokenizer, answer, hidden, rule)
