"""Write a trained speech input as a model directory in the released layout (spec §9).

`audiollm/train.yaml`, `audiollm/global_cmvn` and `audiollm/final.pt` come from a stage-2 or
stage-3 `result.pt`. The speech output (decoder, codec) is trained in a later part of the
project; until then it is copied from `speech_from` when given, otherwise seeded random
placeholders of the right shapes are written (so the engine loads the directory, but its
speech is noise) and `TRAINING.json` says so.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from quantized_models.random_model import RandomModelSpec, _write_codec, _write_decoder
from training.common import save_atomic
from training.features import write_cmvn
from training.model_config import INFO_NAME, load_result
from training.ctc_head import CTC_HEAD_NAME, CtcHeadEnsemble, load_ctc_head, save_ctc_head
from training.transcribe import CTC_WEIGHT_KEY, DEFAULT_CTC_WEIGHT, NO_SPEECH_END_PROBABILITY, NO_SPEECH_KEY

logger = logging.getLogger(__name__)

PLACEHOLDER_DECODER_ROWS = 4  # decoder rows per LLM vector, as in the release (3584 / 896)
# The released codec's rates and token interface, at a width that keeps the noise placeholder small
# instead of 62 MB (the model directory is meant to be committed)
PLACEHOLDER_CODEC = {"upsample_initial_channel": 256, "resblock_kernel_sizes": [3],
                     "resblock_dilation_sizes": [[1, 3, 5]]}


def _placeholder_speech(model_dir: Path, llm_hidden: int, seed: int) -> None:
    idim = llm_hidden // PLACEHOLDER_DECODER_ROWS
    spec = RandomModelSpec(
        name="placeholder", enc_dim=1, enc_heads=1, enc_ffn=1, enc_blocks=1, llm_hidden=llm_hidden,
        llm_layers=1, llm_heads=1, llm_kv_heads=1, llm_ffn=1, llm_vocab=1, decoder_idim=idim,
        decoder_heads=4 if idim % 4 == 0 else 1, decoder_ffn=2 * idim, decoder_blocks=2,
    )
    gen = torch.Generator().manual_seed(seed)
    _write_decoder(model_dir / "decoder", spec, gen)
    _write_codec(model_dir / "codec", spec, gen, PLACEHOLDER_CODEC)


def export_model_dir(result_path: Path, out: Path, speech_from: Path | None = None, seed: int = 0,
                     ctc_head: Path | Sequence[Path] | None = None) -> Path:
    """Write `out` (released layout) from a stage result; returns `out`.

    `result_path` may also be a model directory holding only `audiollm/` (how the trained speech
    input is committed): it is copied and completed with the speech output, its CTC head too.
    `ctc_head` (a `train ctc-head` file) is copied beside the layout as `ctc_head.pt`, for
    `transcribe` (the engine never reads it), with its weight in `TRAINING.json`; several files
    are written there as one ensemble (`ctc_head.CtcHeadEnsemble`).

    Raises:
        ValueError: the result is from stage 1 (no adapter or LLM-side modules yet).
    """
    source = Path(result_path)
    heads = [Path(ctc_head)] if isinstance(ctc_head, (str, Path)) else list(ctc_head or [])
    loaded = [load_ctc_head(head) for head in heads]  # refuse a broken file before anything is written
    for sub in ("audiollm", "decoder", "codec"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if (source / "audiollm" / "final.pt").is_file():
        if source.resolve() != out.resolve():
            shutil.copytree(source / "audiollm", out / "audiollm", dirs_exist_ok=True)
        info_file = source / INFO_NAME
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        if not heads and (source / CTC_HEAD_NAME).is_file():
            heads = [source / CTC_HEAD_NAME]
        cfg = yaml.safe_load((out / "audiollm" / "train.yaml").read_text())
    else:
        result = load_result(source)
        cfg = result["train_yaml"]
        if result["stage"] < 2 or "model_conf" not in cfg:
            raise ValueError(f"{source}: a stage-{result['stage']} result has no adapter; run stage 2 first")
        (out / "audiollm" / "train.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
        write_cmvn(result["cmvn"], out / "audiollm" / "global_cmvn")
        save_atomic(result["state"], out / "audiollm" / "final.pt")
        info = {"stage": result["stage"], "summary": result["extra"].get("summary", {})}
    info.setdefault(NO_SPEECH_KEY, NO_SPEECH_END_PROBABILITY)  # chosen for this package's models
    if len(heads) > 1:
        save_ctc_head(CtcHeadEnsemble(loaded), out / CTC_HEAD_NAME, {"heads": [str(h) for h in heads]})
    elif heads and heads[0].resolve() != (out / CTC_HEAD_NAME).resolve():
        shutil.copy(heads[0], out / CTC_HEAD_NAME)
    if heads:
        info.setdefault(CTC_WEIGHT_KEY, DEFAULT_CTC_WEIGHT)
    info["speech_output"] = _speech_output(out, int(cfg["model_conf"]["llm_embed_dim"]), speech_from, seed)
    (out / INFO_NAME).write_text(json.dumps(info, indent=1))
    return out


def _speech_output(out: Path, llm_hidden: int, speech_from: Path | None, seed: int) -> str:
    """Fill `decoder/` and `codec/`; returns how, for TRAINING.json."""
    if speech_from is not None:
        for sub in ("decoder", "codec"):
            shutil.copytree(speech_from / sub, out / sub, dirs_exist_ok=True)
        if (speech_from / "server.json").is_file():
            shutil.copy(speech_from / "server.json", out / "server.json")
        return f"copied from {speech_from}"
    _placeholder_speech(out, llm_hidden, seed)
    speech = "random placeholder (speech output is not trained yet); answers are spoken as noise"
    logger.warning("%s: decoder and codec are %s", out, speech)
    return speech
