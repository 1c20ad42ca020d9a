"""What every training stage shares: the loop, resumable checkpoints, loss logs, frozen-LLM checks.

A stage supplies the trainable modules and a `step_fn(step) -> (loss, metrics)`; `train_loop`
does the rest. Batches are drawn from `batch_rng(seed, step)`, so a resumed run sees the same
batches as an uninterrupted one without saving any data-loader state. A checkpoint is written
every `checkpoint_every_steps` steps and when SIGTERM arrives; `resume=True` continues from it.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.device import check_on_device, rng_state, set_rng_state, training_device

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
LOSS_CSV_NAME = "loss.csv"
LOSS_PNG_NAME = "loss.png"
RESULT_NAME = "result.pt"


class FrozenLlmChangedError(RuntimeError):
    """The frozen LLM's weights changed or became trainable during a stage."""


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings shared by every stage."""

    steps: int
    """Optimizer steps in total (a resumed run stops at the same step)."""
    lr: float = 1e-3
    """Peak AdamW learning rate (after warmup)."""
    warmup_steps: int = 100
    """Linear warmup; then cosine decay to 10 % of `lr` at `steps`."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 5.0
    """Global gradient-norm clip (the released recipe's value)."""
    checkpoint_every_steps: int = 200
    """Steps between resumable checkpoints."""
    log_every_steps: int = 10
    """Steps between rows of `loss.csv` (and INFO lines)."""
    seed: int = 0
    """Seed of initialisation and of every batch draw."""
    resume: bool = True
    """Continue from `checkpoint.pt` of the run directory when it exists."""
    stop_at_step: int | None = None
    """Checkpoint and return at this step (a later call resumes); None: run to `steps`."""
    bf16_autocast: bool = False
    """Run each step's forward under bfloat16 autocast (weights and optimizer stay float32).
    On a CPU with AVX512-BF16 it made a stage-1 step 1.5-2x faster here; a CPU without native
    bfloat16 emulates it over 10x slower, so there the loop warns and trains in float32."""
    device: str = "cpu"
    """Torch device every trained module, the frozen LLM and each batch live on (cpu, cuda,
    cuda:1); results are written with CPU tensors either way (checkpoints keep the run device's)."""

    def validate(self) -> None:
        if self.steps < 1 or self.checkpoint_every_steps < 1 or self.log_every_steps < 1:
            raise ValueError("steps, checkpoint_every_steps and log_every_steps must be at least 1")
        if not self.lr > 0 or self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be positive and warmup_steps non-negative")
        training_device(self.device)

    @property
    def torch_device(self) -> torch.device:
        return training_device(self.device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), as oneDNN sees it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_bf16(config: LoopConfig, device: torch.device) -> bool:
    """Whether the loop really autocasts: not on a CPU that would only emulate bfloat16."""
    if not config.bf16_autocast:
        return False
    if device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning("bf16 autocast asked for, but this CPU has no native bfloat16 (AVX512-BF16 or AMX): "
                       "emulated, a stage-2 step took over 80 s instead of 7 s in float32; training in "
                       "float32 instead (leave out --bf16 to silence this)")
        return False
    return True


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of step `step`'s batch: the same on a resumed run."""
    return np.random.default_rng([seed, step])


def lr_factor(step: int, config: LoopConfig) -> float:
    """Warmup then cosine decay to 0.1 of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def weights_checksum(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names and bytes), in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every parameter; returns the module."""
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def assert_frozen(llm: nn.Module, checksum: str | None = None) -> str:
    """Raise FrozenLlmChangedError if any LLM parameter is trainable or its weights changed.

    Returns:
        The current checksum (pass it back in after the stage).
    """
    trainable = [name for name, p in llm.named_parameters() if p.requires_grad]
    if trainable:
        raise FrozenLlmChangedError(f"LLM parameters are trainable: {trainable[:5]}")
    now = weights_checksum(llm)
    if checksum is not None and now != checksum:
        raise FrozenLlmChangedError("the frozen LLM's weights changed during training")
    return now


class _StopFlag:
    """Set by SIGTERM/SIGINT so the loop checkpoints and returns instead of dying mid-step."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        logger.warning("signal %d: checkpointing after this step", signum)
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def config_record(config) -> dict:
    """`asdict(config)` with its `extra_data` paths as strings, as results record a stage's settings."""
    record = asdict(config)
    if "extra_data" in record:
        record["extra_data"] = [str(d) for d in record["extra_data"]]
    return record


def save_atomic(obj: object, path: Path) -> None:
    """torch.save through a temporary file, so a kill never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


class LossLog:
    """`loss.csv` rows (step, elapsed_s, lr, loss, extra metrics) and the PNG curve."""

    def __init__(self, run_dir: Path, resume_step: int) -> None:
        self.path = run_dir / LOSS_CSV_NAME
        self.rows: list[dict[str, float]] = []
        if resume_step > 0 and self.path.is_file():
            with self.path.open(newline="") as f:
                self.rows = [
                    {k: int(v) if v.lstrip("-").isdigit() else float(v) for k, v in row.items()}
                    for row in csv.DictReader(f)
                    if float(row["step"]) <= resume_step
                ]
        self._write()

    def add(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        if not self.rows:
            return
        names = list(dict.fromkeys(k for row in self.rows for k in row))
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=names)
            writer.writeheader()
            writer.writerows(self.rows)

    def plot(self, title: str) -> Path | None:
        """Write `loss.png` (every metric whose name contains 'loss'); None without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            logger.warning("matplotlib missing (pip install '.[train]'); no loss curve written")
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [row["step"] for row in self.rows]
        for name in [k for k in self.rows[0] if "loss" in k] if self.rows else []:
            ax.plot(steps, [row.get(name, float("nan")) for row in self.rows], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
        out = self.path.with_name(LOSS_PNG_NAME)
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


@dataclass
class LoopResult:
    """How a `train_loop` call ended."""

    step: int
    """Steps done (== config.steps when finished)."""
    finished: bool
    """False when stopped early by a signal (a checkpoint was written)."""
    last_metrics: dict[str, float]
    seconds: float
    """Wall time of this call (not of earlier, resumed-from calls)."""


def _save_checkpoint(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                     step: int, config: LoopConfig) -> None:
    save_atomic({"step": step, "modules": {k: m.state_dict() for k, m in modules.items()},
                 "optimizer": optimizer.state_dict(), "rng": rng_state(), "config": asdict(config)}, path)


def _resume(path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> int:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for name, module in modules.items():
        module.load_state_dict(ckpt["modules"][name], strict=True)
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    logger.info("resumed %s at step %d", path, ckpt["step"])
    return int(ckpt["step"])


def train_loop(
    run_dir: Path,
    modules: dict[str, nn.Module],
    step_fn: Callable[[int], tuple[torch.Tensor, dict[str, float]]],
    config: LoopConfig,
    frozen: Iterable[nn.Module] = (),
    title: str = "training loss",
) -> LoopResult:
    """Optimise the trainable parameters of `modules` for `config.steps` steps.

    Args:
        run_dir: holds `checkpoint.pt`, `loss.csv` and `loss.png`.
        modules: name -> module; every parameter with requires_grad is trained, and the
            state of all of them is checkpointed.
        step_fn: builds step `step`'s batch (from `batch_rng`) and returns (loss, metrics).
        config: optimisation settings.
        frozen: modules that must not change (the LLM); checked before and after.
    """
    config.validate()
    run_dir.mkdir(parents=True, exist_ok=True)
    frozen = list(frozen)
    check_on_device([*modules.values(), *frozen], config.torch_device)
    sums = [assert_frozen(m) for m in frozen]
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no module parameter requires grad")
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), eps=1e-6,
                                  weight_decay=config.weight_decay)
    ckpt_path = run_dir / CHECKPOINT_NAME
    step = _resume(ckpt_path, modules, optimizer) if config.resume and ckpt_path.is_file() else 0
    log = LossLog(run_dir, step)
    bf16 = autocast_bf16(config, params[0].device)
    start, metrics = time.monotonic(), {}
    with _StopFlag() as stop:
        last = config.steps if config.stop_at_step is None else min(config.steps, config.stop_at_step)
        while step < last and not stop.raised:
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_factor(step, config)
            for module in modules.values():
                module.train(any(p.requires_grad for p in module.parameters()))
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(params[0].device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, metrics = step_fn(step)
            loss.float().backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
            optimizer.step()
            step += 1
            if step % config.log_every_steps == 0 or step == config.steps:
                row = {"step": step, "elapsed_s": round(time.monotonic() - start, 2),
                       "lr": optimizer.param_groups[0]["lr"], "loss": loss.item(), "grad_norm": grad_norm}
                log.add(row | metrics)
                logger.info("step %d loss %.4f %s", step, loss.item(),
                            " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if step % config.checkpoint_every_steps == 0 or stop.raised:
                _save_checkpoint(ckpt_path, modules, optimizer, step, config)
    if step < config.steps:
        _save_checkpoint(ckpt_path, modules, optimizer, step, config)
    for module, checksum in zip(frozen, sums):
        assert_frozen(module, checksum)
    for module in modules.values():
        module.eval()
    if step >= config.steps:
        _save_checkpoint(ckpt_path, modules, optimizer, step, config)
        log.plot(title)
    return LoopResult(step, step >= config.steps, metrics, time.monotonic() - start)
