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
from pathlib import Path

import torch
import yaml

from quantized_models.random_model import RandomModelSpec, _write_codec, _write_decoder
from training.common import save_atomic
from training.features import write_cmvn
from training.model_config import load_result

logger = logging.getLogger(__name__)

INFO_NAME = "TRAINING.json"
PLACEHOLDER_DECODER_ROWS = 4  # decoder rows per LLM vector, as in the release (3584 / 896)


def _placeholder_speech(model_dir: Path, llm_hidden: int, seed: int) -> None:
    idim = llm_hidden // PLACEHOLDER_DECODER_ROWS
    spec = RandomModelSpec(
        name="placeholder", enc_dim=1, enc_heads=1, enc_ffn=1, enc_blocks=1, llm_hidden=llm_hidden,
        llm_layers=1, llm_heads=1, llm_kv_heads=1, llm_ffn=1, llm_vocab=1, decoder_idim=idim,
        decoder_heads=4 if idim % 4 == 0 else 1, decoder_ffn=2 * idim, decoder_blocks=2,
    )
    gen = torch.Generator().manual_seed(seed)
    _write_decoder(model_dir / "decoder", spec, gen)
    _write_codec(model_dir / "codec", spec, gen)


def export_model_dir(result_path: Path, out: Path, speech_from: Path | None = None, seed: int = 0) -> Path:
    """Write `out` (released layout) from a stage result; returns `out`.

    Raises:
        ValueError: the result is from stage 1 (no adapter or LLM-side modules yet).
    """
    result = load_result(result_path)
    cfg = result["train_yaml"]
    if result["stage"] < 2 or "model_conf" not in cfg:
        raise ValueError(f"{result_path}: a stage-{result['stage']} result has no adapter; run stage 2 first")
    for sub in ("audiollm", "decoder", "codec"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "audiollm" / "train.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    write_cmvn(result["cmvn"], out / "audiollm" / "global_cmvn")
    save_atomic(result["state"], out / "audiollm" / "final.pt")
    llm_hidden = int(cfg["model_conf"]["llm_embed_dim"])
    if speech_from is not None:
        for sub in ("decoder", "codec"):
            shutil.copytree(speech_from / sub, out / sub, dirs_exist_ok=True)
        if (speech_from / "server.json").is_file():
            shutil.copy(speech_from / "server.json", out / "server.json")
        speech = f"copied from {speech_from}"
    else:
        _placeholder_speech(out, llm_hidden, seed)
        speech = "random placeholder (speech output is not trained yet); answers are spoken as noise"
        logger.warning("%s: decoder and codec are %s", out, speech)
    info = {"stage": result["stage"], "speech_output": speech, "summary": result["extra"].get("summary", {})}
    (out / INFO_NAME).write_text(json.dumps(info, indent=1))
    return out
