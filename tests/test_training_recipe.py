"""tools/train-speech-input.sh's order of steps, with a stand-in `freeze-omni` that only records its
arguments and writes the file each step's resume check looks for (no training, under a second)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORDER = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$CALLS"
out=""; prev=""
for a in "$@"; do [ "$prev" = "--out" ] && out=$a; prev=$a; done
if [ "$2" = data ]; then mkdir -p "$out" && touch "$out/manifest.jsonl"
elif [ -n "$out" ]; then mkdir -p "$out" && touch "$out/result.pt"; fi
echo '{}'
"""


def run_recipe(tmp_path: Path, **env: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "freeze-omni").write_text(RECORDER)
    (bin_dir / "freeze-omni").chmod(0o755)
    calls = tmp_path / "calls"
    calls.unlink(missing_ok=True)
    environment = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls)} | env
    subprocess.run(["bash", str(REPO / "tools/train-speech-input.sh"), str(tmp_path / "work dir")],
                   check=True, env=environment, capture_output=True)
    return calls.read_text().splitlines()


def test_the_recipe_averages_three_stage3_continuations_and_refits_the_average(tmp_path: Path) -> None:
    calls = run_recipe(tmp_path)
    work = tmp_path / "work dir"
    continuations = [c for c in calls if c.startswith("train stage3") and "stage3-cont" in c]
    assert len(continuations) == 3 and all(f"--init {work}/state-head " in c for c in continuations)
    assert [c.count("data-seed") for c in continuations] == [0, 1, 3]
    average = calls.index(next(c for c in calls if c.startswith("train average")))
    assert all(f"{work}/stage3-cont{i}" in calls[average] for i in range(3))
    head, ctcs, export = calls[average + 1], calls[average + 2:average + 6], calls[average + 6]
    assert head.startswith("train state-head") and f"--init {work}/stage3-average" in head
    assert f"--extra-valid {work}/data" in head and f"--data {work}/data-unheard" in head
    for ctc in ctcs:
        assert ctc.startswith(f"train ctc-head --data {work}/data --init {work}/state-head-average")
        assert all(f"{work}/data-seed{seed}" in ctc for seed in (1, 2, 3))
    assert ["--speed-perturb 0.9 1.1" in c for c in ctcs] == [False, True, False, True]
    assert ["--dropout 0.3" in c for c in ctcs] == [False, False, True, True]
    runs = ["ctc-head", "ctc-head-speed", "ctc-head-dropout", "ctc-head-both"]
    assert [f"--out {work}/{run} " in c for c, run in zip(ctcs, runs)] == [True] * 4
    assert export == (f"train export --init {work}/state-head-average --out {work}/model --ctc-head "
                      + " ".join(f"{work}/{run}/ctc_head.pt" for run in runs))
    assert "--limit" not in calls[-1]  # eval states on every test turn
    asr = next(c for c in calls if c.startswith("eval asr"))
    assert "--limit" not in asr  # and eval asr on every test utterance


def test_the_recipe_without_the_average_exports_the_first_refit(tmp_path: Path) -> None:
    calls = run_recipe(tmp_path, STAGE3_AVERAGE="0", ASR_LIMIT="120")
    assert "--limit 120 " in next(c for c in calls if c.startswith("eval asr"))
    assert not any(c.startswith("train average") for c in calls)
    export = next(c for c in calls if c.startswith("train export"))
    work = tmp_path / "work dir"
    assert export.startswith(f"train export --init {work}/state-head --out {work}/model "
                             f"--ctc-head {work}/ctc-head/ctc_head.pt ")


def test_the_recipe_without_the_ctc_head_exports_without_it(tmp_path: Path) -> None:
    calls = run_recipe(tmp_path, CTC_HEAD="0")
    assert not any(c.startswith("train ctc-head") for c in calls)
    assert f"train export --init {tmp_path}/work dir/state-head-average --out {tmp_path}/work dir/model" in calls
