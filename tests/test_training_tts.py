"""Speech-output training (tts-decoder, tts-prefix, export, say, eval tts) on the tiny fixture LLM.

Speech and codec are faked (each character becomes one "codec id"), so the stages learn a small
copy task in seconds; the parity test checks that the batched training forward computes what
the engine's prefill + AR steps compute, logit by logit, with and without the prefix.
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

from quantized_models.speech_decoder import DecoderCache, DecoderDims, SpeechDecoder
from training.common import LoopConfig, weights_checksum
from training.data.texts import TextBank
from training.tts.decoder_forward import (
    DecoderBatch,
    conditioning_mask,
    own_prediction_inputs,
    teacher_forced_logits,
)
from training.tts.decoder_model import DecoderExample, DecoderGeometry, load_decoder_result
from training.tts.stage_decoder import TtsDecoderConfig, sampled_batch_step

N_CODES = 64  # the fixture codec's vocabulary, so the exported decoder speaks through it
TINY_GEOMETRY = DecoderGeometry(rows_per_vector=4, attention_heads=2, linear_units=32, num_blocks=2)


class FakeCodec:
    """Codec contract stand-in: one id per sample, samples made by `fake_speak`."""

    n_codes, samples_per_token, sample_rate_hz = N_CODES, 600, 24_000

    def encode_wav(self, samples: np.ndarray, rate_hz: int) -> np.ndarray:
        return np.round(samples * N_CODES).astype(np.int64) % N_CODES


def fake_speak(text: str) -> tuple[np.ndarray, int]:
    """One 'sample' per letter, so the ids follow the text (a learnable copy task)."""
    return np.array([(ord(c) % N_CODES) / N_CODES for c in text if c.isalpha()], dtype=np.float32), 24_000


def _decoder_config(steps: int = 20) -> TtsDecoderConfig:
    return TtsDecoderConfig(geometry=TINY_GEOMETRY, loop=_loop(steps), batch_pairs=4, dropout=0.0)


def _loop(steps: int, lr: float = 1e-2) -> LoopConfig:
    return LoopConfig(steps=steps, lr=lr, warmup_steps=1, log_every_steps=1, checkpoint_every_steps=5)


def _bank(root: Path) -> Path:
    questions = {"train": ["What time is it?", "Is it cold?", "Where is the cat?"],
                 "valid": ["Is it warm?"], "test": ["Who is there?"]}
    answers = {"What time is it?": "It is noon. Have lunch.", "Is it cold?": "Yes, it is cold.",
               "Where is the cat?": "The cat is here.", "Is it warm?": "It is warm.",
               "Who is there?": "A friend is there."}
    statements = {"train": ["Hello there.", "The sun is up.", "I like tea.", "Stop the music."],
                  "valid": ["A dog barks."], "test": ["Rain falls."]}
    bank = TextBank(statements=statements, questions=questions, nonqueries={}, answers=answers)
    root.mkdir(parents=True, exist_ok=True)
    bank.save(root / "texts.json")
    return root


def _column(run_dir: Path, column: str) -> list[float]:
    with (run_dir / "loss.csv").open() as f:
        return [float(row[column]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_dir: Path) -> dict:
    """tts-decoder -> tts-prefix -> export beside the fixture's codec, LLM checksummed around."""
    from training.llm_sequence import load_frozen_llm
    from training.tts.export import export_decoder
    from training.tts.stage_decoder import train_tts_decoder
    from training.tts.stage_prefix import TtsPrefixConfig, train_tts_prefix

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tts")
    data, llm_dir = _bank(root / "data"), tiny_dir / "llm"
    before = weights_checksum(load_frozen_llm(llm_dir)[0])
    dec = train_tts_decoder(data, FakeCodec(), llm_dir, root / "dec", _decoder_config(), speak=fake_speak)
    prefix_config = TtsPrefixConfig(loop=_loop(15, 3e-2), batch_pairs=4, dropout=0.0)
    pre = train_tts_prefix(root / "dec", data, FakeCodec(), llm_dir, root / "pre", prefix_config,
                           speak=fake_speak)
    model_dir = root / "model"
    import shutil

    shutil.copytree(tiny_dir / "checkpoints" / "audiollm", model_dir / "audiollm")
    export_decoder(root / "pre", model_dir, tiny_dir / "checkpoints" / "codec")
    after = weights_checksum(load_frozen_llm(llm_dir)[0])
    return {"root": root, "data": data, "llm_dir": llm_dir, "model_dir": model_dir, "dec": dec, "pre": pre,
            "llm_before": before, "llm_after": after}


def _random_decoder() -> SpeechDecoder:
    torch.manual_seed(0)
    dims = DecoderDims(idim=16, odim=32, attention_dim=16, num_heads=2, linear_units=32, num_blocks=2,
                       kv_cache_prefix_finetune=True)
    decoder = SpeechDecoder(dims).eval()
    for param in decoder.parameters():
        torch.nn.init.normal_(param, std=0.3)  # large weights: a wrong mask changes the logits
    return decoder


@pytest.mark.parametrize("use_prefix", [pytest.param(False, id="no-prefix"), pytest.param(True, id="prefix")])
def test_training_forward_equals_engine_prefill_and_steps(use_prefix: bool) -> None:
    decoder = _random_decoder()
    texts, prefixes = [torch.randn(8, 16), torch.randn(12, 16)], [torch.randn(4, 16), torch.randn(8, 16)]
    tokens = [torch.randint(0, 32, (5,)), torch.randint(0, 32, (9,))]
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
    batch = DecoderBatch(pad(texts), [8, 12], pad(tokens), [5, 9],
                         pad(prefixes) if use_prefix else None, [4, 8] if use_prefix else None)
    with torch.no_grad():
        out = teacher_forced_logits(decoder, batch)
    offset = 0
    for b in range(2):  # the engine's path: prefill, then one AR step per teacher-forced id
        prefix = prefixes[b] if use_prefix else None
        cache = decoder.prefill(texts[b], prefix, DecoderCache(max_new_tokens=20))
        fed, steps = [decoder.dims.sos_id, *tokens[b].tolist()], []
        for token in fed:
            logits, cache = decoder.step(token, cache)
            steps.append(logits)
        torch.testing.assert_close(out.logits[offset:offset + len(fed)], torch.stack(steps),
                                   rtol=1e-4, atol=1e-4)
        offset += len(fed)
    assert out.targets.tolist() == [*tokens[0].tolist(), 34, *tokens[1].tolist(), 34]  # EOS = odim + 2


def test_conditioning_is_bidirectional_tokens_causal() -> None:
    visible = conditioning_mask(cond_len=3, token_len=2, total=7)  # 3 cond + SOS + 2 ids + 1 pad
    assert visible[:3, :3].all() and not visible[:3, 3:].any()  # conditioning: only itself, all of it
    assert visible[3:6, :3].all()  # tokens see every conditioning row
    assert torch.equal(visible[3:6, 3:6], torch.tril(torch.ones(3, 3, dtype=torch.bool)))  # causal
    assert not visible[:6, 6].any()  # nobody attends the padding


def test_prefix_is_visible_to_every_position() -> None:
    decoder = _random_decoder()
    text, tokens = torch.randn(1, 8, 16), torch.randint(0, 32, (1, 4))
    base = DecoderBatch(text, [8], tokens, [4], torch.randn(1, 4, 16), [4])
    other = DecoderBatch(text, [8], tokens, [4], base.prefix_rows + 1.0, [4])  # type: ignore[operator]
    with torch.no_grad():
        a, b = teacher_forced_logits(decoder, base).logits, teacher_forced_logits(decoder, other).logits
    assert ((a - b).abs().amax(-1) > 1e-3).all()  # every token position reads the prefix


@pytest.mark.parametrize("run,key,factor", [pytest.param("dec", "dec", 0.8, id="tts-decoder"),
                                            pytest.param("pre", "pre", 0.99, id="tts-prefix")])
def test_each_stage_loss_decreases(chain: dict, run: str, key: str, factor: float) -> None:
    losses = _column(chain["root"] / run, "loss")
    assert len(losses) >= 10
    assert np.mean(losses[-3:]) < factor * np.mean(losses[:3]), losses
    assert (chain["root"] / run / "loss.png").is_file()
    assert chain[key]["finished"]


def test_llm_stays_bit_identical(chain: dict) -> None:
    assert chain["llm_before"] == chain["llm_after"]


def test_decoder_stage_leaves_the_prefix_and_prefix_stage_only_the_prefix(chain: dict) -> None:
    from training.tts.decoder_model import build_decoder

    dec, pre = load_decoder_result(chain["root"] / "dec"), load_decoder_result(chain["root"] / "pre")
    init = build_decoder(dec["layout"], seed=0).state_dict()
    for key, value in dec["state"].items():
        assert torch.equal(value, init[key]) == key.startswith("layers_prefix."), key
    for key, value in dec["state"].items():
        assert (not torch.equal(value, pre["state"][key])) == key.startswith("layers_prefix."), key


def test_export_round_trips_through_the_engine_loader(chain: dict) -> None:
    from quantized_models.model_dir import load_models

    layout = json.loads((chain["model_dir"] / "decoder" / "model.json").read_text())
    assert layout[:2] == [16, N_CODES] and layout[2]["transformer_attention_dim"] == 16  # 64 = 4 x 16
    models = load_models(chain["model_dir"], chain["llm_dir"], torch.device("cpu"), torch.float32)
    state = load_decoder_result(chain["root"] / "pre")["state"]
    assert set(models.decoder.state_dict()) == set(state)
    for key, value in models.decoder.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def test_say_writes_a_wav_through_the_engine(chain: dict, tmp_path: Path, capsys) -> None:
    from assistant.cli import main

    out = tmp_path / "speech.wav"
    status = main(["say", "--text", "Hello there. I like tea.", "--output", str(out), "--model-dir",
                   str(chain["model_dir"]), "--llm-dir", str(chain["llm_dir"]), "--top-k", "1",
                   "--max-speech-tokens", "30"])
    assert status == 0
    samples, rate = soundfile.read(out)
    assert rate == 24_000 and samples.size > 0 and samples.size % 600 == 0
    printed = capsys.readouterr().out
    assert printed.count("codec ids") == 2  # two sentences, two segments


def test_say_caps_a_segment_at_ten_seconds_of_any_codec() -> None:
    from types import SimpleNamespace

    from training.tts.cli import default_segment_cap

    assert default_segment_cap(SimpleNamespace(sampling_rate=24_000, samples_per_token=480)) == 500  # WORLD
    assert default_segment_cap(SimpleNamespace(sampling_rate=24_000, samples_per_token=280)) == 858  # units


def test_say_refuses_an_empty_text(chain: dict, tmp_path: Path, capsys) -> None:
    from assistant.cli import main

    status = main(["say", "--text", "  ", "--output", str(tmp_path / "x.wav"), "--model-dir",
                   str(chain["model_dir"]), "--llm-dir", str(chain["llm_dir"])])
    assert status == 2 and "nothing to say" in capsys.readouterr().err


def test_eval_tts_reports_every_setting(chain: dict) -> None:
    from assistant.engine import Engine, EngineOptions
    from quantized_models.model_dir import load_models
    from training.tts.eval_tts import METRIC_KEYS, eval_tts

    models = load_models(chain["model_dir"], chain["llm_dir"], torch.device("cpu"), torch.float32)
    engine = Engine(models, EngineOptions(max_speech_tokens=20))
    heard = iter(["a friend is there", "a friend", "", "friend is there", ""])
    report = eval_tts(engine, chain["data"], top_ks=(1, 2), prefixes=(True, False), limit=1,
                      speak=fake_speak, recognize=lambda samples, rate: next(heard, ""))
    assert set(METRIC_KEYS) <= set(report) and report["n"] == 1
    assert report["reference_wer"] == 0.0 and report["ratio"] is None  # a perfect reference: no ratio
    assert report["setting"] == {"top_k": 2, "prefix": True}
    settings = [(r["top_k"], r["prefix"]) for r in report["table"]]
    assert settings == [(1, True), (2, True), (1, False), (2, False)]
    assert report["table"][0]["wer"] == pytest.approx(0.5)  # "a friend" for 4 words
    assert all(0.0 <= r["eos_rate"] <= 1.0 for r in report["table"])


def test_pairs_are_spoken_once_and_resumed(tmp_path: Path) -> None:
    from training.tts.pairs import build_pairs, read_pairs, spoken_then_encoded

    spoken: list[str] = []

    def speak(text: str) -> tuple[np.ndarray, int]:
        spoken.append(text)
        return fake_speak(text)

    texts = [("Hello there.", "statement"), ("I like tea.", "statement"), ("Go.", "statement"),
             ('"', "answer")]  # a lone quote left by the sentence split: nothing to say
    path = tmp_path / "pairs.jsonl"
    build_pairs(path, texts[:2], "train", spoken_then_encoded(speak, FakeCodec().encode_wav), max_tokens=100)
    with path.open("a") as f:
        f.write('{"text": "torn')  # a kill in the middle of a line
    encoded = spoken_then_encoded(speak, FakeCodec().encode_wav)
    pairs = build_pairs(path, texts, "train", encoded, max_tokens=8)
    assert spoken == ["Hello there.", "I like tea.", "Go."]
    assert [p.text for p in pairs] == ["I like tea.", "Go."]  # "Hello there." has 10 ids > 8
    assert len(read_pairs(path)) == 3


def test_geometry_must_split_the_llm_width() -> None:
    assert DecoderGeometry().idim(576) == 144  # SmolLM2: 4 rows of 144 per vector
    with pytest.raises(ValueError, match="does not split"):
        DecoderGeometry(rows_per_vector=5).idim(576)


def test_a_finished_run_resumes_without_training_again(chain: dict) -> None:
    from training.tts.stage_decoder import train_tts_decoder

    before = load_decoder_result(chain["root"] / "dec")["state"]
    times_before = _column(chain["root"] / "dec", "elapsed_s")
    again = train_tts_decoder(chain["data"], FakeCodec(), chain["llm_dir"], chain["root"] / "dec",
                              _decoder_config(), speak=lambda text: pytest.fail(f"spoke {text!r} again"))
    # no step ran again: a rerun would log new elapsed times (a wall-clock bound here measured the machine)
    assert again["steps"] == 20
    assert _column(chain["root"] / "dec", "elapsed_s") == times_before
    after = load_decoder_result(chain["root"] / "dec")["state"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_kept_decoder_artifact_continues_training(chain: dict, tmp_path: Path) -> None:
    """tools/keep-stage-result.py on a tts-decoder run, then `tts-decoder --init` it: the new run
    starts where the kept one ended (its first loss is below the fresh run's first loss)."""
    import subprocess
    import sys
    from dataclasses import replace

    from training.tts.stage_decoder import train_tts_decoder

    artifact = tmp_path / "decoder.pt"
    subprocess.run([sys.executable, "tools/keep-stage-result.py", str(chain["root"] / "dec"), str(artifact)],
                   check=True, cwd=Path(__file__).resolve().parents[1], capture_output=True)
    kept = load_decoder_result(artifact)
    assert all(v.dtype == torch.float16 for v in kept["state"].values() if v.is_floating_point())
    config = replace(_decoder_config(steps=2), init=artifact)
    train_tts_decoder(chain["data"], FakeCodec(), chain["llm_dir"], tmp_path / "more", config,
                      speak=fake_speak)
    fresh_first = _column(chain["root"] / "dec", "loss")[0]
    continued_first = _column(tmp_path / "more", "loss")[0]
    assert continued_first < 0.8 * fresh_first, (continued_first, fresh_first)


def test_a_decoder_artifact_for_another_codec_is_refused(chain: dict, tmp_path: Path) -> None:
    from dataclasses import replace

    from training.tts.stage_decoder import train_tts_decoder

    class OtherCodec(FakeCodec):
        n_codes = N_CODES // 2

    config = replace(_decoder_config(steps=2), init=chain["root"] / "dec")
    with pytest.raises(ValueError, match="was trained for .* leave out --init"):
        train_tts_decoder(chain["data"], OtherCodec(), chain["llm_dir"], tmp_path / "other", config,
                          speak=fake_speak)


def _kept_pairs_archive(tmp_path: Path, codec_dir: Path) -> tuple[Path, list]:
    """A run's pairs (spoken by `fake_speak`) kept by tools/keep-pairs.py for the fixture codec."""
    import subprocess
    import sys

    from training.tts.pairs import build_pairs, spoken_then_encoded

    texts = [("Hello there.", "statement"), ("I like tea.", "statement")]
    run = tmp_path / "run1"
    made = build_pairs(run / "pairs.jsonl", texts, "train",
                       spoken_then_encoded(fake_speak, FakeCodec().encode_wav),
                       max_tokens=100)
    archive = tmp_path / "pairs.jsonl.gz"
    subprocess.run([sys.executable, "tools/keep-pairs.py", str(run), str(codec_dir), str(archive)],
                   check=True, cwd=Path(__file__).resolve().parents[1], capture_output=True)
    return archive, made


def test_kept_pairs_start_a_run_that_speaks_only_new_texts(tmp_path: Path, tiny_dir: Path) -> None:
    from training.tts.kept_pairs import codec_fingerprint, seed_pairs
    from training.tts.pairs import build_pairs, spoken_then_encoded

    archive, made = _kept_pairs_archive(tmp_path, tiny_dir / "checkpoints/codec")
    fresh = tmp_path / "run2" / "pairs.jsonl"
    assert seed_pairs(fresh, archive, codec_fingerprint(tiny_dir / "checkpoints/codec")) == 2
    spoken: list[str] = []

    def speak(text: str) -> tuple[np.ndarray, int]:
        spoken.append(text)
        return fake_speak(text)

    texts = [("Hello there.", "statement"), ("I like tea.", "statement"), ("Go.", "statement")]
    pairs = build_pairs(fresh, texts, "train", spoken_then_encoded(speak, FakeCodec().encode_wav),
                        max_tokens=100)
    assert spoken == ["Go."]
    assert pairs[:2] == made


def test_kept_pairs_of_another_codec_are_refused(tmp_path: Path, tiny_dir: Path) -> None:
    import shutil

    from training.tts.kept_pairs import codec_fingerprint, seed_pairs

    archive, _ = _kept_pairs_archive(tmp_path, tiny_dir / "checkpoints/codec")
    other = tmp_path / "other-codec"
    shutil.copytree(tiny_dir / "checkpoints/codec", other)
    with (other / "final.pt").open("ab") as f:
        f.write(b"\0")  # a retrained codec: other bytes, other meaning of every id
    with pytest.raises(ValueError, match="another codec"):
        seed_pairs(tmp_path / "run2" / "pairs.jsonl", archive, codec_fingerprint(other))
    assert not (tmp_path / "run2" / "pairs.jsonl").exists()
    with pytest.raises(ValueError, match="not a kept-pairs archive"):
        seed_pairs(tmp_path / "run3" / "pairs.jsonl", tmp_path / "run1" / "pairs.jsonl",
                   codec_fingerprint(other))


def test_extra_banks_add_train_texts_but_never_held_out_ones(tmp_path: Path) -> None:
    """Another seed's bank may hold this bank's valid/test texts (here re-cased): left out."""
    from training.tts.pairs import bank_texts, load_bank, train_texts
    from training.tts.stage_decoder import make_pairs

    main = _bank(tmp_path / "main")
    extra = TextBank(statements={"train": ["rain FALLS!", "A cat sleeps.", "Hello there."]},
                     questions={"train": ["Who is there?", "Is it hot?"]}, nonqueries={},
                     answers={"Who is there?": "A friend is there.", "Is it hot?": "It is noon. It is hot."})
    extra.save(tmp_path / "extra.json")
    own = bank_texts(load_bank(main), "train")
    merged = train_texts(load_bank(main), [extra])
    assert merged[:len(own)] == own
    assert merged[len(own):] == [("A cat sleeps.", "statement"), ("Is it hot?", "question"),
                                 ("It is hot.", "answer")]
    config = replace(_decoder_config(), extra_data=(tmp_path / "extra.json",), valid_limit=0)
    pairs = make_pairs(main, FakeCodec(), tmp_path / "run", config, fake_speak)
    assert [p.text for p in pairs["train"]] == [t for t, _ in merged]


def test_voice_unit_targets_are_refused_for_a_codec_without_units(tmp_path: Path) -> None:
    from training.tts.stage_decoder import make_pairs

    with pytest.raises(ValueError, match="targets must be one of"):
        replace(_decoder_config(), targets="phonemes")
    config = replace(_decoder_config(), targets="voice-units")
    with pytest.raises(ValueError, match="needs a piper-unit codec"):
        make_pairs(_bank(tmp_path / "main"), FakeCodec(), tmp_path / "run", config, fake_speak)
    assert not (tmp_path / "run" / "pairs.jsonl").exists()


def test_prefix_learns_the_ids_its_decoder_learned(chain: dict, tmp_path: Path) -> None:
    from training.tts.stage_prefix import TtsPrefixConfig, train_tts_prefix

    from training.tts.decoder_model import load_decoder_result
    from training.tts.stage_prefix import trained_targets

    assert trained_targets(load_decoder_result(chain["root"] / "dec")) == "speech"
    config = TtsPrefixConfig(loop=_loop(2, 1e-3), targets="voice-units")
    with pytest.raises(ValueError, match="give tts-prefix --targets speech"):
        train_tts_prefix(chain["root"] / "dec", chain["data"], FakeCodec(), chain["llm_dir"],
                         tmp_path / "pre", config)


def _two_sequence_batch() -> DecoderBatch:
    torch.manual_seed(1)
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
    tokens = [torch.randint(0, 32, (5,)), torch.randint(0, 32, (9,))]
    return DecoderBatch(pad([torch.randn(8, 16), torch.randn(12, 16)]), [8, 12],
                        pad(tokens), [5, 9])


def test_own_prediction_inputs_are_the_decoders_greedy_guesses() -> None:
    decoder, batch = _random_decoder(), _two_sequence_batch()
    with torch.no_grad():
        teacher = teacher_forced_logits(decoder, batch)
    guesses = teacher.logits[:, :32].argmax(-1)  # row j of a sequence predicts its id j
    inputs = own_prediction_inputs(decoder, batch, 1.0, np.random.default_rng(0))
    assert inputs[0, :5].tolist() == guesses[:5].tolist()
    assert inputs[1, :9].tolist() == guesses[6:15].tolist()  # after 5 ids + EOS of the first
    assert inputs[0, 5:].tolist() == batch.tokens[0, 5:].tolist()  # padding untouched
    assert not torch.equal(inputs, batch.tokens)  # random weights guess wrong
    assert torch.equal(own_prediction_inputs(decoder, batch, 0.0, np.random.default_rng(0)), batch.tokens)
    half = own_prediction_inputs(decoder, batch, 0.5, np.random.default_rng(0))
    assert torch.equal(half, own_prediction_inputs(decoder, batch, 0.5, np.random.default_rng(0)))  # seeded


def test_second_pass_guesses_from_the_first_pass_inputs() -> None:
    decoder, batch = _random_decoder(), _two_sequence_batch()
    first = own_prediction_inputs(decoder, batch, 1.0, np.random.default_rng(0))
    with torch.no_grad():
        again = teacher_forced_logits(decoder, replace(batch, input_tokens=first))
    guesses = again.logits[:, :32].argmax(-1)
    second = own_prediction_inputs(decoder, batch, 1.0, np.random.default_rng(0), passes=2)
    assert second[0, :5].tolist() == guesses[:5].tolist()
    assert second[1, :9].tolist() == guesses[6:15].tolist()
    assert not torch.equal(second, first)  # guesses on guesses differ from guesses on piper's ids
    assert second[0, 5:].tolist() == batch.tokens[0, 5:].tolist()  # padding untouched
    mixed = own_prediction_inputs(decoder, batch, 0.5, np.random.default_rng(3), passes=3)
    rng = np.random.default_rng(3)
    for b, n_tok in enumerate(batch.token_lengths):
        swap = torch.from_numpy(rng.random(n_tok) < 0.5)  # the same draws as inside
        assert 0 < swap.sum() < n_tok
        assert torch.equal(mixed[b, :n_tok][~swap], batch.tokens[b, :n_tok][~swap])  # piper's ids stay


def test_own_inputs_change_the_inputs_not_the_targets() -> None:
    decoder, batch = _random_decoder(), _two_sequence_batch()
    batch.input_tokens = own_prediction_inputs(decoder, batch, 1.0, np.random.default_rng(0))
    with torch.no_grad():
        fed = teacher_forced_logits(decoder, batch)
        batch_teacher = replace(batch, input_tokens=None)
        teacher = teacher_forced_logits(decoder, batch_teacher)
    assert torch.equal(fed.targets, teacher.targets)
    assert torch.allclose(fed.logits[0], teacher.logits[0])  # SOS predicts before any input id
    assert not torch.allclose(fed.logits, teacher.logits)


def test_training_on_own_inputs_lowers_the_loss() -> None:
    torch.manual_seed(0)
    dims = DecoderDims(idim=16, odim=32, attention_dim=16, num_heads=2, linear_units=32, num_blocks=2,
                       kv_cache_prefix_finetune=False)
    decoder, embed = SpeechDecoder(dims).train(), torch.nn.Embedding(50, 32)
    examples = [DecoderExample([i, i + 1, i + 2], [(3 * i + k) % 32 for k in range(12)]) for i in range(4)]
    step_fn = sampled_batch_step(decoder, examples, embed, seed=0, batch_pairs=4, dropout=0.0,
                                 own_input_rate=0.5)
    optimizer = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(40):
        loss, _ = step_fn(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_own_input_rate_must_be_a_share() -> None:
    with pytest.raises(ValueError, match="from 0 to 1"):
        TtsDecoderConfig(own_input_rate=1.5)
    with pytest.raises(ValueError, match="1 or more"):
        TtsDecoderConfig(own_input_rate=0.5, own_input_passes=0)


def test_decoder_drift_runs_free_as_the_engine_decodes_greedily() -> None:
    """tools/decoder-drift.py's free-running ids are the engine's greedy AR decode (prefill + steps)."""
    import importlib.util

    from quantized_models.speech_decoder import split_llm_rows

    path = Path(__file__).resolve().parents[1] / "tools" / "decoder-drift.py"
    spec = importlib.util.spec_from_file_location("decoder_drift", path)
    assert spec is not None and spec.loader is not None
    drift = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drift)
    decoder, embed = _random_decoder(), torch.nn.Embedding(50, 32)
    example = DecoderExample([3, 4, 5], [1, 2, 3])
    ids = drift.free_running_ids(decoder, example, embed, 12)
    dims, engine_ids = decoder.dims, []
    with torch.no_grad():
        cache = decoder.prefill(split_llm_rows(embed(torch.tensor([3, 4, 5])), 16), None,
                                DecoderCache(max_new_tokens=20))
        token = dims.sos_id
        for _ in range(12):
            logits, cache = decoder.step(token, cache)
            codec_best = int(logits[:dims.odim].argmax())
            if logits[dims.eos_id] > logits[codec_best]:
                break
            engine_ids.append(token := codec_best)
    assert ids == engine_ids and len(ids) > 0
