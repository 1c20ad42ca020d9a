"""`freeze-omni train average`: the mean of stage-3 results that share everything stage 3 froze.

Stage-3 runs continued from one result (other seeds, other `--extra-data`) keep its encoder,
adapter, task vector and LLM and move only the prompt vectors and the state head, so their
weight mean (a "model soup") is a model of the same kind. The kept model is the 18th session's
average of three such runs with its head then refitted by `train state-head` (training/README.md).
Results that differ anywhere else are refused: their prompt vectors belong to different encoders.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from training.common import RESULT_NAME, save_atomic
from training.model_config import load_result

logger = logging.getLogger(__name__)

AVERAGED_KEYS = ("prompt_embeddings.weight", "predictor_head.weight", "predictor_head.bias")
"""What stage 3 trains (`training.stage3_dialogue`), so what may differ between averaged runs."""


def average_stage3_results(sources: list[Path]) -> dict:
    """One result whose AVERAGED_KEYS are the float32 mean of `sources`' (run directories or
    result.pt files); every other entry is the first source's.

    Raises:
        ValueError: fewer than two sources, a source that is not a stage-3 result, or sources
            that differ outside AVERAGED_KEYS.
    """
    if len(sources) < 2:
        raise ValueError("give at least two stage-3 results to average")
    results = [load_result(source) for source in sources]
    for source, result in zip(sources, results):
        if result.get("stage") != 3:
            raise ValueError(f"{source}: a stage-{result.get('stage')} result; only stage-3 results are averaged")
    first = results[0]
    for source, result in zip(sources[1:], results[1:]):
        _check_shared(sources[0], first["state"], source, result["state"])
    state = dict(first["state"])
    for key in AVERAGED_KEYS:
        state[key] = torch.stack([result["state"][key].float() for result in results]).mean(0)
    logger.info("averaged %s of %d stage-3 results", ", ".join(AVERAGED_KEYS), len(results))
    return first | {"state": state,
                    "extra": {"config": {"average_of": [str(source) for source in sources]},
                              "summary": {"results": len(results)}}}


def _check_shared(first_source: Path, first: dict, source: Path, state: dict) -> None:
    """Refuse `state` unless it equals `first` outside AVERAGED_KEYS (float16 artifacts compare
    by value, as a float32 run continued from one holds the same numbers)."""
    if set(state) != set(first):
        raise ValueError(f"{source} and {first_source} hold different parameters: not runs of one model")
    for key, value in first.items():
        if key not in AVERAGED_KEYS and not torch.equal(value.float(), state[key].float()):
            raise ValueError(f"{source}: {key} differs from {first_source}'s; only stage-3 runs continued "
                             "from the same result (same encoder and adapter) can be averaged")


def write_average(sources: list[Path], run_dir: Path) -> dict:
    """Write `run_dir/result.pt` (the mean of `sources`); returns its summary."""
    result = average_stage3_results(sources)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_atomic(result, run_dir / RESULT_NAME)
    return {"out": str(run_dir / RESULT_NAME)} | result["extra"]["summary"]
