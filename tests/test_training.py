"""Training stages on a tiny synthetic data set and the fixture's tiny LLM (seconds, CPU).

One module-scoped chain runs stage 1 -> 2 -> 3 -> export; the tests read its outputs. The
key parity test checks that the state logits of the training forward equal the probabilities
the engine's streaming `listen_chunk` computes for the same weights.
"""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from quantized_models.frontend import CHUNK_SAMPLES, FrontendCache, frontend_step
from training.common import FrozenLlmChangedError, LoopConfig, assert_frozen, freeze, weights_checksum
from training.data.manifest import ManifestEntry, read_manifest, write_manifest
from training.features import (ChunkLabel, CharVocab, chunk_labels, load_wav, speed_perturbed,
                               utterance_chunks)
from training.model_config import EncoderGeometry, build_encoder, encoder_train_yaml, load_result
from training.stage1_encoder import Stage1Config, chunk_mask, pad_chunks, train_stage1
from training.stage2_connect import Stage2Config, train_stage2
from training.stage3_dialogue import Stage3Config, chunk_state_logits, train_stage3

WORDS = ["hello", "what", "time", "is", "it", "please", "stop", "music"]
TINY_GEOMETRY = EncoderGeometry(model_dim=32, attention_heads=2, linear_units=64, num_blocks=2)


def _loop(steps: int, lr: float = 3e-3) -> LoopConfig:
    return LoopConfig(steps=steps, lr=lr, warmup_steps=1, log_every_steps=1, checkpoint_every_steps=5)


def write_tiny_data(root: Path, n: int = 12) -> Path:
    """Tone-and-noise wavs with texts, answers and one pause, in the data helper's layout."""
    rng = np.random.default_rng(0)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        kind = ("statement", "question", "nonquery")[i % 3]
        samples = int(16_000 * rng.uniform(0.9, 2.2))
        t = np.arange(samples) / 16_000
        wave = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.01 * rng.standard_normal(samples)
        pauses = [[samples // 3, samples // 2]] if i == 1 else []
        for start, end in pauses:
            wave[start:end] = 0.0
        soundfile.write(root / f"wav/u{i}.wav", wave.astype(np.float32), 16_000, subtype="PCM_16")
        entries.append(ManifestEntry(
            id=f"u{i}", split="train" if i < n - 3 else "test", voice="espeak:en", kind=kind,
            text=" ".join(rng.choice(WORDS, 3)), answer="It is noon." if kind == "question" else None,
            wav=f"wav/u{i}.wav", num_samples=samples, pause_spans=pauses, seed=i))
    write_manifest(root, entries)
    return root


def _losses(run_dir: Path, column: str) -> list[float]:
    with (run_dir / "loss.csv").open() as f:
        return [float(row[column]) for row in csv.DictReader(f) if row.get(column)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_dir: Path) -> dict:
    """Stage 1 -> 2 -> 3 -> export on the tiny data, with LLM checksums around stages 2 and 3."""
    from training.export import export_model_dir
    from training.llm_sequence import load_frozen_llm

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("training")
    data = write_tiny_data(root / "data")
    llm_dir = tiny_dir / "llm"
    before = weights_checksum(load_frozen_llm(llm_dir)[0])
    train_stage1(data, root / "run1",
                 Stage1Config(geometry=TINY_GEOMETRY, loop=_loop(12), batch_utterances=4))
    train_stage2(root / "run1", data, llm_dir, root / "run2", Stage2Config(loop=_loop(10)))
    train_stage3(root / "run2", data, llm_dir, root / "run3", Stage3Config(loop=_loop(10, 1e-2)))
    model_dir = export_model_dir(root / "run3", root / "model", speech_from=tiny_dir / "checkpoints")
    after = weights_checksum(load_frozen_llm(llm_dir)[0])
    return {"root": root, "data": data, "llm_dir": llm_dir, "model_dir": model_dir,
            "llm_before": before, "llm_after": after}


def test_chunks_equal_the_streaming_front_end() -> None:
    x = np.random.default_rng(1).standard_normal(3 * CHUNK_SAMPLES + 700).astype(np.float32) * 0.1
    offline = utterance_chunks(x)
    cache, padded = FrontendCache.zeros(80), np.pad(x, (0, 4 * CHUNK_SAMPLES - x.shape[0]))
    streamed = [frontend_step(torch.from_numpy(padded[k * CHUNK_SAMPLES:(k + 1) * CHUNK_SAMPLES]), cache)[0]
                for k in range(4)]
    torch.testing.assert_close(offline, torch.cat(streamed), rtol=0, atol=1e-5)


def test_masked_batch_encoder_equals_streaming_steps() -> None:
    from quantized_models.encoder import EncoderCache

    torch.manual_seed(0)
    encoder = build_encoder(encoder_train_yaml(TINY_GEOMETRY, 10)).eval()
    chunks = torch.randn(2, 20, 19, 80)  # 20 chunks: past the 17-chunk position lag
    positions, visible = encoder.offline_positions(20, torch.device("cpu"))
    batched = encoder.forward_masked(chunks, positions, visible)  # [2, 80, D]
    cache = EncoderCache()
    steps = torch.cat([encoder.step(chunks[1, k:k + 1], cache)[0] for k in range(20)], dim=1)
    torch.testing.assert_close(batched[1:2], steps, rtol=1e-4, atol=1e-4)


def test_chunk_mask_is_chunk_causal_with_left_context() -> None:
    _, visible = chunk_mask(12, 4, left_chunks=1)
    assert visible[0, :4].all() and not visible[0, 4:].any()
    assert visible[11, 4:].all() and not visible[11, :4].any()  # 2 chunks back is out of reach


def test_chunk_labels_mark_only_the_end() -> None:
    entry = ManifestEntry(id="q", split="train", voice="v", kind="question", text="what time is it",
                          answer="Noon.", wav="q.wav", num_samples=5 * CHUNK_SAMPLES + 10,
                          pause_spans=[[CHUNK_SAMPLES, 3 * CHUNK_SAMPLES]])
    assert chunk_labels(entry) == [0, 0, 0, 0, 0, ChunkLabel.RESPOND]  # pause chunks 1-2 stay 0
    assert chunk_labels(entry, tail_chunks=2)[-3:] == [1, 1, 1]
    other = replace(entry, kind="nonquery", answer=None, pause_spans=[])
    assert chunk_labels(other) == [0] * 5 + [ChunkLabel.IGNORE]
    with pytest.raises(ValueError, match="no state label"):
        chunk_labels(replace(other, kind="statement"))


def test_speed_perturbation_scales_audio_labels_and_pauses() -> None:
    """A 1 kHz tone at speed 1.25 lasts 1/1.25 as long and sounds at 1.25 kHz; the end label and
    the pause move with it; speed 1 is the identity."""
    n = 10 * CHUNK_SAMPLES
    tone = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(n) / 16000)).astype(np.float32)
    entry = ManifestEntry(id="q", split="train", voice="v", kind="question", text="what time is it",
                          answer="Noon.", wav="q.wav", num_samples=n,
                          pause_spans=[[4 * CHUNK_SAMPLES, 6 * CHUNK_SAMPLES]])
    same, same_entry = speed_perturbed(tone, entry, 1.0)
    assert same is tone and same_entry is entry
    fast, fast_entry = speed_perturbed(tone, entry, 1.25)
    assert fast.shape[0] == fast_entry.num_samples == 8 * CHUNK_SAMPLES
    assert fast_entry.pause_spans == [[int(4 * CHUNK_SAMPLES / 1.25), int(6 * CHUNK_SAMPLES / 1.25)]]
    assert fast_entry.id != entry.id and fast_entry.text == entry.text
    assert chunk_labels(fast_entry) == [0] * 7 + [ChunkLabel.RESPOND]
    spectrum = np.abs(np.fft.rfft(fast[CHUNK_SAMPLES:-CHUNK_SAMPLES]))
    peak_hz = np.argmax(spectrum) * 16000 / (fast.shape[0] - 2 * CHUNK_SAMPLES)
    assert abs(peak_hz - 1250) < 5
    slow, slow_entry = speed_perturbed(tone, entry, 0.8)
    assert slow.shape[0] == slow_entry.num_samples == round(n / 0.8)


def test_char_vocab_round_trip_and_greedy() -> None:
    vocab = CharVocab()
    assert vocab.decode(vocab.encode("What's  the TIME?")) == "what's the time"
    ids = vocab.encode("aab")
    assert vocab.greedy([ids[0], ids[0], 0, ids[1], ids[2], ids[2]]) == "aab"


@pytest.mark.parametrize("run,column", [
    pytest.param("run1", "ctc_loss", id="stage1"),
    pytest.param("run2", "text_loss", id="stage2"),
    pytest.param("run3", "loss", id="stage3"),
])
def test_each_stage_loss_decreases(chain: dict, run: str, column: str) -> None:
    losses = _losses(chain["root"] / run, column)
    assert len(losses) >= 10
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert (chain["root"] / run / "loss.png").is_file()


def test_llm_stays_bit_identical(chain: dict) -> None:
    assert chain["llm_before"] == chain["llm_after"]


def test_stage3_leaves_encoder_and_adapter_alone(chain: dict) -> None:
    two, three = load_result(chain["root"] / "run2"), load_result(chain["root"] / "run3")
    for key, value in two["state"].items():
        changed = not torch.equal(value, three["state"][key])
        assert changed == key.startswith(("prompt_embeddings", "predictor_head")), key


def test_frozen_check_catches_changes(tiny_dir: Path) -> None:
    from training.llm_sequence import load_frozen_llm

    llm = load_frozen_llm(tiny_dir / "llm")[0]
    checksum = assert_frozen(llm)
    with torch.no_grad():
        next(llm.parameters()).view(-1)[0] += 1.0
    with pytest.raises(FrozenLlmChangedError, match="changed"):
        assert_frozen(llm, checksum)
    next(llm.parameters()).requires_grad_(True)
    with pytest.raises(FrozenLlmChangedError, match="trainable"):
        assert_frozen(llm)


def test_frozen_check_covers_the_two_convolution_adapter() -> None:
    """An encoder narrower than a quarter of the LLM gets the BatchNorm adapter, whose
    `num_batches_tracked` buffers are 0-d integers; stage 3 checksums that adapter."""
    from quantized_models.adapter import Adapter, AdapterDims

    adapter = Adapter(AdapterDims(enc_out_dim=8, llm_embed_dim=64, kernel_size=5, activation="relu",
                                  norm="layer"))
    assert adapter.dims.two_convs
    checksum = assert_frozen(freeze(adapter))
    adapter.bn1.running_mean += 1.0
    with pytest.raises(FrozenLlmChangedError, match="changed"):
        assert_frozen(adapter, checksum)


def test_export_round_trips_through_the_strict_loader(chain: dict) -> None:
    from quantized_models.model_dir import load_models

    models = load_models(chain["model_dir"], chain["llm_dir"], torch.device("cpu"), torch.float32)
    state = load_result(chain["root"] / "run3")["state"]
    torch.testing.assert_close(models.encoder.state_dict()["enc.1.after_norm.weight"],
                               state["encoder.enc.1.after_norm.weight"], rtol=0, atol=0)
    torch.testing.assert_close(models.llm.heads.prompt_embeddings.weight, state["prompt_embeddings.weight"],
                               rtol=0, atol=0)


def test_a_committed_speech_input_is_completed_into_a_loadable_model(chain: dict, tmp_path: Path) -> None:
    import shutil

    from quantized_models.model_dir import load_models
    from training.export import INFO_NAME, export_model_dir

    committed = tmp_path / "committed"  # what the repository keeps: audiollm/ and TRAINING.json only
    shutil.copytree(chain["model_dir"] / "audiollm", committed / "audiollm")
    shutil.copy(chain["model_dir"] / INFO_NAME, committed / INFO_NAME)
    out = export_model_dir(committed, tmp_path / "complete")
    models = load_models(out, chain["llm_dir"], torch.device("cpu"), torch.float32)
    state = load_result(chain["root"] / "run3")["state"]
    torch.testing.assert_close(models.llm.heads.prompt_embeddings.weight, state["prompt_embeddings.weight"],
                               rtol=0, atol=0)
    assert json.loads((out / INFO_NAME).read_text())["stage"] == 3
    assert sum(f.stat().st_size for f in (out / "codec").iterdir()) < 12e6  # the small placeholder


def test_the_kept_speech_input_artifact_loads_into_the_stage_modules() -> None:
    """training/artifacts/speech-input/result.pt (tools/keep-stage-result.py) is what a later
    session continues from: every released key must fit the modules its train.yaml builds."""
    from training.model_config import AudioLlmParts

    path = Path(__file__).resolve().parents[1] / "training/artifacts/speech-input/result.pt"
    assert path.stat().st_size < 8e6
    kept = load_result(path)
    parts = AudioLlmParts.build(kept["train_yaml"], kept["cmvn"])
    parts.load_released(kept["state"])  # strict: a missing or extra key raises
    assert kept["stage"] == 3 and parts.heads is not None
    assert parts.heads.prompt_embeddings.weight.shape[1] == 576  # SmolLM2-135M's width
    assert kept["state"]["encoder.global_cmvn.mean"].dtype == torch.float32


def test_training_state_logits_equal_engine_streaming(chain: dict) -> None:
    from quantized_models.llm import ChatLayout
    from training.llm_sequence import TurnLayout, load_frozen_llm
    from training.model_config import AudioLlmParts

    result = load_result(chain["root"] / "run3")
    parts = AudioLlmParts.build(result["train_yaml"], result["cmvn"])
    parts.load_released(result["state"])
    causal_lm, tokenizer = load_frozen_llm(chain["llm_dir"])
    layout = ChatLayout.from_template(result["train_yaml"]["model_conf"]["chat_template"], tokenizer)
    samples = load_wav(chain["data"] / "wav/u1.wav")  # the question with a pause
    with torch.no_grad():
        turns = TurnLayout(causal_lm, tokenizer, layout)
        logits = chunk_state_logits(parts, turns, utterance_chunks(samples))
    trained = torch.softmax(logits[:, :3], dim=-1)

    streamed = streamed_probs(chain["model_dir"], chain["llm_dir"], samples, logits.shape[0])
    torch.testing.assert_close(trained, streamed, rtol=1e-4, atol=1e-5)


def streamed_probs(model_dir: Path, llm_dir: Path, samples: np.ndarray, chunks: int) -> torch.Tensor:
    """[chunks, 3] state probabilities of the engine's `listen_chunk` over zero-padded samples."""
    from assistant.engine import Engine, EngineOptions
    from quantized_models.model_dir import load_models

    engine = Engine(load_models(model_dir, llm_dir, torch.device("cpu"), torch.float32), EngineOptions())
    state = engine.prefill_system(engine.new_session(seed=0))
    padded = np.pad(samples, (0, chunks * CHUNK_SAMPLES - samples.shape[0]))
    streamed = []
    for k in range(chunks):
        listened, state = engine.listen_chunk(
            state, torch.from_numpy(padded[k * CHUNK_SAMPLES:(k + 1) * CHUNK_SAMPLES]), follow_decision=False)
        streamed.append(listened.probs)
    return torch.tensor(streamed)


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    data = write_tiny_data(tmp_path / "data")
    config = Stage1Config(geometry=TINY_GEOMETRY, loop=_loop(6), batch_utterances=4, valid_limit=0)
    train_stage1(data, tmp_path / "straight", config)
    train_stage1(data, tmp_path / "resumed", replace(config, loop=replace(config.loop, stop_at_step=3)))
    assert not (tmp_path / "resumed" / "result.pt").exists()
    train_stage1(data, tmp_path / "resumed", config)
    a, b = load_result(tmp_path / "straight")["state"], load_result(tmp_path / "resumed")["state"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_bf16_autocast_trains_in_bfloat16_and_keeps_float32_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("training.common.cpu_has_native_bf16", lambda: True)  # emulated on CPUs without it
    data = write_tiny_data(tmp_path / "data")
    config = Stage1Config(geometry=TINY_GEOMETRY, loop=_loop(12), batch_utterances=4, valid_limit=0)
    train_stage1(data, tmp_path / "fp32", config)
    train_stage1(data, tmp_path / "bf16", replace(config, loop=replace(config.loop, bf16_autocast=True)))
    losses = _losses(tmp_path / "bf16", "ctc_loss")
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    fp32, bf16 = load_result(tmp_path / "fp32")["state"], load_result(tmp_path / "bf16")["state"]
    assert all(v.dtype == fp32[k].dtype for k, v in bf16.items())
    # Same seed and batches: only the forward's precision differs, so the weights must too.
    assert any(not torch.equal(v, fp32[k]) for k, v in bf16.items() if v.is_floating_point())


def test_bf16_on_a_cpu_without_native_bfloat16_trains_in_float32_and_says_so(tmp_path: Path, monkeypatch,
                                                                             caplog) -> None:
    monkeypatch.setattr("training.common.cpu_has_native_bf16", lambda: False)
    data = write_tiny_data(tmp_path / "data")
    config = Stage1Config(geometry=TINY_GEOMETRY, loop=_loop(3), batch_utterances=4, valid_limit=0)
    train_stage1(data, tmp_path / "fp32", config)
    with caplog.at_level("WARNING", logger="training.common"):
        train_stage1(data, tmp_path / "bf16", replace(config, loop=replace(config.loop, bf16_autocast=True)))
    assert "no native bfloat16" in caplog.text
    fp32, asked = load_result(tmp_path / "fp32")["state"], load_result(tmp_path / "bf16")["state"]
    assert all(torch.equal(v, fp32[k]) for k, v in asked.items())


def test_stage2_frozen_encoder_steps_train_only_the_adapter(chain: dict, tmp_path: Path) -> None:
    stage1 = load_result(chain["root"] / "run1")["state"]
    encoder_keys = [k for k, v in stage1.items()
                    if k.startswith("encoder.") and v.is_floating_point() and "global_cmvn" not in k]

    def run(steps: int) -> dict:
        config = Stage2Config(loop=_loop(steps), encoder_frozen_steps=3)
        train_stage2(chain["root"] / "run1", chain["data"], chain["llm_dir"], tmp_path / f"s{steps}", config)
        state = load_result(tmp_path / f"s{steps}")["state"]
        return {"encoder_changed": [k for k in encoder_keys if not torch.equal(state[k], stage1[k])],
                "adapter": {k: v for k, v in state.items() if k.startswith("adpter.")}}

    frozen, then_free = run(3), run(4)
    assert frozen["encoder_changed"] == []
    assert then_free["encoder_changed"]  # the fourth step trains the encoder again
    assert any(not torch.equal(v, then_free["adapter"][k]) for k, v in frozen["adapter"].items())
    assert len(_losses(tmp_path / "s3", "text_loss")) == 3


def test_turn_scoring_windows_and_pauses() -> None:
    from training.eval import TurnOutcome, score_turn

    n = 5 * CHUNK_SAMPLES  # chunks 0..4, the last one is 4
    assert score_turn("question", n, [], TurnOutcome(6, "respond"))["in_time"]
    assert not score_turn("question", n, [], TurnOutcome(7, "respond"))["in_time"]
    assert not score_turn("question", n, [], TurnOutcome(3, "respond"))["in_time"]
    assert not score_turn("nonquery", n, [], TurnOutcome(4, "respond"))["in_time"]
    pause = [[CHUNK_SAMPLES + 5, 2 * CHUNK_SAMPLES + 5]]  # overlaps chunks 1 and 2
    assert score_turn("question", n, pause, TurnOutcome(2, "respond"))["false_ends"] == 1
    assert score_turn("question", n, pause, TurnOutcome(4, "respond"))["false_ends"] == 0


def test_eval_and_transcribe_commands(chain: dict, capsys) -> None:
    import json

    from assistant.cli import main

    model = ["--model-dir", str(chain["model_dir"]), "--llm-dir", str(chain["llm_dir"])]
    for kind in ("asr", "states"):
        assert main(["eval", kind, *model, "--data", str(chain["data"]), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert set(report) == {"wer", "respond_within_2_chunks", "ignore_rate", "false_end_rate", "n"}
        assert report["n"] > 0
        assert main(["eval", kind, *model, "--data", str(chain["data"]), "--json", "--by-voice"]) == 0
        by_voice = json.loads(capsys.readouterr().out)["by_voice"]
        assert sum(group["n"] for group in by_voice.values()) == report["n"]
    assert main(["eval", "states", *model, "--data", str(chain["data"]), "--by-voice"]) == 0
    assert all(f"\n{group}\n" in capsys.readouterr().out for group in by_voice)
    assert report["respond_within_2_chunks"] is not None and report["ignore_rate"] is not None
    assert main(["transcribe", *model, "--input", str(chain["data"] / "wav/u0.wav")]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["transcribe", *model, "--input", str(chain["data"] / "wav/u0.wav"), "--beam-width", "1"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["eval", "asr", *model, "--data", str(chain["data"]), "--beam-width", "0"])
    assert "must be 1 or more, not 0" in capsys.readouterr().err
    assert main(["eval", "dialogue", *model, "--data", str(chain["data"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"agreement", "keyword_agreement", "n"} and report["n"] == 1  # one test question
    assert 0.0 <= report["keyword_agreement"] <= 1.0 and report["agreement"] <= report["keyword_agreement"]


def test_a_transcript_that_never_ends_stops_at_the_audio_length_cap(chain: dict, monkeypatch) -> None:
    from quantized_models.model_dir import load_models
    from training.transcribe import transcribe, transcript_token_cap

    assert transcript_token_cap(16_000) == 16 and transcript_token_cap(0) == 8
    assert transcript_token_cap(16_000 * 60) == 96  # the fixed cap still bounds long audio
    models = load_models(chain["model_dir"], chain["llm_dir"], torch.device("cpu"), torch.float32)
    llm, end = models.llm, models.llm.layout.end_of_turn_id
    head = llm.causal_lm.get_output_embeddings()

    def never_ending(hidden):  # the LLM's own logits, with the end of the answer ruled out
        return head(hidden).index_fill(-1, torch.tensor([end]), float("-inf"))

    monkeypatch.setattr(llm.causal_lm, "get_output_embeddings", lambda: never_ending)
    tokens = []
    monkeypatch.setattr(models.tokenizer, "decode", lambda ids, **_: tokens.append(len(ids)) or "")
    for seconds in (0.32, 1.0):
        transcribe(models, np.zeros(int(16_000 * seconds), dtype=np.float32))
    assert tokens == [transcript_token_cap(5_120), transcript_token_cap(16_000)]


def test_no_words_when_the_llm_would_end_the_transcript_at_once(chain: dict, monkeypatch) -> None:
    from quantized_models.model_dir import load_models
    from training.transcribe import NO_SPEECH_END_PROBABILITY, transcribe

    models = load_models(chain["model_dir"], chain["llm_dir"], torch.device("cpu"), torch.float32)
    end, word = models.llm.layout.end_of_turn_id, models.tokenizer.encode("hello")[0]
    p_end = {"value": 10 * NO_SPEECH_END_PROBABILITY}

    def head(hidden):  # "hello" is by far the likeliest token; ending at once has p_end["value"]
        logits = torch.full((*hidden.shape[:-1], models.llm.causal_lm.config.vocab_size), -30.0)
        logits[..., word] = 0.0
        logits[..., end] = float(np.log(p_end["value"]))
        return logits

    monkeypatch.setattr(models.llm.causal_lm, "get_output_embeddings", lambda: head)
    audio = np.zeros(16_000, dtype=np.float32)
    assert transcribe(models, audio, no_speech_end_probability=NO_SPEECH_END_PROBABILITY) == ""
    assert "hello" in transcribe(models, audio)  # no threshold by default: the beam goes on
    p_end["value"] = NO_SPEECH_END_PROBABILITY / 10
    assert "hello" in transcribe(models, audio, no_speech_end_probability=NO_SPEECH_END_PROBABILITY)


def test_transcribe_command_prints_no_words_for_a_file_without_speech(chain: dict, tmp_path: Path,
                                                                       capsys, caplog) -> None:
    import soundfile

    from assistant.cli import main

    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(8_000 * 2, dtype=np.float32), 8_000)
    model = ["--model-dir", str(chain["model_dir"]), "--llm-dir", str(chain["llm_dir"])]
    assert main(["transcribe", *model, "--input", str(silent)]) == 0
    assert capsys.readouterr().out == "\n"
    assert "holds no speech" in caplog.text


def test_the_no_speech_threshold_travels_with_the_model_directory(chain: dict, tmp_path: Path,
                                                                  monkeypatch, capsys) -> None:
    import json
    import shutil

    import training.transcribe as transcribe_module
    from assistant.cli import main
    from training.transcribe import NO_SPEECH_END_PROBABILITY, NO_SPEECH_KEY, model_no_speech_probability

    info = json.loads((chain["model_dir"] / "TRAINING.json").read_text())
    assert info[NO_SPEECH_KEY] == NO_SPEECH_END_PROBABILITY  # `train export` records it
    released = tmp_path / "released"  # a model directory this package did not train: no threshold
    shutil.copytree(chain["model_dir"], released)
    (released / "TRAINING.json").unlink()
    assert model_no_speech_probability(released) is None
    seen = []
    monkeypatch.setattr(transcribe_module, "transcribe", lambda *a, **kw: seen.append(kw) or "words")
    wav = str(chain["data"] / "wav/u0.wav")
    for model_dir in (chain["model_dir"], released):
        assert main(["transcribe", "--model-dir", str(model_dir), "--llm-dir", str(chain["llm_dir"]),
                     "--input", wav]) == 0
    assert [kw["no_speech_end_probability"] for kw in seen] == [NO_SPEECH_END_PROBABILITY, None]
    assert main(["eval", "asr", "--model-dir", str(chain["model_dir"]), "--llm-dir", str(chain["llm_dir"]),
                 "--data", str(chain["data"]), "--json"]) == 0
    assert seen[-1]["no_speech_end_probability"] == NO_SPEECH_END_PROBABILITY
    capsys.readouterr()
    (released / "TRAINING.json").write_text(json.dumps({NO_SPEECH_KEY: 2.0}))
    with pytest.raises(ValueError, match="must be a probability"):
        model_no_speech_probability(released)


def test_audio_too_long_for_the_llm_context_is_refused_before_encoding(chain: dict, monkeypatch) -> None:
    import re

    import training.transcribe as transcribe_module
    from quantized_models.model_dir import load_models

    models = load_models(chain["model_dir"], chain["llm_dir"], torch.device("cpu"), torch.float32)
    monkeypatch.setattr(models.llm, "max_context_tokens", 120)
    encoded = []
    real_stream = transcribe_module.stream_vectors
    monkeypatch.setattr(transcribe_module, "stream_vectors", lambda *a: encoded.append(1) or real_stream(*a))
    with pytest.raises(ValueError, match="do not fit the LLM's context of 120 positions") as refused:
        transcribe_module.transcribe(models, np.zeros(16_000 * 20, dtype=np.float32))
    assert not encoded
    longest_s = float(re.search(r"at most (\d+) s", str(refused.value)).group(1))
    transcribe_module.transcribe(models, np.zeros(int(16_000 * longest_s), dtype=np.float32))  # fits
    assert encoded


def test_beam_search_finds_the_likelier_transcript_greedy_decoding_misses() -> None:
    from training.transcribe import beam_search

    end, a, b, c, d, e = range(6)
    table = {(): {a: 0.6, b: 0.4}, (a,): {c: 0.5, d: 0.45, end: 0.05}, (a, c): {end: 0.6, e: 0.4},
             (a, d): {end: 0.99}}
    other = {e: 0.6, end: 0.4}  # any other prefix, e.g. one whose state two hypotheses shared

    def logits(prefix: tuple) -> torch.Tensor:
        probs = torch.full((6,), 1e-9)
        for token, p in table.get(prefix, other).items():
            probs[token] = p
        return probs.log()

    def feed(tokens: list, parents: list, rows: list) -> tuple[torch.Tensor, list]:  # a BatchFeed
        rows = [rows[p] + (t,) for t, p in zip(tokens, parents)]  # row i continues row parents[i]
        return torch.stack([logits(row) for row in rows]), rows

    def search(width: int) -> list[int]:
        return beam_search(logits(()), [()], feed, end, max_tokens=10, width=width)

    # greedy: a, c, end (0.6 * 0.5 * 0.6 = 0.18); a, d, end is likelier (0.267), which only a
    # beam that keeps "a" and "b", then "a c" and "a d" (both continuing "a"'s row) finds; it
    # fails when rows are fed in their own order instead of their parents'
    assert search(1) == [a, c]
    assert search(2) == [a, d] == search(4)
    # a hypothesis that ended early does not stop the search while a live one is likelier:
    # "a c" (0.35) beats "b" (0.27) and "a" (0.15), which both end a token before it
    table.clear()
    table.update({(): {a: 0.5, b: 0.3, end: 0.2}, (a,): {end: 0.3, c: 0.7}, (b,): {end: 0.9, e: 0.1},
                  (a, c): {end: 1.0}})
    assert search(2) == [a, c]
    table[("loop",)] = {e: 0.99, end: 0.01}  # a hypothesis that would never end stops at the cap
    loop = lambda tokens, parents, rows: (torch.stack([logits(("loop",))] * len(tokens)), rows)  # noqa: E731
    assert beam_search(logits(()), [()], loop, end, max_tokens=3, width=2) == [a, e, e]
    with pytest.raises(ValueError, match="at least 1"):
        search(0)


def test_batched_beam_rows_match_the_engine_feeding_each_hypothesis_alone(chain: dict) -> None:
    import copy

    from quantized_models.llm import LlmKvCache
    from quantized_models.model_dir import load_models
    from training.transcribe import batched_feed, beam_search

    models = load_models(chain["model_dir"], chain["llm_dir"], torch.device("cpu"), torch.float32)
    llm = models.llm
    context = LlmKvCache()
    llm.prefill_system(None, models.tokenizer, context)
    llm.run(torch.randn(6, llm.hidden_size, generator=torch.Generator().manual_seed(0)), context, [None] * 6)
    first_logits, _ = llm.start_answer(context)
    end = int(first_logits.argsort()[-10])  # a token the tiny LLM predicts now and then, as the end
    batched, seen = batched_feed(llm), {"batched": [], "alone": [], "parents": []}

    def feed_alone(tokens: list, parents: list, caches: list) -> tuple[torch.Tensor, list]:
        caches = [copy.deepcopy(caches[p]) for p in parents]  # the engine's path, one row at a time
        logits = torch.stack([llm.feed_token(t, cache)[0] for t, cache in zip(tokens, caches)])
        seen["alone"].append(logits)
        return logits, caches

    def feed_batched(tokens: list, parents: list, past) -> tuple[torch.Tensor, object]:
        logits, past = batched(tokens, parents, past)
        seen["batched"].append(logits)
        seen["parents"].append(parents)
        return logits, past

    for width in (1, 2, 4):
        for key in seen:
            seen[key].clear()
        alone = beam_search(first_logits, [copy.deepcopy(context)], feed_alone, end, 12, width)
        together = beam_search(first_logits, copy.deepcopy(context).past, feed_batched, end, 12, width)
        assert together == alone and len(seen["batched"]) == len(seen["alone"]) > 1
        for got, want in zip(seen["batched"], seen["alone"]):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        if width > 1:  # rows were reordered, not only continued in place
            assert any(parents != list(range(len(parents))) for parents in seen["parents"][1:])


def test_average_of_stage3_runs_means_what_stage3_trains_and_loads_in_the_engine(chain: dict, tmp_path: Path):
    from assistant.cli import main
    from quantized_models.model_dir import load_models
    from training.average import AVERAGED_KEYS, write_average
    from training.export import export_model_dir
    from training.model_config import load_result

    run3 = load_result(chain["root"] / "run3")
    kept = run3 | {"state": {k: v.half() if v.is_floating_point() else v for k, v in run3["state"].items()}}
    torch.save(kept, tmp_path / "kept.pt")  # a float16 artifact, as tools/keep-stage-result.py writes
    continued = {k: v.float() if v.is_floating_point() else v for k, v in kept["state"].items()}
    for key in AVERAGED_KEYS:  # another run from the kept result: only what stage 3 trains moved
        continued[key] = continued[key] + 1.0
    torch.save(kept | {"state": continued}, tmp_path / "continued.pt")
    assert main(["train", "average", "--init", str(tmp_path / "kept.pt"), str(tmp_path / "continued.pt"),
                 "--out", str(tmp_path / "avg")]) == 0
    average = load_result(tmp_path / "avg")["state"]
    for key in AVERAGED_KEYS:
        torch.testing.assert_close(average[key], kept["state"][key].float() + 0.5)
    assert torch.equal(average["encoder.global_cmvn.mean"], kept["state"]["encoder.global_cmvn.mean"])
    load_models(export_model_dir(tmp_path / "avg", tmp_path / "model", speech_from=chain["model_dir"]),
                chain["llm_dir"], torch.device("cpu"), torch.float32)  # the engine's strict loader

    encoder_key = next(k for k in continued if k.startswith("encoder.") and k.endswith("weight"))
    continued[encoder_key] = continued[encoder_key] + 1.0
    torch.save(kept | {"state": continued}, tmp_path / "other-encoder.pt")
    with pytest.raises(ValueError, match=encoder_key.replace(".", r"\.")):
        write_average([tmp_path / "kept.pt", tmp_path / "other-encoder.pt"], tmp_path / "refused")
    with pytest.raises(ValueError, match="stage-2"):
        write_average([chain["root"] / "run2", tmp_path / "kept.pt"], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_dialogue_agreement_compares_first_sentences_and_content_words() -> None:
    from training.eval_dialogue import AnswerPair, first_sentence

    assert first_sentence("Paris is the capital. It is big.") == "Paris is the capital."
    same = AnswerPair("q", spoken="Paris is the capital of France. More text",
                      typed="paris is the capital of france!")
    assert same.agrees and same.keywords_agree
    close = AnswerPair("q", spoken="The capital of France is Paris.", typed="Paris is the capital of France.")
    assert not close.agrees and close.keywords_agree
    wrong = AnswerPair("q", spoken="I like trains.", typed="Paris is the capital of France.")
    assert not wrong.agrees and not wrong.keywords_agree


def test_sigterm_checkpoints_and_returns(tmp_path: Path) -> None:
    import os
    import signal

    from training.common import CHECKPOINT_NAME, train_loop

    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def step_fn(step: int):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: finish this step, checkpoint, return
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss, {}

    result = train_loop(tmp_path, {"model": model}, step_fn, _loop(10))
    assert not result.finished and result.step == 3
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)["step"] == 3
    resumed = train_loop(tmp_path, {"model": model}, step_fn_no_signal(model, x, y), _loop(10))
    assert resumed.finished and resumed.step == 10


def step_fn_no_signal(model, x, y):
    return lambda step: (torch.nn.functional.mse_loss(model(x), y), {})


def test_rates_per_voice_group_split_accents_not_variants() -> None:
    from training.eval import TurnOutcome, state_rates_by_voice, word_error_rate

    def entry(voice: str, kind: str, text: str = "x") -> ManifestEntry:
        return ManifestEntry(id=voice + kind, split="test", voice=voice, kind=kind, text=text, answer=None,
                             wav="", num_samples=5 * CHUNK_SAMPLES, pause_spans=[], seed=0)

    in_time, late = TurnOutcome(4, "respond"), TurnOutcome(None, None)
    outcomes = [(entry("espeak:en-gb+m1", "question"), in_time), (entry("espeak:en-gb+f4", "question"), late),
                (entry("espeak:en-us+m7", "question"), in_time), (entry("noise:cough", "nonquery"), late)]
    report = state_rates_by_voice(outcomes)
    assert report["respond_within_2_chunks"] == 2 / 3 and report["n"] == 4
    assert list(report["by_voice"]) == ["espeak:en-gb", "espeak:en-us", "noise:cough"]
    assert report["by_voice"]["espeak:en-gb"] == {"respond_within_2_chunks": 0.5, "ignore_rate": None,
                                                  "false_end_rate": None, "n": 2}
    assert report["by_voice"]["noise:cough"]["ignore_rate"] == 0.0
    # weighted by each reference's words: 1 error in 4 words and 3 in 1 word are 4 in 5, not (0.25 + 3) / 2
    scored = [(entry("espeak:en-gb+m1", "statement"), 1, 4), (entry("espeak:en-gb+m2", "statement"), 3, 1)]
    assert word_error_rate(scored) == {"wer": 0.8, "n": 2}


def test_an_eval_limit_samples_every_kind_not_the_first_rows():
    from training.eval import spread

    rows = ["question"] * 6 + ["nonquery"] * 6  # the manifest groups kinds
    assert spread(rows, 4) == ["question", "question", "nonquery", "nonquery"]
    assert spread(rows, None) == rows and spread(rows, 99) == rows


def test_replayed_state_rates_follow_the_first_decision() -> None:
    from training.state_head import ChunkFeatures, replay_metrics

    def entry(kind: str, chunks: int, pauses: list) -> ManifestEntry:
        return ManifestEntry(id=kind, split="valid", voice="espeak:en", kind=kind, text="x", answer=None,
                             wav="", num_samples=chunks * CHUNK_SAMPLES, pause_spans=pauses, seed=0)

    pause = [[CHUNK_SAMPLES, 2 * CHUNK_SAMPLES - 1]]  # chunk 1 only
    data = ChunkFeatures(torch.zeros(0), torch.zeros(0), [0, 7, 14],
                         [entry("question", 5, pause), entry("nonquery", 5, [])])
    cont, respond, ignore = [0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]
    on_time = np.array([cont] * 5 + [respond] + [cont] + [cont] * 4 + [ignore] + [cont] * 2)
    assert replay_metrics(on_time, data) == {"respond_within_2_chunks": 1.0, "ignore_rate": 1.0,
                                             "false_end_rate": 0.0}
    early = np.array([cont, respond] + [cont] * 5 + [cont] * 3 + [respond] + [ignore] + [cont] * 2)
    assert replay_metrics(early, data) == {"respond_within_2_chunks": 0.0, "ignore_rate": 0.0,
                                           "false_end_rate": 1.0}


def test_vectorised_decisions_equal_the_engine_rule() -> None:
    from assistant.dialogue import Decision, DecisionThresholds, decide
    from training.state_head import chunk_decisions

    grid = np.array([0.0, 0.3, 0.5, 0.5000001, 0.7, 1.0], dtype=np.float32)
    probs = np.array([[1.0, a, b] for a in grid for b in grid], dtype=np.float32)
    for thresholds in (DecisionThresholds(), DecisionThresholds(0.3, 0.7)):
        codes = {Decision.CONTINUE: 0, Decision.RESPOND: 1, Decision.IGNORE: 2}
        expected = [codes[decide(float(p1), float(p2), thresholds)] for _, p1, p2 in probs]
        assert chunk_decisions(probs, thresholds).tolist() == expected


def test_state_head_refit_is_what_the_engine_streams(chain: dict, tmp_path: Path, caplog) -> None:
    from training.export import export_model_dir
    from training.state_head import HeadFitConfig, fit_state_head, replay_score

    config = HeadFitConfig(end_class_weights=(3.0,), l2_strengths=(1e-3,), bias_offsets=(-1.0, 0.0, 1.0),
                           lbfgs_iterations=50)
    with pytest.raises(ValueError, match="stage-3"):
        fit_state_head(chain["root"] / "run2", chain["data"], chain["llm_dir"], tmp_path / "bad", config)
    summary = fit_state_head(chain["root"] / "run3", chain["data"], chain["llm_dir"], tmp_path / "head",
                             config)
    assert summary["score"] >= replay_score(summary["valid_start"])
    start = load_result(chain["root"] / "run3")["state"]
    refit = load_result(tmp_path / "head")["state"]
    assert not torch.equal(start["predictor_head.weight"], refit["predictor_head.weight"])
    assert all(torch.equal(start[k], refit[k]) for k in start if not k.startswith("predictor_head"))
    with caplog.at_level("INFO", logger="training.state_head"):
        again = fit_state_head(chain["root"] / "run3", chain["data"], chain["llm_dir"], tmp_path / "head",
                               config)
    assert "reusing" in caplog.text and again["score"] == summary["score"]

    cached = torch.load(tmp_path / "head/features-train.pt", weights_only=False)["features"]
    turn = next(i for i, e in enumerate(cached.entries) if e.id == "u1")  # the question with a pause
    rows = cached.features[cached.turn_starts[turn]:cached.turn_starts[turn + 1]]
    head = load_result(tmp_path / "head")["state"]
    expected = torch.softmax(rows @ head["predictor_head.weight"][:3].T + head["predictor_head.bias"][:3], -1)

    model_dir = export_model_dir(tmp_path / "head", tmp_path / "model", speech_from=chain["model_dir"])
    samples = load_wav(chain["data"] / "wav/u1.wav")
    streamed = streamed_probs(model_dir, chain["llm_dir"], samples, rows.shape[0])
    torch.testing.assert_close(expected, streamed, rtol=1e-4, atol=1e-5)


def test_state_features_leave_a_batchnorm_adapter_alone(chain: dict, monkeypatch) -> None:
    """The two-convolution adapter (BatchNorm) must run as the engine runs it, whatever the batch."""
    import quantized_models.adapter as adapter_module
    from quantized_models.llm import ChatLayout
    from training.llm_sequence import TurnLayout, load_frozen_llm
    from training.model_config import AudioLlmParts
    from training.state_head import HeadFitConfig, extract_features

    monkeypatch.setattr(adapter_module, "SINGLE_CONV_WIDENING", 1)  # 32-wide encoder, 64-wide LLM
    result = load_result(chain["root"] / "run3")
    parts = AudioLlmParts.build(result["train_yaml"], result["cmvn"])
    assert parts.adapter.dims.two_convs and parts.adapter.training  # as `build` leaves it
    with torch.no_grad():
        for bn in (parts.adapter.bn1, parts.adapter.bn2):  # statistics unlike a fresh batch's
            bn.running_mean.uniform_(-1.0, 1.0)
            bn.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in parts.adapter.state_dict().items()}
    causal_lm, tokenizer = load_frozen_llm(chain["llm_dir"])
    layout = ChatLayout.from_template(result["train_yaml"]["model_conf"]["chat_template"], tokenizer)
    turns = TurnLayout(causal_lm, tokenizer, layout)
    one = extract_features(parts, turns, chain["data"], "train", HeadFitConfig(batch_turns=1))
    three = extract_features(parts, turns, chain["data"], "train", HeadFitConfig(batch_turns=3))
    assert all(torch.equal(before[k], v) for k, v in parts.adapter.state_dict().items())
    torch.testing.assert_close(one.features, three.features, rtol=1e-4, atol=1e-5)


def test_state_head_extra_data_adds_train_turns_but_never_held_out_texts(chain: dict, tmp_path: Path) -> None:
    """A second data set's train split (another seed) may hold this data's test texts: left out."""
    from training.state_head import HeadFitConfig, fit_state_head

    own = read_manifest(chain["data"])
    test_texts = {e.text for e in own if e.split == "test"}
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "wav").symlink_to(chain["data"] / "wav")
    # Every entry moves to train; one held-out text comes back re-cased, with other punctuation.
    moved = [replace(e, split="train") for e in own]
    recased = replace(next(e for e in moved if e.id == "u10"), id="u10b",
                      text=next(e.text for e in own if e.id == "u10").upper() + "?!")
    write_manifest(extra, [*moved, recased])
    config = HeadFitConfig(end_class_weights=(3.0,), l2_strengths=(1e-3,), bias_offsets=(0.0,),
                           lbfgs_iterations=20)
    alone = fit_state_head(chain["root"] / "run3", chain["data"], chain["llm_dir"], tmp_path / "alone",
                           config)
    summary = fit_state_head(chain["root"] / "run3", chain["data"], chain["llm_dir"], tmp_path / "more",
                             config, extra_data=(extra,))
    cached = torch.load(tmp_path / "more/features-extra1-train.pt", weights_only=False)["features"]
    own_train_turns = [e.id for e in own if e.split == "train" and e.kind in ("question", "nonquery")]
    assert [e.id for e in cached.entries] and not {e.text for e in cached.entries} & test_texts
    assert sorted(e.id for e in cached.entries) == sorted(own_train_turns)
    assert summary["extra_train_turns"] == len(own_train_turns)
    assert summary["train_turns"] == alone["train_turns"] + len(own_train_turns)
    assert summary["train_chunks"] == 2 * alone["train_chunks"]


def test_state_head_extra_valid_joins_the_choice_without_trained_texts(chain: dict, tmp_path: Path) -> None:
    """`state-head --extra-valid`: another data set's valid turns join the choice, less every text
    --data trains on (texts --data also holds out, as shared backchannels are, stay)."""
    from training.data.texts import dedup_key
    from training.state_head import HeadFitConfig, fit_state_head

    own = read_manifest(chain["data"])
    trained_only = ({dedup_key(e.text) for e in own if e.split == "train"}
                    - {dedup_key(e.text) for e in own if e.split != "train"})
    other = tmp_path / "other-voices"
    other.mkdir()
    (other / "wav").symlink_to(chain["data"] / "wav")
    write_manifest(other, [replace(e, split="valid") for e in own])  # every turn offered for the choice
    config = HeadFitConfig(end_class_weights=(3.0,), l2_strengths=(1e-3,), bias_offsets=(0.0,),
                           lbfgs_iterations=20)
    alone = fit_state_head(chain["root"] / "run3", chain["data"], chain["llm_dir"], tmp_path / "alone", config)
    both = fit_state_head(chain["root"] / "run3", chain["data"], chain["llm_dir"], tmp_path / "both", config,
                          extra_valid=(other,))
    cached = torch.load(tmp_path / "both/features-extra1-valid.pt", weights_only=False)["features"]
    kept = [e.id for e in own if e.kind in ("question", "nonquery") and dedup_key(e.text) not in trained_only]
    assert trained_only and kept and sorted(e.id for e in cached.entries) == sorted(kept)
    assert both["valid_turns"] == alone["valid_turns"] + len(kept)
    assert both["train_turns"] == alone["train_turns"]


def test_state_head_speed_perturbation_adds_sped_up_copies_of_the_train_turns(chain: dict, tmp_path: Path) -> None:
    from training.state_head import HeadFitConfig, fit_state_head

    config = HeadFitConfig(end_class_weights=(3.0,), l2_strengths=(1e-3,), bias_offsets=(0.0,),
                           lbfgs_iterations=20)
    alone = fit_state_head(chain["root"] / "run3", chain["data"], chain["llm_dir"], tmp_path / "alone", config)
    sped = fit_state_head(chain["root"] / "run3", chain["data"], chain["llm_dir"], tmp_path / "sped",
                          replace(config, speed_factors=(1.5,)))
    cache = torch.load(tmp_path / "sped/features-train-speed1.5.pt", weights_only=False)
    plain = torch.load(tmp_path / "sped/features-train.pt", weights_only=False)
    assert cache["speed"] == 1.5 and "speed" not in plain
    assert [e.id for e in cache["features"].entries] == [f"{e.id}@speed1.5" for e in plain["features"].entries]
    assert sped["train_turns"] == 2 * alone["train_turns"]
    assert alone["train_chunks"] < sped["train_chunks"] < 2 * alone["train_chunks"]  # 1.5x faster: fewer chunks
    with pytest.raises(ValueError, match="positive and not 1"):
        fit_state_head(chain["root"] / "run3", chain["data"], chain["llm_dir"], tmp_path / "same",
                       replace(config, speed_factors=(1.0,)))


def test_time_mask_hides_the_same_frames_in_overlapping_chunks() -> None:
    from training.stage1_encoder import time_mask

    rng = np.random.default_rng(3)
    chunks = torch.randn(2, 6, 19, 8) + 5.0
    counts = torch.tensor([6, 4])
    chunks[1, 4:] = 0.0  # padding of the shorter utterance
    mean = torch.full((8,), -1.0)
    out = time_mask(chunks, counts, mean, masks=2, max_frames=12, rng=np.random.default_rng(3))
    hidden = (out == -1.0).all(-1)  # [B, N, 19]
    assert hidden.any()
    changed = (out != chunks).any(-1)
    assert torch.equal(changed, hidden)  # only whole frames change, and only to the mean
    assert torch.equal(out[1, 4:], chunks[1, 4:])  # padding untouched
    # rows 16..18 of chunk k are rows 0..2 of chunk k + 1
    assert torch.equal(hidden[0, :-1, 16:], hidden[0, 1:, :3])
    assert torch.equal(hidden[1, :3, 16:], hidden[1, 1:4, :3])
    assert hidden[0].sum() <= 2 * 12 * 2  # each frame is in at most two chunks
    unchanged = time_mask(chunks, counts, mean, masks=0, max_frames=12, rng=rng)
    assert torch.equal(unchanged, chunks)


def test_stage2_augmentation_is_off_by_default_and_masks_only_with_the_mean(tmp_path: Path) -> None:
    from training.features import load_utterances
    from training.stage2_connect import augmented

    utts = load_utterances(write_tiny_data(tmp_path), "train", ("statement", "question"), limit=3)
    mean = torch.full((utts[0].chunks.shape[-1],), -7.0)
    chunks, counts = pad_chunks(utts)
    plain = augmented(utts, mean, Stage2Config(), np.random.default_rng(0))
    assert torch.equal(plain[0], chunks) and torch.equal(plain[1], counts)
    config = Stage2Config(freq_mask_bins=4, time_masks=2, time_mask_frames=10)
    out, out_counts = augmented(utts, mean, config, np.random.default_rng(0))
    assert out.shape == chunks.shape and torch.equal(out_counts, counts)
    assert not torch.equal(out, chunks)
    assert bool(((out == chunks) | (out == -7.0)).all())
    for i, n in enumerate(counts.tolist()):
        assert torch.equal(out[i, n:], chunks[i, n:])  # padding stays zero


def test_stage3_cli_passes_loss_weights(monkeypatch, tmp_path):
    """`train stage3 --state-loss-weight/--end-class-weight` reach the stage-3 config (defaults otherwise)."""
    import training.stage3_dialogue as stage3
    from assistant.cli import main

    seen = []
    monkeypatch.setattr(stage3, "train_stage3", lambda init, data, llm, out, config: seen.append(config) or {})
    base = ["train", "stage3", "--data", str(tmp_path), "--init", str(tmp_path), "--out", str(tmp_path / "r"),
            "--llm-dir", str(tmp_path)]
    assert main(base) == 0
    assert main([*base, "--state-loss-weight", "4", "--end-class-weight", "1.5",
                 "--extra-data", str(tmp_path / "d1"), str(tmp_path / "d2")]) == 0
    assert (seen[0].state_loss_weight, seen[0].end_class_weight, seen[0].extra_data) == (1.0, 3.0, ())
    assert (seen[1].state_loss_weight, seen[1].end_class_weight) == (4.0, 1.5)
    assert seen[1].extra_data == (tmp_path / "d1", tmp_path / "d2")


def test_stage3_extra_data_adds_turns_with_their_silent_tail(chain: dict, tmp_path: Path) -> None:
    """`train stage3 --extra-data` trains on the other data sets' question and non-query turns too,
    each followed by the same silent tail chunks as --data's own."""
    from training.features import load_train_utterances

    kinds = ("question", "nonquery")
    extra = write_tiny_data(tmp_path / "extra", n=6)
    own = load_train_utterances(chain["data"], kinds)
    bare = load_train_utterances(chain["data"], kinds, (extra,))
    tailed = load_train_utterances(chain["data"], kinds, (extra,), tail_chunks=2)
    assert len(bare) > len(own) > 0
    assert [u.entry.id for u in tailed] == [u.entry.id for u in bare]
    assert all(t.chunks.shape[0] == b.chunks.shape[0] + 2 for t, b in zip(tailed, bare))
    summary = train_stage3(chain["root"] / "run2", chain["data"], chain["llm_dir"], tmp_path / "run3",
                           Stage3Config(loop=_loop(2), extra_data=(extra,)))
    assert summary["train_turns"] == len(bare)
    from training.model_config import load_result

    assert load_result(tmp_path / "run3")["extra"]["config"]["extra_data"] == [str(extra)]


def test_stage2_speed_perturbation_adds_copies_of_the_own_train_split_only(chain: dict, tmp_path: Path) -> None:
    """`train stage2 --speed-perturb` adds one sped copy of --data's train utterances per factor;
    --extra-data's utterances come in once, unperturbed; factor 1 is refused."""
    from training.features import load_train_utterances

    kinds = ("statement", "question", "nonquery")
    extra = write_tiny_data(tmp_path / "extra", n=6)
    plain = load_train_utterances(chain["data"], kinds, (extra,))
    sped = load_train_utterances(chain["data"], kinds, (extra,), speed_factors=(0.8, 1.25))
    own = [u.entry.id for u in load_train_utterances(chain["data"], kinds)]
    ids = [u.entry.id for u in sped]
    assert len(sped) == len(plain) + 2 * len(own)
    assert sorted(i for i in ids if "@speed" in i) == sorted(f"{i}@speed{f}" for i in own for f in ("0.8", "1.25"))
    frames = {u.entry.id: u.chunks.shape[0] for u in sped}
    assert all(frames[f"{i}@speed0.8"] >= frames[i] >= frames[f"{i}@speed1.25"] for i in own)
    assert sum(frames[f"{i}@speed0.8"] for i in own) > sum(frames[i] for i in own)
    summary = train_stage2(chain["root"] / "run1", chain["data"], chain["llm_dir"], tmp_path / "run2",
                           Stage2Config(loop=_loop(2), speed_factors=(1.25,)))
    assert summary["train_utterances"] == 2 * len(own)
    with pytest.raises(ValueError, match="positive and not 1"):
        load_train_utterances(chain["data"], kinds, speed_factors=(1.0,))


def test_stage2_cli_passes_speed_factors(monkeypatch, tmp_path):
    import training.stage2_connect as stage2
    from assistant.cli import main

    seen = []
    monkeypatch.setattr(stage2, "train_stage2", lambda init, data, llm, out, config: seen.append(config) or {})
    base = ["train", "stage2", "--data", str(tmp_path), "--init", str(tmp_path), "--out", str(tmp_path / "r"),
            "--llm-dir", str(tmp_path)]
    assert main(base) == 0 and main([*base, "--speed-perturb", "0.9", "1.1"]) == 0
    assert seen[0].speed_factors == () and seen[1].speed_factors == (0.9, 1.1)
