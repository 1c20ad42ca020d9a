"""Write a trained speech decoder as `decoder/` of a model directory (released layout, spec §9).

`decoder/model.json` is `[idim, odim, args]` and `decoder/final.pt` is `{"model": state}` with the
strict key names of spec §9.4, so `quantized_models.model_dir.load_models` loads it unchanged.
The codec folder is copied next to it. A model directory without a speech input (`audiollm/`)
gets a small seeded placeholder for the LLM's width, so `say` and `eval tts` can load it; its
speech input is random until `freeze-omni train export` writes a trained one there.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
import yaml

from quantized_models.random_model import RandomModelSpec, _write_audiollm
from training.common import save_atomic
from training.model_config import DEFAULT_ROLE, INFO_NAME, chat_template
from training.tts.decoder_model import load_decoder_result

logger = logging.getLogger(__name__)

PLACEHOLDER_SPEECH_INPUT = "random placeholder speech input (only the speech output is trained here)"


def _placeholder_audiollm(folder: Path, llm_hidden: int, seed: int) -> None:
    spec = RandomModelSpec(name="placeholder", enc_dim=32, enc_heads=2, enc_ffn=64, enc_blocks=1,
                           llm_hidden=llm_hidden, llm_layers=1, llm_heads=1, llm_kv_heads=1, llm_ffn=1,
                           llm_vocab=1, decoder_idim=1, decoder_heads=1, decoder_ffn=1, decoder_blocks=1)
    folder.mkdir(parents=True, exist_ok=True)
    _write_audiollm(folder, spec, torch.Generator().manual_seed(seed))
    cfg = yaml.safe_load((folder / "train.yaml").read_text())
    cfg["model_conf"]["chat_template"] = chat_template(DEFAULT_ROLE)
    (folder / "train.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))


def export_decoder(init: Path, out: Path, codec_dir: Path | None = None, seed: int = 0) -> Path:
    """Write `out/decoder/` from a tts-decoder/tts-prefix result; returns `out`.

    Args:
        init: run directory (or result.pt) of tts-decoder or tts-prefix.
        out: model directory (created; an existing `audiollm/` is kept).
        codec_dir: codec folder to copy to `out/codec/` (skipped when it already is that folder).
    """
    result = load_decoder_result(init)
    layout = result["layout"]
    decoder_dir = out / "decoder"
    decoder_dir.mkdir(parents=True, exist_ok=True)
    (decoder_dir / "model.json").write_text(json.dumps(layout, indent=1))
    save_atomic({"model": result["state"]}, decoder_dir / "final.pt")
    if codec_dir is not None and Path(codec_dir).resolve() != (out / "codec").resolve():
        if not (Path(codec_dir) / "model.json").is_file():
            raise FileNotFoundError(f"{codec_dir} is not a codec folder (no model.json)")
        shutil.copytree(codec_dir, out / "codec", dirs_exist_ok=True)
    placeholder = not (out / "audiollm" / "final.pt").is_file()
    if placeholder:
        llm_hidden = int(layout[2].get("trained_for_llm_hidden", layout[0] * 4))
        _placeholder_audiollm(out / "audiollm", llm_hidden, seed)
        logger.warning("%s: %s", out, PLACEHOLDER_SPEECH_INPUT)
    info_path = out / INFO_NAME
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info["speech_output"] = {"decoder": result["stage"], "summary": result["extra"].get("summary", {}),
                             "codec": str(codec_dir) if codec_dir else "kept"}
    if placeholder:
        info["speech_input"] = PLACEHOLDER_SPEECH_INPUT
    info_path.write_text(json.dumps(info, indent=1))
    return out
