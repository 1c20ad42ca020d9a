"""Batched, teacher-forced forward of the engine's `SpeechDecoder` (spec §7.3).

The engine's module runs one stream without a batch dimension and under `no_grad`; training
uses the same parameters through this functional forward. One sequence is laid out as

    [prefix rows (own positions 0..P-1, prefix layers)]  — only with a prefix
    [BOS, pre_nn(text rows)]  ++  [SOS, y1 .. yL]       — positions 0 .. C+L

with targets [y1 .. yL, EOS] on the second part. Attention (spec §7.3): the conditioning part
(BOS + pre-net rows) is bidirectional over itself; the token part sees the whole conditioning
part and is causal over itself; every position also sees every valid prefix row, whose keys and
values come from `layers_prefix[i]` for `layers[i]`. This is what the engine's prefill (no mask
over prefix + conditioning) followed by AR steps computes, which `tests/test_training_tts.py`
checks logit by logit.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from quantized_models.speech_decoder import DecoderLayer, SelfAttention, SpeechDecoder, _rotate_half

NEG_INF = -1e9  # additive mask value; finite, so a fully masked padding row gives no NaN


@dataclass
class DecoderBatch:
    """Right-padded inputs of one batch (B sequences)."""

    text_rows: Tensor
    """[B, R, idim] split LLM embeddings of each segment text (zeros after `text_lengths`)."""
    text_lengths: list[int]
    """Rows 4n of each sequence."""
    tokens: Tensor
    """[B, L] codec ids (pad id after `token_lengths`)."""
    token_lengths: list[int]
    """Codec tokens L of each sequence (EOS is added as the last target)."""
    prefix_rows: Tensor | None = None
    """[B, P, idim] split LLM hidden states, or None (no prefix)."""
    prefix_lengths: list[int] | None = None
    input_tokens: Tensor | None = None
    """[B, L] ids fed as the AR inputs where they differ from the targets `tokens` (the
    decoder's own predictions, `own_prediction_inputs`); None: teacher forcing."""


def conditioning_mask(cond_len: int, token_len: int, total: int) -> Tensor:
    """[total, total] bool: query i may attend key j, for one sequence laid out as
    [BOS + pre-net (cond_len)] ++ [SOS + tokens (token_len + 1)] ++ padding.

    Conditioning rows see all conditioning rows; token rows see all conditioning rows and the
    token rows up to themselves. Padding queries see nothing but themselves.
    """
    used = cond_len + token_len + 1
    idx = torch.arange(total)
    query, key = idx.view(-1, 1), idx.view(1, -1)
    visible = (key < cond_len) | ((query >= cond_len) & (key <= query))
    visible &= (query < used) & (key < used)
    visible |= query == key
    return visible


def prefix_visible(prefix_len: int, total_prefix: int, total: int) -> Tensor:
    """[total, total_prefix] bool: every query sees the sequence's valid prefix rows."""
    return (torch.arange(total_prefix) < prefix_len).view(1, -1).expand(total, -1)


def _heads(attn: SelfAttention, x: Tensor) -> Tensor:
    b, t, _ = x.shape
    return x.view(b, t, attn.heads, attn.head_dim).transpose(1, 2)  # [B, T, D] -> [B, H, T, hd]


Probe = Callable[[Tensor, Tensor], None]
"""Called with a layer's rotated queries and own keys, both [B, H, T, hd] (alignment costs)."""


def _attention(attn: SelfAttention, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
               extra: tuple[Tensor, Tensor] | None, probe: Probe | None = None
               ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """x: [B, T, D]; mask: additive [B, 1, T, S]; extra: prefix (k, v) [B, H, P, hd] put first.

    Returns the output [B, T, D] and this layer's own rotated (k, v) [B, H, T, hd].
    """
    q, k, v = _heads(attn, attn.q_proj(x)), _heads(attn, attn.k_proj(x)), _heads(attn, attn.v_proj(x))
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    if probe is not None:
        probe(q, k)
    keys, values = (k, v) if extra is None else (torch.cat((extra[0], k), 2), torch.cat((extra[1], v), 2))
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.to(q.dtype))  # [B, H, T, hd]
    b, t, _ = x.shape
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, attn.heads * attn.head_dim)), (k, v)


def _layer(layer: DecoderLayer, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
           extra: tuple[Tensor, Tensor] | None, dropout: float, training: bool,
           probe: Probe | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Pre-norm block as `DecoderLayer.forward`, batched, with dropout on both residual branches."""
    h, kv = _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, mask, extra, probe)
    x = x + F.dropout(h, dropout, training)
    x = x + F.dropout(layer.mlp(layer.post_attention_layernorm(x)), dropout, training)
    return x, kv


def _additive(visible: Tensor) -> Tensor:
    """bool [B, T, S] -> additive [B, 1, T, S]."""
    return torch.where(visible, 0.0, NEG_INF).unsqueeze(1)


def _row_mask(lengths: list[int], total: int, device: torch.device) -> Tensor:
    """[B, T, T] bool, bidirectional over each sequence's first `length` rows (self always)."""
    valid = torch.arange(total, device=device).view(1, -1) < torch.tensor(lengths, device=device).view(-1, 1)
    eye = torch.eye(total, dtype=torch.bool, device=device)
    return (valid.unsqueeze(1) & valid.unsqueeze(2)) | eye


def run_pre_net(decoder: SpeechDecoder, rows: Tensor, lengths: list[int], dropout: float = 0.0) -> Tensor:
    """`layers_pre_nn` over [B, R, D] text rows, bidirectional within each sequence."""
    cos, sin = decoder.rotary(0, rows.shape[1], rows)
    mask = _additive(_row_mask(lengths, rows.shape[1], rows.device))
    x = rows
    for layer in decoder.layers_pre_nn:
        x, _ = _layer(layer, x, cos, sin, mask, None, dropout, decoder.training)
    return x


def run_prefix(decoder: SpeechDecoder, rows: Tensor, lengths: list[int], dropout: float = 0.0
               ) -> list[tuple[Tensor, Tensor]]:
    """`layers_prefix` over [B, P, D], bidirectional; returns each layer's rotated (k, v)."""
    cos, sin = decoder.rotary(0, rows.shape[1], rows)
    mask = _additive(_row_mask(lengths, rows.shape[1], rows.device))
    x, kvs = rows, []
    for layer in decoder.layers_prefix:
        x, kv = _layer(layer, x, cos, sin, mask, None, dropout, decoder.training)
        kvs.append(kv)
    return kvs


@dataclass
class DecoderTargets:
    """Where the loss reads the logits."""

    logits: Tensor
    """[K, vocab] logits at every token-part position of every sequence."""
    targets: Tensor
    """[K] ids y1..yL, EOS per sequence."""
    alignment_costs: list[Tensor] | None = None
    """Per NAR/AR layer, [H] `alignment_cost` of each head (only when asked for)."""


def diagonal_penalty(cond_len: int, token_len: int, total: int, width: float) -> Tensor:
    """[total, total] weights 1 - exp(-(n/N - t/T)^2 / (2 width^2)) of token query t attending
    conditioning key n (0 elsewhere), both as fractions of their part's length.

    Why (guided attention, Tachibana et al. 2018): text and speech advance together, so a query
    a fraction t/T into the speech should read the text about t/T into it; attention far from
    that diagonal costs up to 1.
    """
    idx = torch.arange(total, dtype=torch.float32)
    text_frac = ((idx + 0.5) / cond_len).view(1, -1)
    speech_frac = ((idx - cond_len + 0.5) / (token_len + 1)).view(-1, 1)
    weight = 1.0 - torch.exp(-(text_frac - speech_frac).square() / (2.0 * width * width))
    is_query = (idx >= cond_len) & (idx < cond_len + token_len + 1)
    return weight * (is_query.view(-1, 1) & (idx < cond_len).view(1, -1))


def diagonal_penalties(conds: list[int], token_lengths: list[int], total: int, width: float) -> Tensor:
    """[B, total, total] `diagonal_penalty` of every sequence of a batch."""
    return torch.stack([diagonal_penalty(c, n, total, width) for c, n in zip(conds, token_lengths)])


def alignment_cost(q: Tensor, k: Tensor, conds: list[int], token_lengths: list[int], width: float,
                   penalties: Tensor | None = None) -> Tensor:
    """[H] mean `diagonal_penalty` under each head's attention of the token queries over the
    conditioning keys alone (softmax renormalised over them), over every token query of the
    batch. q, k: rotated [B, H, T, hd]; `penalties`: `diagonal_penalties` of the batch, when
    already computed (every layer shares them). 0: every query reads the text on its diagonal;
    a head spread evenly over the text costs about 0.6 at width 0.2.
    """
    total = q.shape[2]
    if penalties is None:
        penalties = diagonal_penalties(conds, token_lengths, total, width)
    scores = (q @ k.transpose(-1, -2)).float() / q.shape[-1] ** 0.5  # [B, H, T, T]
    is_cond = torch.arange(total, device=q.device).view(1, 1, 1, -1) < torch.tensor(
        conds, device=q.device).view(-1, 1, 1, 1)
    probs = torch.softmax(scores.masked_fill(~is_cond, NEG_INF), dim=-1)
    per_query = (probs * penalties.to(q.device).unsqueeze(1)).sum(-1)  # [B, H, T]; 0 off the token part
    return per_query.sum(dim=(0, 2)) / sum(n + 1 for n in token_lengths)


def teacher_forced_logits(decoder: SpeechDecoder, batch: DecoderBatch, dropout: float = 0.0,
                          guide_width: float | None = None) -> DecoderTargets:
    """Logits of every token-part position (the next-id predictions), batched; with
    `guide_width`, also every layer's `alignment_cost` per head."""
    dims, device = decoder.dims, decoder.embedding.weight.device
    rows = batch.text_rows.to(device=device, dtype=decoder.embedding.weight.dtype)
    pre = run_pre_net(decoder, rows, batch.text_lengths, dropout)
    bos = decoder.embedding(torch.tensor([dims.bos_id], device=device))  # [1, D]
    sos = decoder.embedding(torch.tensor([dims.sos_id], device=device))
    sequences, targets, conds = [], [], []
    fed = batch.tokens if batch.input_tokens is None else batch.input_tokens
    for b, (n_rows, n_tok) in enumerate(zip(batch.text_lengths, batch.token_lengths)):
        ids = batch.tokens[b, :n_tok].to(device)
        inputs = fed[b, :n_tok].to(device)
        sequences.append(torch.cat((bos, pre[b, :n_rows], sos, decoder.embedding(inputs))))
        targets.append(torch.cat((ids, torch.tensor([dims.eos_id], device=device))))
        conds.append(n_rows + 1)
    total = max(s.shape[0] for s in sequences)
    x = torch.stack([F.pad(s, (0, 0, 0, total - s.shape[0])) for s in sequences])  # [B, T, D]
    visible = torch.stack([conditioning_mask(c, n, total)
                           for c, n in zip(conds, batch.token_lengths)]).to(device)
    extras: list[tuple[Tensor, Tensor] | None] = [None] * len(decoder.layers)
    if batch.prefix_rows is not None and dims.kv_cache_prefix_finetune:
        assert batch.prefix_lengths is not None, "prefix rows need prefix_lengths"
        p = batch.prefix_rows.to(device=device, dtype=x.dtype)
        extras = run_prefix(decoder, p, batch.prefix_lengths, dropout)  # type: ignore[assignment]
        seen = torch.stack([prefix_visible(n, p.shape[1], total) for n in batch.prefix_lengths]).to(device)
        visible = torch.cat((seen, visible), dim=2)  # keys: [prefix | sequence]
    mask = _additive(visible)
    cos, sin = decoder.rotary(0, total, x)
    costs: list[Tensor] = []
    penalties = None if guide_width is None else diagonal_penalties(
        conds, batch.token_lengths, total, guide_width).to(device)

    def probe(q: Tensor, k: Tensor) -> None:
        assert guide_width is not None
        costs.append(alignment_cost(q, k, conds, batch.token_lengths, guide_width, penalties))

    for layer, extra in zip(decoder.layers, extras):
        x, _ = _layer(layer, x, cos, sin, mask, extra, dropout, decoder.training,
                      None if guide_width is None else probe)
    picked = torch.cat([x[b, c:c + n + 1] for b, (c, n) in enumerate(zip(conds, batch.token_lengths))])
    return DecoderTargets(decoder.out_fnn(decoder.norm(picked)), torch.cat(targets),
                          costs if guide_width is not None else None)


@torch.no_grad()
def own_prediction_inputs(decoder: SpeechDecoder, batch: DecoderBatch, rate: float,
                          rng: np.random.Generator, passes: int = 1) -> Tensor:
    """[B, L] AR inputs with a share `rate` of the ids replaced by the decoder's own greedy
    predictions of them (scheduled sampling).

    Why: the engine feeds back the decoder's own ids, which are wrong about two times in three;
    a decoder that only ever saw piper's ids as inputs drifts once its first guesses are wrong
    (measured on held-out pairs: greedy predictions under teacher forcing are about as
    intelligible as piper's ids, free-running greedy output is not). The predictions come from a
    teacher-forced pass without dropout; the targets stay piper's ids. With `passes` > 1 each
    further pass predicts again from the previous pass's mixed inputs (the same positions are
    swapped), so the guesses are made on contexts that already hold guesses, as when running free.
    """
    swaps = [torch.from_numpy(rng.random(n_tok) < rate) for n_tok in batch.token_lengths]
    inputs = batch.tokens.clone()
    for pass_index in range(passes):
        fed = None if pass_index == 0 else inputs  # read before this pass rewrites it
        teacher = teacher_forced_logits(decoder, replace(batch, input_tokens=fed))
        logits = teacher.logits[:, :decoder.dims.odim]  # codec ids only
        offset = 0
        for b, (n_tok, swap) in enumerate(zip(batch.token_lengths, swaps)):
            guesses = logits[offset:offset + n_tok].argmax(-1).to(inputs.device)  # position j predicts y_j
            inputs[b, :n_tok] = torch.where(swap.to(inputs.device), guesses, batch.tokens[b, :n_tok])
            offset += n_tok + 1  # each sequence has n_tok + 1 predictions (the last is EOS)
    return inputs


def token_loss(out: DecoderTargets, soft_targets: Tensor | None = None,
               weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Mean cross-entropy per target (nats) and the next-token accuracy.

    `soft_targets` [V, V] (`neighbour_targets`): row y is the target distribution when the target
    id is y, instead of one-hot y. `weights` [K] (`transition_weights`): a weighted mean instead."""
    logits = out.logits.float()
    if soft_targets is None:
        per_target = F.cross_entropy(logits, out.targets, reduction="none")
    else:
        rows = soft_targets.to(logits.device)[out.targets]  # [K, V]
        per_target = -(rows * F.log_softmax(logits, dim=-1)).sum(-1)
    if weights is None:
        loss = per_target.mean()
    else:
        weights = weights.to(per_target.device)
        loss = (weights * per_target).sum() / weights.sum()
    acc = (out.logits.argmax(-1) == out.targets).float().mean().item()
    return loss, {"token_acc": acc}


def check_neighbour_smoothing(smoothing: float, temperature_nn: float) -> None:
    """ValueError unless `smoothing` lies in [0, 1) and `temperature_nn` is positive."""
    if not 0.0 <= smoothing < 1.0 or temperature_nn <= 0:
        raise ValueError("neighbour smoothing must lie in [0, 1) and its temperature be positive, "
                         f"not {smoothing} and {temperature_nn}")


def neighbour_targets(codebook: Tensor, vocab: int, smoothing: float, temperature_nn: float) -> Tensor:
    """[vocab, vocab] target rows that give a share `smoothing` of each codec id's probability to
    the other codec ids, by closeness of their codebook vectors (special ids stay one-hot).

    Why: a wrong id that decodes to nearly the same sound costs the listener little, a distant one
    costs a word; plain cross-entropy punishes both alike. The weights of the other ids are
    softmax(-d^2 / (temperature_nn * m)), m the median squared distance of a code to its nearest
    other code, so the temperature does not depend on the codebook's units.

    Args:
        codebook: [n_codes, D] codec vectors in the space the codec was clustered in.
    """
    check_neighbour_smoothing(smoothing, temperature_nn)
    book = codebook.double()
    n_codes = book.shape[0]
    if n_codes > vocab:
        raise ValueError(f"the codebook has {n_codes} codes but the decoder predicts only {vocab} ids")
    dist = torch.cdist(book, book).square()  # [K, K]
    dist.fill_diagonal_(float("inf"))
    nearest = dist.min(dim=1).values.median().clamp_min(1e-12)
    neighbours = torch.softmax(-dist / (temperature_nn * nearest), dim=1)  # zero on the diagonal
    rows = torch.eye(vocab, dtype=torch.float64)
    rows[:n_codes, :n_codes] = (1.0 - smoothing) * rows[:n_codes, :n_codes] + smoothing * neighbours
    return rows.float()
