"""Stage tts-decoder: speech decoder + pre-network on (text -> codec ids of piper speaking it).

The text enters through the FROZEN LLM's own embedding table, split into decoder rows (spec
§6.3, §11.3 step 2); no prefix is used, so `layers_prefix` stays at its initialisation (the
tts-prefix stage trains it). Loss: mean cross-entropy of [y1 .. yL, EOS] (spec §7.3 sums it;
the mean keeps the learning rate independent of segment length).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from assistant.segmentation import normalize_tts_text
from quantized_models.speech_decoder import SpeechDecoder
from training.common import LoopConfig, batch_rng, train_loop
from training.llm_sequence import load_frozen_llm
from training.tts.decoder_forward import (
    check_neighbour_smoothing,
    neighbour_targets,
    own_prediction_inputs,
    teacher_forced_logits,
    token_loss,
)
from training.tts.decoder_model import (
    RESULT_NAME,
    DecoderExample,
    DecoderGeometry,
    build_decoder,
    decoder_from_result,
    decoder_layout,
    load_decoder_result,
    make_batch,
    save_decoder_result,
)
from training.tts.transitions import check_transition_settings, noisy_inputs, transition_weights
from training.tts.pairs import (
    PiperNative,
    Speak,
    SpeechPair,
    bank_texts,
    build_pairs,
    check_targets,
    load_bank,
    spread_texts,
    tokens_of_targets,
    train_texts,
)

logger = logging.getLogger(__name__)

PAIRS_NAME = "pairs.jsonl"


class CodecEncoderLike(Protocol):
    """What the stages need of the codec (`training.codec.load_codec_encoder(...)`)."""

    n_codes: int
    samples_per_token: int
    sample_rate_hz: int

    def encode_wav(self, samples: np.ndarray, rate_hz: int) -> np.ndarray: ...


@dataclass(frozen=True)
class TtsDecoderConfig:
    """tts-decoder settings."""

    geometry: DecoderGeometry = field(default_factory=DecoderGeometry)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=3000, lr=1e-3, warmup_steps=200))
    batch_pairs: int = 16
    max_codec_tokens: int = 400
    """Pairs with more codec ids are left out (10 s at 40 ids/s)."""
    dropout: float = 0.1
    train_limit: int | None = None
    """Speak and train on only N train texts (evenly spread)."""
    valid_limit: int = 40
    """Validation pairs for the final held-out loss (0: none)."""
    speech_cache: Path | None = None
    """Where piper's renderings are kept (default: `<run dir>/speech`)."""
    extra_data: tuple[Path, ...] = ()
    """More banks (or data directories) whose train texts are added, less any text the main
    bank holds out for valid or test."""
    own_input_rate: float = 0.0
    """Share of AR input ids replaced by the decoder's own greedy predictions (scheduled
    sampling, `own_prediction_inputs`); 0: plain teacher forcing."""
    own_input_passes: int = 1
    """Prediction passes per batch for the swapped ids (> 1: guesses made on guesses)."""
    neighbour_smoothing: float = 0.0
    """Share of each target id's probability given to ids with nearby codebook vectors
    (`neighbour_targets`); 0: one-hot targets. Needs a codec with a `codebook`."""
    neighbour_temperature_nn: float = 1.0
    """Width of that spread, in median nearest-neighbour squared distances of the codebook."""
    guided_heads: int = 0
    """Heads (the first N of every NAR/AR layer but the first) whose attention from the codec ids
    over the text is pulled toward the diagonal (`guided_attention_loss`); 0: none."""
    guided_width: float = 0.2
    """Width of that diagonal, as a fraction of text and speech length."""
    guided_weight: float = 1.0
    """Weight of the guided-attention cost beside the cross-entropy (nats)."""
    init: Path | None = None
    """A tts-decoder result (run directory, result.pt or a kept float16 artifact) to continue
    training from; its layout replaces `geometry`. None: a fresh decoder."""
    targets: str = "speech"
    """Where the pairs' codec ids come from (`training.tts.pairs.TARGETS`)."""
    transition_weight: float = 1.0
    """Loss weight of targets that change the id (`training.tts.transitions`); 1: plain mean."""
    input_noise_rate: float = 0.0
    """Share of AR input ids replaced by random codec ids (`noisy_inputs`); 0: none."""

    def __post_init__(self) -> None:
        check_targets(self.targets)
        check_own_input_rate(self.own_input_rate, self.own_input_passes)
        check_neighbour_smoothing(self.neighbour_smoothing, self.neighbour_temperature_nn)
        check_transition_settings(self.transition_weight, self.input_noise_rate)
        if self.guided_heads < 0 or self.guided_width <= 0 or self.guided_weight < 0:
            raise ValueError("guided attention needs heads >= 0, a positive width and a weight >= 0, not "
                             f"{self.guided_heads}, {self.guided_width} and {self.guided_weight}")


def check_own_input_rate(rate: float, passes: int = 1) -> None:
    """ValueError unless `rate` is a share and `passes` at least 1 (both tts stages take them)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"own_input_rate is a share of the input ids: give a value from 0 to 1, not {rate}")
    if passes < 1:
        raise ValueError(f"own_input_passes counts prediction passes: give 1 or more, not {passes}")


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids the engine feeds the decoder for a segment text (normalised, re-tokenised)."""
    return tokenizer.encode(normalize_tts_text(text), add_special_tokens=False)


def examples_of(pairs: list[SpeechPair], tokenizer: Any) -> list[DecoderExample]:
    out = [DecoderExample(text_ids(tokenizer, p.text), p.tokens) for p in pairs]
    return [e for e in out if e.text_ids and e.tokens]


def make_pairs(data: Path, codec: CodecEncoderLike, run_dir: Path, config: TtsDecoderConfig,
               speak: Speak | None) -> dict[str, list[SpeechPair]]:
    """Train and valid pairs, spoken and encoded once into `run_dir/pairs.jsonl`."""
    bank = load_bank(data)
    speak = speak or PiperNative(cache_dir=config.speech_cache or run_dir / "speech")
    limits = {"train": config.train_limit, "valid": config.valid_limit}
    texts = {"train": train_texts(bank, [load_bank(extra) for extra in config.extra_data]),
             "valid": bank_texts(bank, "valid")}
    tokens_of = tokens_of_targets(config.targets, codec, speak)
    return {split: build_pairs(run_dir / PAIRS_NAME, spread_texts(texts[split], limits[split]),
                               split, tokens_of, config.max_codec_tokens)
            for split in ("train", "valid") if limits[split] != 0}


@dataclass(frozen=True)
class GuidedAttention:
    """Which heads `guided_attention_loss` pulls toward the text-speech diagonal, and how hard."""

    heads: int
    width: float = 0.2
    weight: float = 1.0


def guided_attention_loss(costs: list[Tensor], heads: int) -> Tensor:
    """Mean `alignment_cost` of the first `heads` heads of every layer but the first.

    Why not the first layer: its queries know only their own codec id and position, and the
    diagonal is no fixed relative offset (text and speech lengths differ per segment), so only a
    later layer can know how far into the text it is.
    """
    picked = [layer_costs[:heads] for layer_costs in costs[1:]] or [costs[0][:heads]]
    return torch.cat(picked).mean()


def sampled_batch_step(decoder, examples: list[DecoderExample], embed, seed: int, batch_pairs: int,
                       dropout: float, own_input_rate: float = 0.0, own_input_passes: int = 1,
                       soft_targets: Tensor | None = None, guided: GuidedAttention | None = None,
                       transition_weight: float = 1.0, input_noise_rate: float = 0.0
                       ) -> Callable[[int], tuple[Tensor, dict[str, float]]]:
    """The training step of both tts stages: a seeded batch of `examples`, teacher-forced loss
    (with `own_input_rate` of the inputs replaced by the decoder's own predictions and then
    `input_noise_rate` by random ids, the targets of `soft_targets` when given, changing targets
    weighted `transition_weight`, and `guided`'s attention cost added when given)."""
    size = min(batch_pairs, len(examples))
    if guided is not None and guided.heads > decoder.dims.num_heads:
        raise ValueError(f"--guided-heads {guided.heads} exceeds the decoder's {decoder.dims.num_heads} "
                         "attention heads; give at most that many")

    def step_fn(step: int) -> tuple[Tensor, dict[str, float]]:
        rng = batch_rng(seed, step)
        index = rng.choice(len(examples), size, replace=False)
        batch = make_batch([examples[i] for i in index], embed, decoder.dims.idim, decoder.dims.pad_id)
        if own_input_rate > 0:
            batch.input_tokens = own_prediction_inputs(decoder, batch, own_input_rate, rng,
                                                       own_input_passes)
        if input_noise_rate > 0:
            fed = batch.tokens if batch.input_tokens is None else batch.input_tokens
            batch.input_tokens = noisy_inputs(fed, batch.token_lengths, input_noise_rate,
                                              decoder.dims.odim, rng)
        weights = (None if transition_weight == 1.0
                   else transition_weights(batch.tokens, batch.token_lengths, transition_weight))
        if guided is None or guided.heads == 0:
            return token_loss(teacher_forced_logits(decoder, batch, dropout), soft_targets, weights)
        out = teacher_forced_logits(decoder, batch, dropout, guide_width=guided.width)
        loss, metrics = token_loss(out, soft_targets, weights)
        assert out.alignment_costs is not None
        align = guided_attention_loss(out.alignment_costs, guided.heads)
        return loss + guided.weight * align, metrics | {"token_loss": loss.item(), "alignment": align.item()}

    return step_fn


def codebook_targets(codec: Any, config: TtsDecoderConfig, vocab: int) -> Tensor | None:
    """`neighbour_targets` of the codec's codebook, or None when `neighbour_smoothing` is 0."""
    if config.neighbour_smoothing == 0:
        return None
    book = getattr(codec, "codebook", None)
    if book is None:
        raise ValueError("--neighbour-smoothing needs a codec with a codebook (a WORLD VQ codec)")
    return neighbour_targets(torch.as_tensor(np.asarray(book)), vocab, config.neighbour_smoothing,
                             config.neighbour_temperature_nn)


@torch.no_grad()
def held_out_loss(decoder, examples: list[DecoderExample], embed, batch: int = 8) -> dict[str, float]:
    """Mean token loss and accuracy on `examples` (eval mode)."""
    if not examples:
        return {}
    decoder.eval()
    losses, accs, weights = [], [], []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        b = make_batch(chunk, embed, decoder.dims.idim, decoder.dims.pad_id)
        loss, metrics = token_loss(teacher_forced_logits(decoder, b))
        n = sum(b.token_lengths) + len(chunk)
        losses.append(loss.item() * n)
        accs.append(metrics["token_acc"] * n)
        weights.append(n)
    return {"valid_loss": sum(losses) / sum(weights), "valid_acc": sum(accs) / sum(weights)}


def initial_decoder(config: TtsDecoderConfig, llm_hidden: int, n_codes: int) -> tuple[SpeechDecoder, list]:
    """The decoder training starts from: `config.init`'s weights (checked against this LLM and
    codec), or a fresh one of `config.geometry`."""
    if config.init is None:
        layout = decoder_layout(config.geometry, llm_hidden, n_codes)
        return build_decoder(layout, config.loop.seed), layout
    result = load_decoder_result(config.init)
    layout = result["layout"]
    idim, odim, args = layout
    if args.get("trained_for_llm_hidden") != llm_hidden or odim != n_codes:
        raise ValueError(f"{config.init} was trained for an LLM width {args.get('trained_for_llm_hidden')} "
                         f"and {odim} codec ids; this run has {llm_hidden} and {n_codes}: pass the LLM "
                         "and codec it was trained with, or leave out --init to start a fresh decoder")
    decoder = decoder_from_result(result).float()
    logger.info("tts-decoder: continuing from %s (%s, %s)", config.init, result.get("stage"),
                result.get("extra", {}).get("summary", {}))
    return decoder, layout


def train_tts_decoder(data: Path, codec: CodecEncoderLike, llm_dir: Path, run_dir: Path,
                      config: TtsDecoderConfig, speak: Speak | None = None) -> dict:
    """Train decoder + pre-net; writes `run_dir/result.pt` (read by tts-prefix and tts-export)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    causal_lm, tokenizer = load_frozen_llm(llm_dir)
    embed = causal_lm.get_input_embeddings()
    pairs = make_pairs(data, codec, run_dir, config, speak)
    train = examples_of(pairs["train"], tokenizer)
    if not train:
        raise ValueError(f"no training pairs from {data}: the bank has no train texts")
    valid = examples_of(pairs.get("valid", []), tokenizer)
    decoder, layout = initial_decoder(config, int(embed.embedding_dim), int(codec.n_codes))
    causal_lm.to(config.loop.torch_device)
    decoder.to(config.loop.torch_device)
    for param in decoder.layers_prefix.parameters():
        param.requires_grad_(False)  # trained by tts-prefix on the LLM's hidden states
    logger.info("tts-decoder: %d train pairs, %d valid; idim %d, %d codec ids", len(train), len(valid),
                decoder.dims.idim, decoder.dims.odim)
    step_fn = sampled_batch_step(decoder, train, embed, config.loop.seed, config.batch_pairs, config.dropout,
                                 config.own_input_rate, config.own_input_passes,
                                 codebook_targets(codec, config, decoder.dims.vocab_size),
                                 GuidedAttention(config.guided_heads, config.guided_width, config.guided_weight),
                                 config.transition_weight, config.input_noise_rate)
    result = train_loop(run_dir, {"decoder": decoder}, step_fn, config.loop, frozen=[causal_lm],
                        title="tts-decoder: codec-id cross-entropy")
    summary: dict[str, Any] = {
        "steps": result.step, "finished": result.finished, "seconds": round(result.seconds, 1),
        "train_pairs": len(train), "train_codec_ids": sum(len(e.tokens) for e in train),
        "codec_ids_per_s": codec.sample_rate_hz / codec.samples_per_token}
    if result.finished:
        summary |= {k: round(v, 4) for k, v in result.last_metrics.items()}
        summary |= {k: round(v, 4) for k, v in held_out_loss(decoder, valid, embed).items()}
        save_decoder_result(run_dir / RESULT_NAME, "tts-decoder", layout, decoder,
                            {"config": asdict(config), "summary": summary})
    logger.info("tts-decoder: %s", summary)
    return summary
