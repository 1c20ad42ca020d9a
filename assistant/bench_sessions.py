"""`freeze-omni bench-sessions`: how many sessions one machine serves in real time, per executor count.

Each trial runs N simulated clients on the real scheduler (in process, no sockets): client i
starts `stagger_s` after client i-1, speaks the fixture's question in real time (one 160 ms chunk
per chunk period), ends its turn, and "plays" the answer at 24 kHz from the first audio it gets,
with generation allowed `client_lead_s` ahead. A session is served in real time when its answer
never ran dry (no underrun: `voice_session.UNDERRUN_GAP_S`) and listen steps waited less than one
chunk period (p95 over the trial).
"""
from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from assistant.bench import device_description, write_section
from assistant.conversation import Conversation
from assistant.engine import Engine, EngineOptions
from assistant.scheduler import Scheduler, SchedulerSettings
from assistant.voice_session import TurnEndMode, VoiceSession, VoiceSessionSettings
from quantized_models.frontend import CHUNK_SAMPLES
from quantized_models.sampling import TextSamplingConfig

logger = logging.getLogger(__name__)

CHUNK_PERIOD_S = 0.16


@dataclass(frozen=True)
class SessionBenchSizes:
    executors: tuple[int, ...] = (1, 2)
    sessions: tuple[int, ...] = (1, 2, 4, 8, 16)
    question_chunks: int = 8
    stagger_s: float = 0.32
    """Delay between two clients' starts (seconds)."""
    client_lead_s: float = 1.0
    max_new_tokens: int = 12
    max_speech_tokens: int = 60
    trial_timeout_s: float = 120.0
    repeats: int = 2
    """Each trial is run this often and the best run is kept (a shared machine has load spikes)."""


@dataclass
class Trial:
    executors: int
    sessions: int
    realtime: int
    """Sessions whose answer never ran dry (counted only when listening kept up)."""
    listen_p95_ms: float
    listen_max_ms: float
    first_audio_ms: float
    """Median time from the client's turn end to the first answer audio."""
    underruns: int
    finished: int
    wall_s: float


class _Client:
    """Records when the answer's events arrive."""

    def __init__(self) -> None:
        self.turn_end_at: float | None = None
        self.first_audio_at: float | None = None
        self.done = threading.Event()

    def __call__(self, kind: str, data: dict, payload: bytes) -> None:
        if kind == "audio-chunk" and self.first_audio_at is None:
            self.first_audio_at = time.monotonic()
        elif kind == "answer-done":
            self.done.set()


def _question(n_chunks: int) -> list[np.ndarray]:
    """Deterministic speech-like noise (the bench needs load, not meaning)."""
    gen = np.random.default_rng(0)
    return [(0.1 * gen.standard_normal(CHUNK_SAMPLES)).astype(np.float32) for _ in range(n_chunks)]


def run_trial(engine: Engine, executors: int, n_sessions: int, sizes: SessionBenchSizes) -> Trial:
    sched = Scheduler(SchedulerSettings(executors=executors, max_sessions=n_sessions, idle_poll_s=0.005))
    settings = VoiceSessionSettings(turn_end=TurnEndMode.CLIENT, max_lead_s=sizes.client_lead_s)
    clients = [_Client() for _ in range(n_sessions)]
    sessions = [VoiceSession(f"b{i}", Conversation(engine, seed=i), clients[i], settings, wake=sched.notify)
                for i in range(n_sessions)]
    for s in sessions:
        sched.add(s)
    question = _question(sizes.question_chunks)
    # (time offset, session index, chunk index or -1 for the turn end)
    plan = sorted((i * sizes.stagger_s + k * CHUNK_PERIOD_S, i, k)
                  for i in range(n_sessions) for k in range(len(question) + 1))
    start = time.monotonic()
    sched.start()
    try:
        for offset, i, k in plan:
            delay = start + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if k < len(question):
                sessions[i].push_audio(question[k])
            else:
                clients[i].turn_end_at = time.monotonic()
                sessions[i].push_turn_end()
        deadline = start + sizes.trial_timeout_s
        for c in clients:
            c.done.wait(max(0.0, deadline - time.monotonic()))
    finally:
        sched.stop()
    waits = sorted(sched.stats.listen_waits_s) or [0.0]
    p95 = waits[min(len(waits) - 1, int(0.95 * len(waits)))]
    finished = [i for i, c in enumerate(clients) if c.done.is_set()]
    underruns = sum(sessions[i].underruns for i in finished)
    listen_ok = p95 < CHUNK_PERIOD_S
    realtime = sum(1 for i in finished if sessions[i].underruns == 0) if listen_ok else 0
    firsts = [1000 * (c.first_audio_at - c.turn_end_at) for c in clients
              if c.first_audio_at is not None and c.turn_end_at is not None]
    return Trial(executors, n_sessions, realtime, 1000 * p95, 1000 * waits[-1],
                 statistics.median(firsts) if firsts else float("nan"), underruns, len(finished),
                 time.monotonic() - start)


def run_bench_sessions(models, sizes: SessionBenchSizes, model_label: str,
                       progress=None, note: str = "") -> tuple[str, list[Trial]]:
    engine = Engine(models, EngineOptions(text_sampling=TextSamplingConfig(0.8, 20, 0.8),
                                          max_new_tokens=sizes.max_new_tokens,
                                          max_speech_tokens=sizes.max_speech_tokens))
    trials = []
    for executors in sizes.executors:
        for n in sizes.sessions:
            if progress is not None:
                progress(f"{executors} executors, {n} sessions")
            runs = [run_trial(engine, executors, n, sizes) for _ in range(max(1, sizes.repeats))]
            trial = max(runs, key=lambda t: (t.realtime, -t.underruns, -t.listen_p95_ms))
            logger.info("%s", trial)
            trials.append(trial)
            if trial.realtime == 0 and n > 1:
                break  # nothing keeps up any more: more sessions only take longer
    return render(trials, models.device, model_label, sizes, note), trials


def render(trials: list[Trial], device: torch.device, model_label: str, sizes: SessionBenchSizes,
           note: str = "") -> str:
    lines = ["### Sessions served in real time vs. executors", "",
             "| executors | sessions | served in real time | listen wait p95 / max (ms) | "
             "turn end → first audio, median (ms) | underruns | answered | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for t in trials:
        lines.append(f"| {t.executors} | {t.sessions} | {t.realtime} "
                     f"| {t.listen_p95_ms:.0f} / {t.listen_max_ms:.0f} | {t.first_audio_ms:.0f} "
                     f"| {t.underruns} | {t.finished} | {t.wall_s:.1f} |")
    best: dict[int, int] = {}
    broken: set[int] = set()
    for t in sorted(trials, key=lambda t: (t.executors, t.sessions)):
        if t.realtime < t.sessions:
            broken.add(t.executors)  # the first miss counts, whatever larger trials did
        elif t.executors not in broken:
            best[t.executors] = t.sessions
    summary = ", ".join(f"{e} executor{'s' if e > 1 else ''}: {best.get(e, 0)}" for e in sizes.executors)
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"
    lines += ["", f"Sessions all served in real time, up to the first trial that missed — {summary}.", "",
              f"Model: {model_label}. Device: {device_description(device)}; torch {torch.__version__}; "
              f"load average {load} when the run ended. Each client speaks {sizes.question_chunks} chunks "
              f"in real time, clients start {sizes.stagger_s:g} s apart, answers are capped at "
              f"{sizes.max_new_tokens} text tokens and {sizes.max_speech_tokens} codec tokens per segment, "
              f"generation runs at most {sizes.client_lead_s:g} s ahead of playback. Real time: the answer "
              f"never ran dry and listen steps waited under 160 ms (p95). Best of {sizes.repeats} runs "
              f"per row; a row with 0 ends the sweep." + (f" {note}" if note else ""), ""]
    return "\n".join(lines)


def section_key(model_dir: Path, random_model: str | None, device: torch.device) -> str:
    name = random_model or model_dir.resolve().parent.name.replace("freeze-omni-", "")
    return f"sessions-{name}-{device.type}"


def run_from_args(args) -> tuple[str, str]:
    """`freeze-omni bench-sessions` (arguments from assistant.cli); returns the table and its section key."""
    import dataclasses

    from assistant.bench import _resolve_model
    from quantized_models.model_dir import load_models

    torch.set_num_threads(args.threads)
    device, dtype = args.device_obj, args.dtype_obj
    model_dir, llm_dir, label = _resolve_model(args)
    if not args.random_model:
        label = model_dir.resolve().parent.name  # the model's folder, not this machine's path
    models = load_models(model_dir, llm_dir, device, dtype)
    sizes = dataclasses.replace(SessionBenchSizes(), executors=args.executors, sessions=args.sessions,
                                repeats=args.repeats)
    text, _ = run_bench_sessions(models, sizes, label, progress=lambda step: logger.info("trial: %s", step),
                                 note=getattr(args, "note", ""))
    key = section_key(model_dir, args.random_model, device)
    write_section(args.out, key, text)
    return text, key
