"""`--device` of the training stages: chosen once, checked, and followed by every tensor a step builds.

This machine has no GPU, so the moves are checked on torch's "meta" device (tensors without data):
a tensor built on the CPU by mistake meets a meta tensor and raises, or shows up on the wrong
device. The whole tiny chain also runs through the device path on every device this machine has.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from training.common import LoopConfig, train_loop
from training.device import training_device
from training.features import N_MELS, Utterance
from training.llm_sequence import TurnItem, TurnLayout, load_frozen_llm
from training.model_config import DEFAULT_ROLE, AudioLlmParts, chat_template, encoder_train_yaml, with_llm
from training.stage1_encoder import Stage1Config, train_stage1
from training.stage2_connect import Stage2Config, audio_vectors, train_stage2
from training.stage3_dialogue import Stage3Config, train_stage3
from tests.test_training import TINY_GEOMETRY, _losses, write_tiny_data

META = torch.device("meta")
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def test_training_device_accepts_cpu_and_refuses_what_this_machine_cannot_use() -> None:
    assert training_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a torch device name"):
        training_device("gpu0")
    with pytest.raises(ValueError, match="cpu or cuda devices only"):
        training_device("meta")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            training_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match="use --device cpu"):
            training_device("cuda")
    with pytest.raises(ValueError, match="not a torch device name"):
        LoopConfig(steps=1, device="gpu0").validate()


def test_the_loop_refuses_a_module_left_off_the_run_device(tmp_path: Path) -> None:
    def never(step: int):
        raise AssertionError("no step may run")

    with pytest.raises(RuntimeError, match="weight is on meta"):
        train_loop(tmp_path / "a", {"m": nn.Linear(2, 2, device=META)}, never, LoopConfig(steps=1))
    frozen = nn.Linear(2, 2, device=META).requires_grad_(False)
    with pytest.raises(RuntimeError, match="weight is on meta"):
        train_loop(tmp_path / "b", {"m": nn.Linear(2, 2)}, never, LoopConfig(steps=1), frozen=[frozen])


def test_a_laid_out_batch_lives_on_the_llm_device(tiny_dir: Path) -> None:
    from quantized_models.llm import ChatLayout

    causal_lm, tokenizer = load_frozen_llm(tiny_dir / "llm")
    causal_lm.to(META)
    turns = TurnLayout(causal_lm, tokenizer, ChatLayout.from_template(chat_template(DEFAULT_ROLE), tokenizer))
    width = causal_lm.config.hidden_size
    item = TurnItem(audio=torch.zeros(4, width, device=META), lead=torch.zeros(1, width, device=META),
                    answer_ids=[5, 6], chunk_labels=[0, 1])
    batch = turns.lay_out([item, item])
    for tensor in (batch.embeds, batch.token_rows, batch.token_targets, batch.state_rows, batch.state_targets):
        assert tensor.device == META
    assert tuple(batch.token_targets.shape) == (4,) and tuple(batch.state_rows.shape) == (4, 2)


def test_audio_vectors_move_a_cpu_batch_to_the_modules_device(monkeypatch) -> None:
    parts = AudioLlmParts.build(with_llm(encoder_train_yaml(TINY_GEOMETRY, 30), 64, DEFAULT_ROLE), None)
    parts.to(META)
    assert parts.device == META
    seen = []

    def encoder_on_meta(chunks, positions, visible):  # the real one reads positions.max() as a number
        seen.append({chunks.device, positions.device, visible.device})
        return torch.zeros(chunks.shape[0], 4 * chunks.shape[1], TINY_GEOMETRY.model_dim, device=META)

    monkeypatch.setattr(parts.encoder, "forward_masked", encoder_on_meta)
    chunks = torch.zeros(3, 19, N_MELS)  # what `load_utterances` gives: CPU tensors
    vectors = audio_vectors(parts, [Utterance(entry=None, chunks=chunks)])  # type: ignore[arg-type]
    assert seen == [{META}]
    assert vectors[0].device == META and tuple(vectors[0].shape) == (6, 64)


@pytest.mark.parametrize("device", DEVICES)
def test_the_stages_train_on_the_chosen_device_and_write_cpu_results(device: str, tmp_path: Path,
                                                                      tiny_dir: Path) -> None:
    """Stages 1-3 with `LoopConfig.device`: losses fall, and results and checkpoints hold CPU tensors
    (a result trained on a GPU loads anywhere)."""
    data = write_tiny_data(tmp_path / "data")
    llm_dir = tiny_dir / "llm"
    def loop(steps: int, lr: float = 3e-3) -> LoopConfig:
        return LoopConfig(steps=steps, lr=lr, warmup_steps=1, log_every_steps=1, checkpoint_every_steps=5,
                          device=device)

    train_stage1(data, tmp_path / "run1", Stage1Config(geometry=TINY_GEOMETRY, loop=loop(12), batch_utterances=4))
    train_stage2(tmp_path / "run1", data, llm_dir, tmp_path / "run2", Stage2Config(loop=loop(10)))
    train_stage3(tmp_path / "run2", data, llm_dir, tmp_path / "run3", Stage3Config(loop=loop(10, 1e-2)))
    for run, column in (("run1", "ctc_loss"), ("run2", "text_loss"), ("run3", "loss")):
        losses = _losses(tmp_path / run, column)
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, (run, losses)
        result = torch.load(tmp_path / run / "result.pt", weights_only=False)  # a CUDA tensor would stay one
        assert {t.device.type for t in result["state"].values()} == {"cpu"}, run


@pytest.mark.parametrize("step,module,function", [
    ("stage1", "training.stage1_encoder", "train_stage1"),
    ("stage2", "training.stage2_connect", "train_stage2"),
    ("stage3", "training.stage3_dialogue", "train_stage3"),
    ("state-head", "training.state_head", "fit_state_head"),
])
def test_train_cli_passes_the_device_and_refuses_one_this_machine_lacks(step, module, function, monkeypatch,
                                                                        tmp_path: Path, capsys) -> None:
    import importlib

    from assistant.cli import main

    seen = []
    monkeypatch.setattr(importlib.import_module(module), function, lambda *args: seen.append(args) or {})
    base = ["train", step, "--data", str(tmp_path), "--out", str(tmp_path / "r"),
            *([] if step == "stage1" else ["--init", str(tmp_path), "--llm-dir", str(tmp_path)])]
    assert main(base) == 0 and main([*base, "--device", "cpu:0"]) == 0
    # fit_state_head(init, data, llm, out, HeadFitConfig, extra_data, extra_valid); the others end with a config
    devices = [args[4].device if step == "state-head" else args[-1].loop.device for args in seen]
    assert devices == ["cpu", "cpu:0"]
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda"]) != 0
        assert "use --device cpu" in capsys.readouterr().err
        assert len(seen) == 2  # refused before the stage started


def test_eval_takes_threads_and_refuses_fewer_than_one(monkeypatch, tmp_path: Path, capsys) -> None:
    import quantized_models.model_dir
    import training.eval_cli
    from assistant.cli import main

    monkeypatch.setattr(quantized_models.model_dir, "load_models", lambda *args: "models")
    monkeypatch.setattr(training.eval_cli, "eval_asr",
                        lambda models, data, limit, beam_width, no_speech, ctc: {"wer": 0.5, "n": 1})
    base = ["eval", "asr", "--model-dir", str(tmp_path), "--llm-dir", str(tmp_path), "--data", str(tmp_path),
            "--json"]
    before = torch.get_num_threads()
    try:
        assert main([*base, "--threads", str(before + 1)]) == 0
        assert torch.get_num_threads() == before + 1
        assert '"wer": 0.5' in capsys.readouterr().out
        assert main([*base, "--threads", "0"]) != 0
        assert "--threads 0: give at least 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
