"""Keep a tts-decoder run's speech pairs (text + codec ids) to start a later run with.

    python tools/keep-pairs.py RUN_DIR_OR_PAIRS_JSONL CODEC_DIR OUT.jsonl.gz [--targets voice-units]

`freeze-omni train tts-decoder --pairs-from OUT.jsonl.gz --codec-dir CODEC_DIR ...` (or
`PAIRS_FROM=... bash tools/train-speech-output.sh ...`) then speaks only the texts the archive
lacks. The archive names CODEC_DIR's codec and the run's `--targets`; another codec, or ids
from the other targets, are refused.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from training.tts.kept_pairs import codec_fingerprint, keep_pairs
from training.tts.pairs import TARGETS
from training.tts.stage_decoder import PAIRS_NAME


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="tts-decoder run directory or its pairs.jsonl")
    parser.add_argument("codec_dir", type=Path, help="the codec that encoded the pairs")
    parser.add_argument("out", type=Path, help="archive to write (.jsonl.gz)")
    parser.add_argument("--targets", choices=TARGETS, default="speech",
                        help="the run's --targets (default speech)")
    args = parser.parse_args()
    source = args.source / PAIRS_NAME if args.source.is_dir() else args.source
    count = keep_pairs(source, args.out, codec_fingerprint(args.codec_dir, args.targets))
    print(f"wrote {args.out}: {count} pairs ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
