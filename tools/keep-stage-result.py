"""Keep a stage result (speech input, or the tts-decoder) as a small artifact to continue from later.

    python tools/keep-stage-result.py RUN_DIR_OR_RESULT_PT OUT.pt

Weights become float16 (half the size); CMVN statistics and BatchNorm running statistics stay
float32, and stage 1's CTC head is dropped. `freeze-omni train stage2|stage3 --init OUT.pt`
(or `train tts-decoder --init OUT.pt` for a speech-decoder result) loads it like any result.pt
(the modules are float32; loading converts).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

KEEP_FLOAT32 = ("global_cmvn", "running_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="stage run directory or its result.pt")
    parser.add_argument("out", type=Path, help="artifact to write")
    args = parser.parse_args()
    source = args.source / "result.pt" if args.source.is_dir() else args.source
    result = torch.load(source, map_location="cpu", weights_only=False)
    result["state"] = {
        key: value.half() if value.is_floating_point() and not any(s in key for s in KEEP_FLOAT32) else value
        for key, value in result["state"].items()
    }
    result["extra"] = {key: value for key, value in result.get("extra", {}).items() if key != "ctc_head"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
