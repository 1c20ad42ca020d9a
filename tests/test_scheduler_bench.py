"""`freeze-omni bench-sessions` on the tiny model: a short sweep, its table and its own section."""
from __future__ import annotations

import dataclasses

import torch

from assistant.bench_sessions import SessionBenchSizes, render, run_trial
from assistant.cli import main
from tests.server_harness import tiny_engine

SMALL = SessionBenchSizes(question_chunks=3, stagger_s=0.1, max_new_tokens=4, max_speech_tokens=20)


def test_a_trial_answers_every_session_and_counts_real_time_ones(tiny_dir):
    engine = tiny_engine(tiny_dir)
    trial = run_trial(engine, executors=2, n_sessions=3, sizes=SMALL)
    assert trial.finished == 3 and 0 <= trial.realtime <= 3
    assert trial.listen_max_ms >= trial.listen_p95_ms >= 0
    assert trial.first_audio_ms > 0
    table = render([trial], torch.device("cpu"), "tiny", dataclasses.replace(SMALL, executors=(2,)))
    assert "| 2 | 3 | " in table
    assert "Sessions all served in real time, up to the first trial that missed — 2 executors:" in table


def test_command_writes_its_own_section_and_keeps_the_others(tiny_dir, tmp_path, capsys):
    out = tmp_path / "BENCH.md"
    out.write_text("# Benchmarks\n\n<!-- bench:other:begin -->\nkeep me\n<!-- bench:other:end -->\n")
    status = main(["bench-sessions", "--model-dir", str(tiny_dir / "checkpoints"), "--llm-dir",
                   str(tiny_dir / "llm"), "--device", "cpu", "--executors", "1", "--sessions", "1",
                   "--repeats", "1", "--out", str(out)])
    assert status == 0
    text = out.read_text()
    assert "keep me" in text
    assert "<!-- bench:sessions-tiny-cpu:begin -->" in text and "| 1 | 1 |" in text
    assert "wrote section 'sessions-tiny-cpu'" in capsys.readouterr().out


def test_the_summary_stops_at_the_first_trial_that_missed_real_time():
    from assistant.bench_sessions import Trial

    trials = [Trial(1, n, rt, 1.0, 2.0, 100.0, 0, n, 1.0) for n, rt in ((1, 1), (2, 1), (4, 4))]
    text = render(trials, torch.device("cpu"), "tiny", dataclasses.replace(SMALL, executors=(1,)))
    assert "— 1 executor: 1." in text
