"""Stage tts-prefix: the NAR prefix decoder on the LLM's own answers (spec §7.3, §11.3 step 3).

Every train question of part 1 with an LLM answer is teacher-forced through the frozen LLM
(`training.tts.teacher`); the answer is cut into the engine's segments, and each segment gives
one example: its normalised text (decoder input), its hidden states (prefix) and the codec ids
of piper speaking it (target). Only `layers_prefix` is trained; embedding, pre-net, NAR/AR
layers, norm and output stay as tts-decoder left them (checked at the end).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantized_models.llm import ChatLayout
from training.common import LoopConfig, save_atomic, train_loop
from training.llm_sequence import load_frozen_llm
from training.model_config import DEFAULT_ROLE, chat_template
from training.tts.decoder_model import (
    RESULT_NAME,
    DecoderExample,
    decoder_from_result,
    load_decoder_result,
    save_decoder_result,
)
from training.tts.pairs import (PiperNative, Speak, TokensOf, build_pairs, check_targets, load_bank,
                                spread_texts, tokens_of_targets)
from training.tts.stage_decoder import (
    CodecEncoderLike,
    check_own_input_rate,
    held_out_loss,
    sampled_batch_step,
    text_ids,
)
from training.tts.teacher import teacher_forced_segments

logger = logging.getLogger(__name__)

SEGMENTS_NAME = "segments.pt"
PAIRS_NAME = "answer_pairs.jsonl"


@dataclass(frozen=True)
class TtsPrefixConfig:
    """tts-prefix settings."""

    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=1000, lr=5e-4, warmup_steps=50))
    batch_pairs: int = 16
    max_codec_tokens: int = 400
    dropout: float = 0.1
    train_limit: int | None = None
    """Use only N train questions (evenly spread)."""
    valid_limit: int = 20
    role: str = DEFAULT_ROLE
    """System role of the teacher-forced dialogue (the one the speech input is trained with)."""
    speech_cache: Path | None = None
    """Where piper's renderings are kept (default: `<run dir>/speech`)."""
    init_from_layers: bool = True
    """Start prefix layer i as a copy of NAR/AR layer i (its K/V then already live in the space
    that layer reads), instead of the untrained initialisation tts-decoder left."""
    own_input_rate: float = 0.0
    """As `TtsDecoderConfig.own_input_rate`: the prefix layers learn on the decoder's own ids too."""
    own_input_passes: int = 1
    """As `TtsDecoderConfig.own_input_passes`."""
    targets: str = "speech"
    """As `TtsDecoderConfig.targets`; must be the tts-decoder run's (`trained_targets`; checked)."""

    def __post_init__(self) -> None:
        check_own_input_rate(self.own_input_rate, self.own_input_passes)
        check_targets(self.targets)


def answer_segments(causal_lm, tokenizer, questions: list[str], answers: dict[str, str], role: str
                    ) -> list[dict[str, Any]]:
    """[{text, hidden [k, H]}] of every segment of every answer, in order."""
    layout = ChatLayout.from_template(chat_template(role), tokenizer)
    out = []
    for question in questions:
        for segment in teacher_forced_segments(causal_lm, tokenizer, layout, answers[question], question):
            if segment.text.strip() and text_ids(tokenizer, segment.text):
                out.append({"text": segment.text, "hidden": torch.stack(segment.hidden_states).float().cpu()})
    return out


def _split_segments(run_dir: Path, causal_lm, tokenizer, data: Path, config: TtsPrefixConfig) -> dict:
    """Segments by split, computed once into `run_dir/segments.pt`."""
    path = run_dir / SEGMENTS_NAME
    wanted = {"train_limit": config.train_limit, "valid_limit": config.valid_limit, "role": config.role}
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=False)
        if cached.get("settings") == wanted:
            return cached
        logger.info("%s was made with other settings; computing the segments again", path)
    bank = load_bank(data)
    out: dict[str, Any] = {"settings": wanted}
    for split, limit in (("train", config.train_limit), ("valid", config.valid_limit)):
        asked = [(q, "question") for q in bank.questions.get(split, []) if bank.answers.get(q)]
        questions = [q for q, _ in spread_texts(asked, limit)] if limit != 0 else []
        out[split] = answer_segments(causal_lm, tokenizer, questions, bank.answers, config.role)
        logger.info("tts-prefix: %d %s segments from %d answers", len(out[split]), split, len(questions))
    save_atomic(out, path)
    return out


def _examples(run_dir: Path, segments: list[dict], split: str, tokenizer, tokens_of: TokensOf,
              max_tokens: int) -> list[DecoderExample]:
    texts = [(s["text"].strip(), "answer_segment") for s in segments]
    pairs = {p.text: p for p in build_pairs(run_dir / PAIRS_NAME, texts, split, tokens_of, max_tokens)}
    return [DecoderExample(text_ids(tokenizer, s["text"]), pairs[s["text"].strip()].tokens, s["hidden"])
            for s in segments if s["text"].strip() in pairs]


def trained_targets(result: dict) -> str:
    """The `targets` a tts-decoder (or tts-prefix) result was trained on ("speech" before they existed)."""
    return result.get("extra", {}).get("config", {}).get("targets", "speech")


def train_tts_prefix(init: Path, data: Path, codec: CodecEncoderLike, llm_dir: Path, run_dir: Path,
                     config: TtsPrefixConfig, speak: Speak | None = None) -> dict:
    """Train `layers_prefix` of a tts-decoder result; writes `run_dir/result.pt`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = load_decoder_result(init)
    trained_on = trained_targets(previous)
    if trained_on != config.targets:
        raise ValueError(f"{init} was trained on --targets {trained_on} ids, and its prefix must learn the same "
                         f"ids: give tts-prefix --targets {trained_on}, not {config.targets}")
    decoder = decoder_from_result(previous)
    if decoder.dims.odim != codec.n_codes:
        raise ValueError(f"{init} predicts {decoder.dims.odim} codec ids but the codec has {codec.n_codes}")
    causal_lm, tokenizer = load_frozen_llm(llm_dir)
    causal_lm.to(config.loop.torch_device)
    decoder.to(config.loop.torch_device)
    embed = causal_lm.get_input_embeddings()
    segments = _split_segments(run_dir, causal_lm, tokenizer, data, config)
    speak = speak or PiperNative(cache_dir=config.speech_cache or run_dir / "speech")
    tokens_of = tokens_of_targets(config.targets, codec, speak)
    train, valid = (_examples(run_dir, segments[s], s, tokenizer, tokens_of, config.max_codec_tokens)
                    for s in ("train", "valid"))
    if not train:
        raise ValueError(f"no answered train questions in {data}: tts-prefix needs the LLM's answers")
    if config.init_from_layers and previous["stage"] == "tts-decoder":
        for prefix_layer, layer in zip(decoder.layers_prefix, decoder.layers):
            prefix_layer.load_state_dict(layer.state_dict())
    for name, param in decoder.named_parameters():
        param.requires_grad_(name.startswith("layers_prefix."))
    frozen_before = {k: v.clone() for k, v in decoder.state_dict().items()
                     if not k.startswith("layers_prefix.")}
    logger.info("tts-prefix: %d train segments, %d valid", len(train), len(valid))
    no_prefix = held_out_loss(decoder, [DecoderExample(e.text_ids, e.tokens) for e in valid], embed)
    step_fn = sampled_batch_step(decoder, train, embed, config.loop.seed, config.batch_pairs, config.dropout,
                                 config.own_input_rate, config.own_input_passes)
    result = train_loop(run_dir, {"decoder": decoder}, step_fn, config.loop, frozen=[causal_lm],
                        title="tts-prefix: codec-id cross-entropy")
    for key, value in frozen_before.items():
        if not torch.equal(value, decoder.state_dict()[key]):
            raise RuntimeError(f"tts-prefix changed {key}; only layers_prefix may be trained")
    summary: dict[str, Any] = {"steps": result.step, "finished": result.finished,
                               "seconds": round(result.seconds, 1), "train_segments": len(train)}
    if result.finished:
        summary |= {k: round(v, 4) for k, v in result.last_metrics.items()}
        summary |= {k: round(v, 4) for k, v in held_out_loss(decoder, valid, embed).items()}
        summary |= {f"{k}_without_prefix": round(v, 4) for k, v in no_prefix.items()}
        save_decoder_result(run_dir / RESULT_NAME, "tts-prefix", previous["layout"], decoder,
                            {"config": asdict(config), "summary": summary, "init": str(init)})
    logger.info("tts-prefix: %s", summary)
    return summary
