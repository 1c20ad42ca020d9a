"""`freeze-omni respond` end to end on the official recording, and its handling of bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file

from assistant.cli import main
from tests.conftest import FIXTURE_INPUTS, load_json

FIXTURE_ARGS = [
    "--turn-end", "file", "--text-top-k", "1", "--speech-top-k", "1", "--max-new-tokens", "24",
    "--max-speech-tokens", "120", "--segmentation", "sentence", "--device", "cpu", "--dtype", "float32",
]
DECISION_NAMES = {"cl": "continue", "ss": "respond", "el": "ignore"}
PCM_TOLERANCE_LSB = 4


def _respond(tiny_dir: Path, wav: Path, out_dir: Path, extra: list[str] | None = None,
             model_dir: Path | None = None, llm_dir: Path | None = None) -> int:
    return main([
        "respond", "--model-dir", str(model_dir or tiny_dir / "checkpoints"),
        "--llm-dir", str(llm_dir or tiny_dir / "llm"), "--input", str(wav),
        "--output", str(out_dir / "answer.wav"), "--trace", str(out_dir / "trace.json"),
        *(extra if extra is not None else FIXTURE_ARGS),
    ])


@pytest.mark.parametrize("name", FIXTURE_INPUTS)
def test_respond_reproduces_official_recording(tiny_dir, tmp_path, name, capsys):
    assert _respond(tiny_dir, tiny_dir / f"inputs/{name}.wav", tmp_path) == 0
    _check_against_recording(tiny_dir, tmp_path, name)
    out = capsys.readouterr().out
    generation = load_json(tiny_dir / f"expected/{name}/generation.json")
    assert generation["final_text"].splitlines()[0] in out and "ms/chunk" in out


def test_respond_on_onnxruntime_reproduces_official_recording(tiny_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    onnx_dir = tmp_path / "onnx"
    assert main(["export-onnx", "--model-dir", str(tiny_dir / "checkpoints"), "--llm-dir",
                 str(tiny_dir / "llm"), "--out", str(onnx_dir), "--device", "cpu"]) == 0
    for name in FIXTURE_INPUTS:
        out = tmp_path / name
        extra = [*FIXTURE_ARGS, "--backend", "onnx", "--onnx-dir", str(onnx_dir)]
        assert _respond(tiny_dir, tiny_dir / f"inputs/{name}.wav", out, extra=extra) == 0
        _check_against_recording(tiny_dir, out, name)


def _check_against_recording(tiny_dir: Path, tmp_path: Path, name: str) -> None:
    trace = json.loads((tmp_path / "trace.json").read_text(encoding="utf-8"))
    chunks = load_json(tiny_dir / f"expected/{name}/chunks.json")["chunks"]
    generation = load_json(tiny_dir / f"expected/{name}/generation.json")
    segments = load_json(tiny_dir / f"expected/{name}/segments.json")["segments"]

    assert [c["decision"] for c in trace["chunks"]] == [DECISION_NAMES[c["decision"]] for c in chunks]
    probs = np.array([c["probs"] for c in trace["chunks"]])
    expected_probs = np.array([[c["p0"], c["p1"], c["p2"]] for c in chunks])
    np.testing.assert_allclose(probs, expected_probs, atol=1e-4, rtol=0)
    assert trace["tokens"] == generation["generated_ids"]
    assert trace["text"] == generation["final_text"]
    assert [s["text"] for s in trace["segments"]] == [s["raw_text"] for s in segments]
    assert [s["tts_text"] for s in trace["segments"]] == [s["text"] for s in segments]
    assert [s["tts_token_ids"] for s in trace["segments"]] == [s["ids"] for s in segments]
    assert [s["codec_tokens"] for s in trace["segments"]] == [s["codec_ids"] for s in segments]
    assert trace["sample_rate"] == 24000

    pcm, rate = soundfile.read(tmp_path / "answer.wav", dtype="int16")
    assert rate == 24000
    expected = load_file(tiny_dir / f"expected/{name}/answer.safetensors")["answer_pcm_24k"]
    expected_int16 = np.clip(np.round(expected.numpy().astype(np.float64) * 32768), -32768, 32767)
    assert pcm.shape == expected_int16.shape
    assert np.abs(pcm.astype(np.int64) - expected_int16).max() <= PCM_TOLERANCE_LSB


def _one_line_error(capsys, rc: int, *fragments: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_missing_model_dir(tiny_dir, tmp_path, capsys):
    rc = _respond(tiny_dir, tiny_dir / "inputs/question.wav", tmp_path, model_dir=tmp_path / "nope")
    _one_line_error(capsys, rc, "does not exist")


def test_directory_that_is_not_a_model(tiny_dir, tmp_path, capsys):
    rc = _respond(tiny_dir, tiny_dir / "inputs/question.wav", tmp_path, model_dir=tiny_dir / "llm")
    _one_line_error(capsys, rc, "not a Freeze-Omni model directory", "audiollm/final.pt")


def test_missing_input(tiny_dir, tmp_path, capsys):
    _one_line_error(capsys, _respond(tiny_dir, tmp_path / "missing.wav", tmp_path), "does not exist")


def test_empty_wav(tiny_dir, tmp_path, capsys):
    wav = tmp_path / "empty.wav"
    soundfile.write(wav, np.zeros(0, dtype=np.int16), 16000)
    _one_line_error(capsys, _respond(tiny_dir, wav, tmp_path), "no audio samples")


def test_corrupt_wav(tiny_dir, tmp_path, capsys):
    wav = tmp_path / "corrupt.wav"
    wav.write_bytes(b"RIFF this is not audio at all")
    _one_line_error(capsys, _respond(tiny_dir, wav, tmp_path), "not a readable audio file")


def test_llm_of_the_wrong_width(tiny_dir, tmp_path, capsys):
    llm = tmp_path / "llm"
    llm.mkdir()
    for item in (tiny_dir / "llm").iterdir():
        (llm / item.name).symlink_to(item)
    (llm / "config.json").unlink()
    config = json.loads((tiny_dir / "llm/config.json").read_text())
    config["hidden_size"] = 32
    (llm / "config.json").write_text(json.dumps(config))
    rc = _respond(tiny_dir, tiny_dir / "inputs/question.wav", tmp_path, llm_dir=llm)
    _one_line_error(capsys, rc, "hidden size 32", "64")


def _copy_model_dir(tiny_dir: Path, dest: Path) -> Path:
    shutil.copytree(tiny_dir / "checkpoints", dest)
    return dest


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_strict_audiollm_loading(tiny_dir, tmp_path, capsys, change):
    model_dir = _copy_model_dir(tiny_dir, tmp_path / "model")
    path = model_dir / "audiollm/final.pt"
    state = torch.load(path, map_location="cpu")
    key = "predictor_head.bias"
    if change == "missing":
        del state[key]
    elif change == "extra":
        state["encoder.enc.1.surprise.weight"] = torch.zeros(3)
        key = "surprise"
    else:
        state[key] = torch.zeros(7)
    torch.save(state, path)
    rc = _respond(tiny_dir, tiny_dir / "inputs/question.wav", tmp_path, model_dir=model_dir)
    _one_line_error(capsys, rc, str(path), key)


def test_stereo_44k_input_with_model_turn_end(tiny_dir, tmp_path, capsys):
    mono, rate = soundfile.read(tiny_dir / "inputs/question.wav", dtype="float32")
    from audio_io.resample import resample

    resampled = resample(mono, rate, 44100)
    wav = tmp_path / "stereo.wav"
    soundfile.write(wav, np.stack([resampled, resampled], axis=1), 44100)
    args = ["--turn-end", "model", "--text-top-k", "1", "--max-new-tokens", "6",
            "--max-speech-tokens", "30", "--device", "cpu", "--seed", "3"]
    assert _respond(tiny_dir, wav, tmp_path, extra=args) == 0
    trace = json.loads((tmp_path / "trace.json").read_text(encoding="utf-8"))
    # The official decisions on this question are continue, continue, ignore: the turn is dropped.
    assert [c["decision"] for c in trace["chunks"]] == ["continue", "continue", "ignore"]
    assert trace["tokens"] == []
    assert "ignore" in capsys.readouterr().out


@pytest.mark.parametrize("part", ["codec", "decoder", "audiollm"])
def test_corrupt_checkpoint_file(tiny_dir, tmp_path, capsys, part):
    model_dir = _copy_model_dir(tiny_dir, tmp_path / "model")
    path = model_dir / part / "final.pt"
    path.write_bytes(path.read_bytes()[:1000])  # truncated download
    rc = _respond(tiny_dir, tiny_dir / "inputs/question.wav", tmp_path, model_dir=model_dir)
    _one_line_error(capsys, rc, str(path), "cannot read")


def test_checkpoint_with_pickled_training_objects_still_loads(tiny_dir, tmp_path):
    """Training snapshots may pickle argument namespaces next to the weights."""
    import argparse

    model_dir = _copy_model_dir(tiny_dir, tmp_path / "model")
    path = model_dir / "decoder/final.pt"
    snapshot = torch.load(path, map_location="cpu")
    snapshot["args"] = argparse.Namespace(lr=1e-3)
    torch.save(snapshot, path)
    args = [*FIXTURE_ARGS[:-6], "--max-new-tokens", "4", "--device", "cpu"]
    assert _respond(tiny_dir, tiny_dir / "inputs/question.wav", tmp_path, extra=args,
                    model_dir=model_dir) == 0


def test_run_without_the_audio_device_exits_with_one_line(tiny_dir, capsys):
    pytest.importorskip("pyaudio")
    rc = main(["run", "--model-dir", str(tiny_dir / "checkpoints"), "--llm-dir", str(tiny_dir / "llm"),
               "--input-device", "no-such-microphone-xyz", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 69
    assert len(err.splitlines()) == 1 and "no-such-microphone-xyz" in err and "Traceback" not in err
