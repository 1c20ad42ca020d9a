"""Guided attention for the speech decoder: the diagonal penalty, the per-head alignment cost
and the training option (`train tts-decoder --guided-heads N`)."""
from __future__ import annotations

import pytest
import torch

from quantized_models.speech_decoder import SpeechDecoder
from training.tts.decoder_forward import (
    DecoderBatch,
    alignment_cost,
    diagonal_penalty,
    teacher_forced_logits,
)
from training.tts.decoder_model import DecoderExample, make_batch
from training.tts.stage_decoder import GuidedAttention, TtsDecoderConfig, sampled_batch_step

from tests.tiny_decoder import tiny_decoder, train_tiny


def test_the_penalty_is_zero_on_the_diagonal_and_only_on_token_queries_over_text_keys() -> None:
    cond, tokens, total = 10, 19, 32  # 20 token queries (SOS + 19 ids), 2 padding rows
    weight = diagonal_penalty(cond, tokens, total, width=0.2)
    assert weight.shape == (total, total)
    assert weight[:cond].abs().sum() == 0  # conditioning queries are not guided
    assert weight[cond + tokens + 1:].abs().sum() == 0  # padding queries neither
    assert weight[:, cond:].abs().sum() == 0  # only keys of the text part carry a cost
    first_query, last_query = cond, cond + tokens
    assert weight[first_query, 0] < 0.01 and weight[last_query, cond - 1] < 0.01  # both ends aligned
    assert weight[first_query, cond - 1] > 0.99 and weight[last_query, 0] > 0.99  # opposite corners
    middle = cond + (tokens + 1) // 2
    assert weight[middle, cond // 2] < weight[middle, cond // 2 + 2] < weight[middle, cond - 1]


def _keys_and_queries(cond: int, tokens: int, target_of_query) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 1, T, cond] one-hot keys for the text rows and queries pointing at `target_of_query(t)`."""
    total = cond + tokens + 1
    k = torch.zeros(1, 1, total, cond)
    k[0, 0, :cond] = 30.0 * torch.eye(cond)
    q = torch.zeros(1, 1, total, cond)
    for t in range(tokens + 1):
        q[0, 0, cond + t, target_of_query(t)] = 30.0
    return q, k


def test_a_head_reading_the_text_in_order_costs_little_and_a_backward_one_much() -> None:
    cond, tokens = 12, 35
    forward = _keys_and_queries(cond, tokens, lambda t: min(cond - 1, t * cond // (tokens + 1)))
    backward = _keys_and_queries(cond, tokens, lambda t: cond - 1 - min(cond - 1, t * cond // (tokens + 1)))
    spread = (torch.zeros(1, 1, cond + tokens + 1, cond), forward[1])  # uniform over the text
    costs = [alignment_cost(q, k, [cond], [tokens], width=0.2).item() for q, k in (forward, backward, spread)]
    assert costs[0] < 0.05
    assert costs[1] > 0.7
    assert 0.5 < costs[2] < 0.65  # about 1 - (0.2 sqrt(2 pi) - 0.08) for an even spread


def test_costs_come_per_layer_and_head_without_changing_the_logits() -> None:
    decoder = tiny_decoder(0).eval()
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
    batch = DecoderBatch(pad([torch.randn(8, 16), torch.randn(12, 16)]), [8, 12],
                         pad([torch.randint(0, 32, (5,)), torch.randint(0, 32, (9,))]), [5, 9])
    with torch.no_grad():
        plain = teacher_forced_logits(decoder, batch)
        guided = teacher_forced_logits(decoder, batch, guide_width=0.2)
    assert plain.alignment_costs is None
    assert guided.alignment_costs is not None and len(guided.alignment_costs) == 2
    assert all(c.shape == (2,) and bool(((c > 0) & (c < 1)).all()) for c in guided.alignment_costs)
    torch.testing.assert_close(guided.logits, plain.logits)


def _mean_alignment(decoder: SpeechDecoder, examples: list[DecoderExample], embed) -> float:
    batch = make_batch(examples, embed, decoder.dims.idim, decoder.dims.pad_id)
    with torch.no_grad():
        out = teacher_forced_logits(decoder.eval(), batch, guide_width=0.2)
    assert out.alignment_costs is not None
    return float(out.alignment_costs[1][0])  # the guided head: head 0 of the second layer


def test_training_with_guided_heads_lowers_their_alignment_cost() -> None:
    torch.manual_seed(0)
    embed = torch.nn.Embedding(50, 64)
    examples = [DecoderExample(list(range(i, i + 6)), [(5 * i + k) % 32 for k in range(30)]) for i in range(6)]
    after = {}
    for name, guided in (("plain", None), ("guided", GuidedAttention(heads=1, width=0.2, weight=1.0))):
        decoder = tiny_decoder(1).train()
        step_fn = sampled_batch_step(decoder, examples, embed, seed=0, batch_pairs=6, dropout=0.0,
                                     guided=guided)
        metrics = train_tiny(decoder, step_fn, steps=60)
        assert ("alignment" in metrics) == (guided is not None)
        after[name] = _mean_alignment(decoder, examples, embed)
    assert after["guided"] < 0.3 < after["plain"]


def test_guided_attention_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="guided attention"):
        TtsDecoderConfig(guided_heads=-1)
    with pytest.raises(ValueError, match="positive width"):
        TtsDecoderConfig(guided_heads=2, guided_width=0.0)
    with pytest.raises(ValueError, match="exceeds the decoder's 2 attention heads"):
        sampled_batch_step(tiny_decoder(0), [DecoderExample([1, 2], [3, 4])], torch.nn.Embedding(8, 64),
                           seed=0, batch_pairs=1, dropout=0.0, guided=GuidedAttention(heads=3))
