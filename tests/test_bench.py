"""`freeze-omni bench` writes comparable rows into the benchmark document."""
from __future__ import annotations

import re

from assistant.bench import write_section
from assistant.cli import main


def test_bench_writes_a_table_section(tiny_dir, tmp_path, capsys):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nIntro kept.\n")
    args = ["bench", "--model-dir", str(tiny_dir / "checkpoints"), "--llm-dir", str(tiny_dir / "llm"),
            "--backends", "torch", "--quantization", "none", "--chunks", "3", "--repeats", "1",
            "--device", "cpu", "--dtype", "float32", "--out", str(out), "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    body = out.read_text()
    assert body.startswith("# Benchmarks\n\nIntro kept.")
    steps = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    assert len(steps) == 8, steps
    for row in steps:
        value = float(re.findall(r"\| ([0-9.]+)", row)[0])
        assert value > 0, row
    assert main(args) == 0  # a second run replaces its section instead of appending
    assert out.read_text().count("<!-- bench:freeze-omni-tiny-cpu:begin -->") == 1
    assert "torch ms" in capsys.readouterr().out


def test_write_section_keeps_other_sections(tmp_path):
    doc = tmp_path / "doc.md"
    write_section(doc, "a", "A1\n")
    write_section(doc, "b", "B1\n")
    write_section(doc, "a", "A2\n")
    text = doc.read_text()
    assert "A2" in text and "B1" in text and "A1" not in text
    assert text.index("A2") < text.index("B1")
