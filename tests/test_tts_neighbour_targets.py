"""`train tts-decoder --neighbour-smoothing`: targets that spread probability over acoustically
close codec ids (by codebook distance), so a near miss costs less than a distant one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.tts.decoder_forward import DecoderTargets, neighbour_targets, token_loss
from training.tts.stage_decoder import TtsDecoderConfig, codebook_targets

# Four codes on a line: 0 and 1 are close, 2 is further, 3 far away; vocab adds 4 specials.
LINE_BOOK = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
VOCAB = 8


def test_rows_keep_one_minus_smoothing_on_the_target_and_spread_the_rest_by_distance() -> None:
    rows = neighbour_targets(LINE_BOOK, VOCAB, smoothing=0.2, temperature_nn=4.0)
    assert rows.shape == (VOCAB, VOCAB)
    assert torch.allclose(rows.sum(1), torch.ones(VOCAB))
    assert torch.allclose(rows.diagonal()[:4], torch.full((4,), 0.8))
    assert torch.equal(rows[4:], torch.eye(VOCAB)[4:])  # BOS, SOS, EOS, PAD stay one-hot
    assert torch.all(rows[:4, 4:] == 0)  # no codec id's mass goes to a special id
    assert rows[0, 1] > rows[0, 2] > rows[0, 3] > 0
    assert rows[2, 1] > rows[2, 0] > rows[2, 3]


def test_without_smoothing_the_loss_is_plain_cross_entropy() -> None:
    torch.manual_seed(0)
    out = DecoderTargets(torch.randn(5, VOCAB), torch.tensor([0, 1, 2, 3, 6]))
    plain, _ = token_loss(out)
    same, _ = token_loss(out, neighbour_targets(LINE_BOOK, VOCAB, smoothing=0.0, temperature_nn=1.0))
    assert torch.allclose(plain, F.cross_entropy(out.logits, out.targets))
    assert torch.allclose(same, plain)


def test_a_near_miss_costs_less_than_a_distant_one_only_with_smoothing() -> None:
    target = torch.tensor([0])
    near = torch.full((1, VOCAB), -5.0)
    near[0, 0], near[0, 1] = 1.0, 3.0  # most mass on code 1, next to the target
    far = near.clone()
    far[0, 1], far[0, 3] = -5.0, 3.0  # the same mass on code 3, far from it
    plain_near, _ = token_loss(DecoderTargets(near, target))
    plain_far, _ = token_loss(DecoderTargets(far, target))
    assert torch.allclose(plain_near, plain_far)
    rows = neighbour_targets(LINE_BOOK, VOCAB, smoothing=0.3, temperature_nn=4.0)
    soft_near, _ = token_loss(DecoderTargets(near, target), rows)
    soft_far, _ = token_loss(DecoderTargets(far, target), rows)
    assert soft_near < soft_far - 0.5


class _BookCodec:
    codebook = LINE_BOOK.numpy().astype(np.float64)


def test_codebook_targets_come_from_the_codec_only_when_asked() -> None:
    assert codebook_targets(_BookCodec(), TtsDecoderConfig(), VOCAB) is None
    rows = codebook_targets(_BookCodec(), TtsDecoderConfig(neighbour_smoothing=0.1), VOCAB)
    assert rows is not None and torch.allclose(rows.diagonal()[:4], torch.full((4,), 0.9))
    with pytest.raises(ValueError, match="codebook"):
        codebook_targets(object(), TtsDecoderConfig(neighbour_smoothing=0.1), VOCAB)
    with pytest.raises(ValueError, match="only 2 ids"):
        neighbour_targets(LINE_BOOK, 2, 0.1, 1.0)


@pytest.mark.parametrize("smoothing, temperature", [(1.0, 1.0), (-0.1, 1.0), (0.1, 0.0)])
def test_bad_settings_are_refused(smoothing: float, temperature: float) -> None:
    with pytest.raises(ValueError, match="neighbour"):
        TtsDecoderConfig(neighbour_smoothing=smoothing, neighbour_temperature_nn=temperature)
    with pytest.raises(ValueError, match="neighbour"):
        neighbour_targets(LINE_BOOK, VOCAB, smoothing, temperature)


def test_tts_decoder_cli_passes_the_smoothing(monkeypatch, tmp_path: Path) -> None:
    import training.tts.cli as cli
    import training.tts.stage_decoder as stage
    from assistant.cli import main

    seen = []
    monkeypatch.setattr(cli, "_setup", lambda args: (object(), tmp_path))
    monkeypatch.setattr(stage, "train_tts_decoder",
                        lambda data, codec, llm, out, config: seen.append(config) or {})
    base = ["train", "tts-decoder", "--data", str(tmp_path), "--codec-dir", str(tmp_path),
            "--out", str(tmp_path)]
    assert main(base) == 0
    assert main([*base, "--neighbour-smoothing", "0.2", "--neighbour-temperature", "2"]) == 0
    assert (seen[0].neighbour_smoothing, seen[0].neighbour_temperature_nn) == (0.0, 1.0)
    assert (seen[1].neighbour_smoothing, seen[1].neighbour_temperature_nn) == (0.2, 2.0)
