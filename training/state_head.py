"""`freeze-omni train state-head`: refit the state head of a stage-3 result on cached features.

After stage 3 everything before the state head is frozen (encoder, adapter, prompt vectors,
LLM), so the LLM's hidden state at the last adapter vector of every chunk is a fixed feature.
Computing those once (a forward pass per turn, no gradients) turns the head into a convex
problem: a weighted softmax regression fitted to convergence in seconds, where stage 3 saw each
turn less than once. Every turn gets the same silent tail as `eval states` streams after it
(`RESPONSE_WINDOW_CHUNKS`), end-labelled.

Candidates (class weight x L2 strength, then offsets added to the respond / ignore biases) are
judged by what `eval states` measures, replayed on the features of the validation split: the
first chunk whose decision under the engine's rule (`assistant.dialogue.decide`, official
thresholds) is not `continue`, scored by `training.eval.score_turn`. The engine reads the head
unchanged: only `predictor_head` rows 0..2 of the result change.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from quantized_models.onnx_export import file_sha256
from training.common import RESULT_NAME, assert_frozen, freeze, save_atomic
from training.data.manifest import ManifestEntry, read_manifest
from training.device import training_device
from training.eval import RESPONSE_WINDOW_CHUNKS, TurnOutcome, state_rates
from training.features import check_speed_factors, chunk_labels, held_out_texts, load_utterances, trained_texts
from training.llm_sequence import TurnItem
from training.model_config import save_result
from training.stage2_connect import audio_vectors, build_stage2
from training.stage3_dialogue import DIALOGUE_KINDS

logger = logging.getLogger(__name__)

STATE_CLASSES = 3  # the engine's softmax reads the first three logits only


@dataclass(frozen=True)
class HeadFitConfig:
    """Search space of the head refit."""

    end_class_weights: tuple[float, ...] = (1.0, 3.0, 10.0)
    """Cross-entropy weight of classes 1 and 2 relative to class 0."""
    l2_strengths: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)
    """L2 penalty on the (standardised) weights."""
    bias_offsets: tuple[float, ...] = tuple(float(x) for x in np.arange(-6.0, 3.01, 0.5))
    """Added to the respond and ignore biases after the fit (every pair is tried)."""
    speed_factors: tuple[float, ...] = ()
    """Extra speed-perturbed copies of `--data`'s train turns (`training.features.speed_perturbed`)
    added to the fit; the choice is still made on the unperturbed valid split."""
    lbfgs_iterations: int = 300
    batch_turns: int = 8
    train_limit: int | None = None
    device: str = "cpu"
    """Torch device of the feature pass (encoder, adapter, frozen LLM); the fits run on the CPU."""


@dataclass
class ChunkFeatures:
    """Frozen-LLM hidden states at every chunk end of a split's dialogue turns."""

    features: Tensor
    """[S, H] float32, turns concatenated in `entries` order."""
    labels: Tensor
    """[S] chunk labels (tail chunks end-labelled)."""
    turn_starts: list[int]
    """Row of each turn's first chunk, plus the total row count at the end."""
    entries: list[ManifestEntry]


def concat_features(parts: list[ChunkFeatures]) -> ChunkFeatures:
    """Several splits' features as one (turns in order)."""
    starts, offset = [0], 0
    for part in parts:
        starts += [offset + s for s in part.turn_starts[1:]]
        offset += part.turn_starts[-1]
    return ChunkFeatures(torch.cat([p.features for p in parts]), torch.cat([p.labels for p in parts]),
                         starts, [e for p in parts for e in p.entries])


@torch.no_grad()
def extract_features(parts, turns, data_dir: Path, split: str, config: HeadFitConfig,
                     excluded_keys: frozenset[str] = frozenset(), speed: float = 1.0) -> ChunkFeatures:
    """One frozen forward pass per turn (batched by length), keeping the chunk-end states.

    The encoder and adapter run in eval mode, as in the engine: in training mode the adapter's
    BatchNorm (two-convolution branch) would normalise by each padded batch and move its
    running statistics, which the saved result would then carry.
    """
    freeze(parts.encoder)
    freeze(parts.adapter)
    utts = load_utterances(data_dir, split, DIALOGUE_KINDS,
                           config.train_limit if split == "train" else None, RESPONSE_WINDOW_CHUNKS,
                           excluded_keys, speed)
    if not utts:
        raise ValueError(f"{data_dir}: the {split} split holds no questions or non-queries")
    order = sorted(range(len(utts)), key=lambda i: utts[i].chunks.shape[0])
    per_turn: dict[int, tuple[Tensor, Tensor]] = {}  # turn -> (features, labels)
    lead = parts.heads.prompt_embeddings.weight
    label = split if speed == 1.0 else f"{split}, speed {speed:g}"
    for start in tqdm(range(0, len(order), config.batch_turns), desc=f"state features ({label})",
                      unit="batch", leave=False):
        index = order[start:start + config.batch_turns]
        batch_utts = [utts[i] for i in index]
        vectors = audio_vectors(parts, batch_utts, encoder_grad=False)
        items = [TurnItem(audio=v, lead=lead, chunk_labels=chunk_labels(u.entry, RESPONSE_WINDOW_CHUNKS))
                 for v, u in zip(vectors, batch_utts)]
        batch = turns.lay_out(items)
        hidden = turns.hidden(batch)
        picked = hidden[batch.state_rows[:, 0], batch.state_rows[:, 1]].float().cpu()
        rows, targets = batch.state_rows[:, 0].cpu(), batch.state_targets.cpu()
        for row, i in enumerate(index):
            per_turn[i] = picked[rows == row], targets[rows == row]
    features, labels = zip(*(per_turn[i] for i in range(len(utts))))
    starts = np.cumsum([0] + [len(x) for x in labels]).tolist()
    return ChunkFeatures(torch.cat(features), torch.cat(labels), starts, [u.entry for u in utts])


def cached_features(parts, turns, data_dir: Path, split: str, config: HeadFitConfig,
                    cache: Path, source_sha: str,
                    excluded_keys: frozenset[str] = frozenset(), speed: float = 1.0) -> ChunkFeatures:
    """`extract_features`, kept in `cache` for the same source result, manifest, split, limit,
    exclusions and speed."""
    excluded = (hashlib.sha256("\n".join(sorted(excluded_keys)).encode()).hexdigest()
                if excluded_keys else None)
    wanted = {"source_sha256": source_sha, "manifest_sha256": file_sha256(data_dir / "manifest.jsonl"),
              "split": split, "limit": config.train_limit, "excluded_sha256": excluded}
    if speed != 1.0:  # absent for speed 1, so caches written before speed perturbation stay valid
        wanted["speed"] = speed
    if cache.is_file():
        kept = torch.load(cache, map_location="cpu", weights_only=False)
        if all(kept.get(k) == v for k, v in wanted.items()):
            logger.info("state-head: reusing %s", cache)
            return kept["features"]
    found = extract_features(parts, turns, data_dir, split, config, excluded_keys, speed)
    save_atomic({**wanted, "features": found}, cache)
    return found


def chunk_decisions(probs: np.ndarray, thresholds) -> np.ndarray:
    """`assistant.dialogue.decide` over rows of [S, 3] probabilities: 0 continue, 1 respond, 2 ignore.

    Vectorised because the bias search replays thousands of candidates; a test holds it equal
    to `decide`.
    """
    wide = probs.astype(np.float64)  # as `decide` compares: Python floats, not float32 thresholds
    ignore = wide[:, 2] > thresholds.ignore_probability
    respond = wide[:, 1] > thresholds.respond_probability
    return np.where(ignore, 2, np.where(respond, 1, 0))


def replay_metrics(probs: np.ndarray, data: ChunkFeatures, thresholds=None) -> dict[str, float | None]:
    """`eval states`' three rates for these per-chunk probabilities [S, 3]."""
    from assistant.dialogue import DecisionThresholds

    codes = chunk_decisions(probs, thresholds or DecisionThresholds())

    def outcome(t: int) -> TurnOutcome:
        turn = codes[data.turn_starts[t]:data.turn_starts[t + 1]]
        decided = np.flatnonzero(turn)
        if not decided.size:
            return TurnOutcome(None, None)
        first = int(decided[0])
        return TurnOutcome(first, "respond" if turn[first] == 1 else "ignore")

    return state_rates((entry, outcome(t)) for t, entry in enumerate(data.entries))


def replay_score(metrics: dict[str, float | None]) -> float:
    """Mean of the respond rate, the ignore rate and 1 - the false-end rate (missing ones skipped)."""
    parts = [metrics["respond_within_2_chunks"], metrics["ignore_rate"],
             None if metrics["false_end_rate"] is None else 1.0 - metrics["false_end_rate"]]
    present = [p for p in parts if p is not None]
    return sum(present) / len(present) if present else 0.0


def fit_softmax(x: Tensor, y: Tensor, init_w: Tensor, init_b: Tensor, end_weight: float, l2: float,
                iterations: int) -> tuple[Tensor, Tensor]:
    """Weighted softmax regression [3, H], [3] by L-BFGS on standardised features (deterministic)."""
    mu, sigma = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sigma
    a = (init_w * sigma).clone().requires_grad_(True)  # the same function in standardised units
    c = (init_b + init_w @ mu).clone().requires_grad_(True)
    weights = torch.tensor([1.0, end_weight, end_weight])
    optimizer = torch.optim.LBFGS([a, c], max_iter=iterations, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ a.T + c, y, weight=weights) + l2 * a.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    w = (a / sigma).detach()
    return w, (c - w @ mu).detach()


@dataclass(frozen=True)
class HeadChoice:
    weight: Tensor
    bias: Tensor
    report: dict


def choose_head(train: ChunkFeatures, valid: ChunkFeatures, init_w: Tensor, init_b: Tensor,
                config: HeadFitConfig) -> HeadChoice:
    """Best (class weight, L2, bias offsets) by the replayed validation score; the start head competes."""
    def probs(w: Tensor, b: Tensor) -> np.ndarray:
        return torch.softmax(valid.features @ w.T + b, dim=-1).numpy()

    start = replay_metrics(probs(init_w, init_b), valid)
    best = HeadChoice(init_w, init_b, {"fit": "start head", "valid": start, "score": replay_score(start)})
    offsets = sorted(itertools.product(config.bias_offsets, repeat=2), key=lambda d: abs(d[0]) + abs(d[1]))
    for end_weight, l2 in itertools.product(config.end_class_weights, config.l2_strengths):
        w, b = fit_softmax(train.features, train.labels, init_w, init_b, end_weight, l2,
                           config.lbfgs_iterations)
        for d_respond, d_ignore in offsets:
            shifted = b + torch.tensor([0.0, d_respond, d_ignore])
            metrics = replay_metrics(probs(w, shifted), valid)
            score = replay_score(metrics)
            if score > best.report["score"] + 1e-9:
                best = HeadChoice(w, shifted, {"fit": {"end_class_weight": end_weight, "l2": l2,
                                                       "respond_bias_offset": d_respond,
                                                       "ignore_bias_offset": d_ignore},
                                               "valid": metrics, "score": score})
        logger.info("state-head: weight %g, l2 %g: best so far %s", end_weight, l2, best.report)
    best.report["valid_start"] = start
    return best


def extra_split_features(parts, turns, data_dir: Path, extras: tuple[Path, ...], split: str, config: HeadFitConfig,
                         run_dir: Path, source_sha: str) -> list[ChunkFeatures]:
    """`split` features of further data directories. Their train turns (`--extra-data`, e.g.
    `train data --seed 1`) leave out every text `data_dir` holds out for valid or test; their valid
    turns (`--extra-valid`, e.g. the same seed with `--valid-voices unheard`) leave out every text
    `data_dir` trains on, since a choice made on trained texts would favour memorising them."""
    if not extras:
        return []
    excluded = held_out_texts(data_dir) if split == "train" else trained_texts(data_dir)
    return [cached_features(parts, turns, extra, split, config, run_dir / f"features-extra{k}-{split}.pt",
                            source_sha, excluded)
            for k, extra in enumerate(extras, start=1)]


def fit_state_head(init: Path, data_dir: Path, llm_dir: Path, run_dir: Path, config: HeadFitConfig,
                   extra_data: tuple[Path, ...] = (), extra_valid: tuple[Path, ...] = ()) -> dict:
    """Refit the state head of a stage-3 result; writes `run_dir/result.pt` (stage 3).

    `extra_data`: more data directories whose train splits add training turns. The choice is made
    on `data_dir`'s valid split, joined by the valid splits of `extra_valid` (the same texts spoken
    by other voices make the choice less dependent on the voices it was made with)."""
    check_speed_factors(config.speed_factors)
    source = Path(init) / RESULT_NAME if Path(init).is_dir() else Path(init)
    parts, previous, causal_lm, _, turns = build_stage2(source, data_dir, llm_dir, seed=0,
                                                        device=training_device(config.device))
    if previous["stage"] != 3:
        raise ValueError(f"{init}: the state head is refitted on a stage-3 result (run stage 3 first)")
    checksum = assert_frozen(causal_lm)
    run_dir.mkdir(parents=True, exist_ok=True)
    sha = file_sha256(source)
    train = cached_features(parts, turns, data_dir, "train", config, run_dir / "features-train.pt", sha)
    extra = extra_split_features(parts, turns, data_dir, extra_data, "train", config, run_dir, sha)
    extra += [cached_features(parts, turns, data_dir, "train", config, run_dir / f"features-train-speed{f:g}.pt",
                              sha, speed=f) for f in config.speed_factors]
    train = concat_features([train, *extra])
    if any(e.kind in DIALOGUE_KINDS for e in read_manifest(data_dir, "valid")):
        valid = cached_features(parts, turns, data_dir, "valid", config, run_dir / "features-valid.pt", sha)
    else:
        logger.warning("state-head: %s has no valid dialogue turns; choosing on the train split", data_dir)
        valid = train
    valid = concat_features([valid, *extra_split_features(parts, turns, data_dir, extra_valid, "valid", config,
                                                          run_dir, sha)])
    head = parts.heads.predictor_head
    init_w, init_b = (t[:STATE_CLASSES].detach().float().cpu() for t in (head.weight, head.bias))
    choice = choose_head(train, valid, init_w, init_b, config)
    with torch.no_grad():
        head.weight[:STATE_CLASSES] = choice.weight.to(head.weight)
        head.bias[:STATE_CLASSES] = choice.bias.to(head.bias)
    assert_frozen(causal_lm, checksum)
    summary = {"train_turns": len(train.entries), "train_chunks": int(train.labels.shape[0]),
               "extra_train_turns": sum(len(x.entries) for x in extra),
               "valid_turns": len(valid.entries), **choice.report}
    save_result(run_dir / RESULT_NAME, 3, parts, previous["cmvn"],
                {**previous.get("extra", {}), "state_head": summary})
    logger.info("state-head: %s", summary)
    return summary
