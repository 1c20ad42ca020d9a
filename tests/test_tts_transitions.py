"""`train tts-decoder --transition-weight W --input-noise-rate P`: aids for unit codecs whose ids
repeat while a sound holds (training.tts.transitions)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quantized_models.speech_decoder import SpeechDecoder
from training.tts import stage_decoder
from training.tts.decoder_forward import DecoderTargets, teacher_forced_logits, token_loss
from training.tts.decoder_model import DecoderExample, make_batch
from training.tts.stage_decoder import TtsDecoderConfig, sampled_batch_step
from training.tts.transitions import noisy_inputs, transition_weights

from tests.tiny_decoder import tiny_decoder, train_tiny

PAD = 99


def _tokens(rows: list[list[int]]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], batch_first=True,
                                           padding_value=PAD)


def test_changing_targets_and_eos_get_the_weight_in_target_order() -> None:
    weights = transition_weights(_tokens([[5, 5, 7, 7, 7], [3, 3]]), [5, 2], weight=3.0)
    # targets [5 5 7 7 7 EOS] [3 3 EOS]: the first id (after SOS), each change and EOS weigh 3
    assert weights.tolist() == [3, 1, 3, 1, 1, 3, 3, 1, 3]


def test_the_weights_line_up_with_the_decoders_targets() -> None:
    torch.manual_seed(0)
    decoder = tiny_decoder(0).eval()
    rows = [[4, 4, 4, 9, 9, 1], [2, 2, 6, 6, 6, 6, 6, 0]]
    tokens = _tokens(rows)
    examples = [DecoderExample([1, 2, 3], r) for r in rows]
    batch = make_batch(examples, torch.nn.Embedding(8, 64), decoder.dims.idim, decoder.dims.pad_id)
    with torch.no_grad():
        targets = teacher_forced_logits(decoder, batch).targets
    weights = transition_weights(tokens, [6, 8], weight=2.0)
    assert weights.shape == targets.shape
    starts = {0, 7}  # each sequence's first target follows SOS
    expected = [2.0 if i in starts or targets[i] != targets[i - 1] else 1.0 for i in range(len(targets))]
    assert weights.tolist() == expected


def test_weighted_loss_is_the_weighted_mean_and_ones_give_the_plain_mean() -> None:
    torch.manual_seed(0)
    out = DecoderTargets(torch.randn(6, 10), torch.tensor([0, 0, 3, 3, 3, 9]))
    per_target = F.cross_entropy(out.logits, out.targets, reduction="none")
    weights = torch.tensor([3.0, 1, 3, 1, 1, 3])
    loss, _ = token_loss(out, weights=weights)
    torch.testing.assert_close(loss, (weights * per_target).sum() / weights.sum())
    torch.testing.assert_close(token_loss(out, weights=torch.ones(6))[0], token_loss(out)[0])


def test_noisy_inputs_replace_about_the_share_asked_and_leave_padding_alone() -> None:
    inputs = _tokens([[7] * 2000, [7] * 500])
    noisy = noisy_inputs(inputs, [2000, 500], rate=0.3, n_codes=64, rng=np.random.default_rng(0))
    assert torch.equal(inputs, _tokens([[7] * 2000, [7] * 500]))  # the input is not changed in place
    changed = (noisy[0] != 7).float().mean().item()
    assert 0.25 < changed < 0.32  # 0.3 of the ids drawn, 1 in 64 of those draws 7 again
    assert int(noisy[0].max()) < 64 and int(noisy[1, :500].max()) < 64 and int(noisy.min()) >= 0
    assert torch.equal(noisy[1, 500:], torch.full((1500,), PAD))
    assert torch.equal(noisy_inputs(inputs, [2000, 500], 0.0, 64, np.random.default_rng(0)), inputs)


def test_the_training_step_feeds_noisy_inputs_and_keeps_the_targets(monkeypatch) -> None:
    seen = []
    real = stage_decoder.teacher_forced_logits

    def spy(decoder, batch, *args, **kwargs):
        seen.append(batch)
        return real(decoder, batch, *args, **kwargs)

    monkeypatch.setattr(stage_decoder, "teacher_forced_logits", spy)
    examples = [DecoderExample([1, 2, 3], [5] * 200)]
    step_fn = sampled_batch_step(tiny_decoder(0), examples, torch.nn.Embedding(8, 64), seed=0,
                                 batch_pairs=1, dropout=0.0, input_noise_rate=0.5)
    step_fn(0)
    (batch,) = seen
    assert torch.equal(batch.tokens[0], torch.full((200,), 5))
    assert batch.input_tokens is not None and 0.3 < (batch.input_tokens[0] != 5).float().mean() < 0.6


def _change_accuracy(decoder: SpeechDecoder, examples: list[DecoderExample], embed) -> float:
    """Teacher-forced accuracy at the targets that change the id (EOS included)."""
    batch = make_batch(examples, embed, decoder.dims.idim, decoder.dims.pad_id)
    with torch.no_grad():
        out = teacher_forced_logits(decoder.eval(), batch)
    changes = transition_weights(batch.tokens, batch.token_lengths, 2.0) == 2.0
    return (out.logits.argmax(-1) == out.targets)[changes].float().mean().item()


def test_weighting_the_changes_teaches_them_sooner() -> None:
    torch.manual_seed(0)
    embed = torch.nn.Embedding(50, 64)
    # each text names its own ids, each held for 5 positions: 80 % of the targets copy the one before
    examples = [DecoderExample([i, i + 1, i + 2], [(7 * i + 3 * k) % 32 for k in range(6) for _ in range(5)])
                for i in range(8)]
    accuracy = {}
    for weight in (1.0, 4.0):
        decoder = tiny_decoder(1).train()
        step_fn = sampled_batch_step(decoder, examples, embed, seed=0, batch_pairs=8, dropout=0.0,
                                     transition_weight=weight)
        train_tiny(decoder, step_fn, steps=20)
        accuracy[weight] = _change_accuracy(decoder, examples, embed)
    assert accuracy[4.0] > accuracy[1.0] + 0.3  # measured 0.89 against 0.23


def test_transition_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="transition weight"):
        TtsDecoderConfig(transition_weight=0.5)
    with pytest.raises(ValueError, match="input noise rate"):
        TtsDecoderConfig(input_noise_rate=1.0)
