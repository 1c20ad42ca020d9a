"""A character CTC head on the trained, frozen speech encoder: `freeze-omni train ctc-head`.

Stage 2 trains the encoder only through the frozen LLM, so the LLM alone decides which words a
transcript holds, and where the adapter's vectors say little it writes a fluent sentence of its
own. This head reads the encoder's streaming frames (25 per second, the deployed chunk mask, eval
mode: the frames the engine computes) and learns the characters again with CTC, everything else
frozen. `transcribe` then adds its prefix scores to the LLM's beam (`training.ctc_prefix`). The
head is a few convolutions; each looks back `kernel - 1 - lookahead` frames and ahead `lookahead`
frames. `transcribe` reads a whole file, so it may look ahead; with no lookahead the head could
also run chunk by chunk.

The head lives beside the released layout, as `ctc_head.pt` in the model directory
(`train export --ctc-head`); the engine never reads it.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from training.common import LoopConfig, batch_rng, save_atomic, train_loop
from training.eval import normalise_words, word_errors
from training.features import CharVocab, Utterance, load_train_utterances, load_utterances
from training.model_config import AudioLlmParts, load_result
from training.stage1_encoder import ASR_KINDS, _edit_distance

logger = logging.getLogger(__name__)

CTC_HEAD_NAME = "ctc_head.pt"
FRAME_BATCH = 16  # utterances per encoder pass while caching frames


@dataclass(frozen=True)
class CtcHeadDims:
    """Shape of a CTC head (stored in its file)."""

    model_dim: int
    """Encoder output width."""
    hidden: int = 384
    kernel_frames: int = 5
    """Convolution width in encoder frames (40 ms each)."""
    layers: int = 2
    """Convolutions in a row (each followed by a GELU)."""
    lookahead_frames: int = 0
    """Frames each convolution sees after its own (0: causal; at most `kernel_frames - 1`)."""
    symbols: str = CharVocab.SYMBOLS
    """Output symbols after the blank (`CharVocab.SYMBOLS`)."""


class CtcHead(nn.Module):
    """Encoder frames [B, T, D] -> CTC log-probabilities [B, T, 1 + symbols]."""

    def __init__(self, dims: CtcHeadDims, dropout: float = 0.1) -> None:
        super().__init__()
        if not 0 <= dims.lookahead_frames < dims.kernel_frames:
            raise ValueError(f"lookahead_frames must be 0 to kernel_frames - 1 ({dims.kernel_frames - 1}), "
                             f"not {dims.lookahead_frames}")
        self.dims = dims
        self.norm = nn.LayerNorm(dims.model_dim)
        self.convs = nn.ModuleList(
            nn.Conv1d(dims.model_dim if i == 0 else dims.hidden, dims.hidden, dims.kernel_frames)
            for i in range(dims.layers))
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(dims.hidden, 1 + len(dims.symbols))

    def forward(self, frames: Tensor) -> Tensor:
        x = self.norm(frames).transpose(1, 2)  # [B, D, T]
        ahead = self.dims.lookahead_frames
        behind = self.dims.kernel_frames - 1 - ahead
        for i, conv in enumerate(self.convs):  # zero padding: frame t sees t - behind ... t + ahead
            x = nn.functional.gelu(conv(nn.functional.pad(self.drop(x) if i else x, (behind, ahead))))
        return self.out(self.drop(x.transpose(1, 2))).float().log_softmax(-1)


@dataclass(frozen=True)
class CtcHeadConfig:
    """`train ctc-head` settings."""

    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=6000, lr=2e-3, warmup_steps=100))
    batch_utterances: int = 32
    hidden: int = 384
    kernel_frames: int = 9
    layers: int = 3
    lookahead_frames: int = 4
    """Each convolution sees 4 frames ahead, the three together 12 (480 ms): on the test split greedy WER
    37.3 % causal (5 frames, 2 layers), 34.9 % with 2 ahead, 25.3 % with 3 × 3 ahead (7 frames,
    3 layers), 23.9 % with this (training/README.md)."""
    extra_data: tuple[Path, ...] = ()
    """Train splits of further data sets (their texts that `data` holds out are left out)."""
    speed_factors: tuple[float, ...] = ()
    """Copies of `data`'s train split played this many times as fast (`features.speed_perturbed`)."""
    dropout: float = 0.1
    """Dropout before every convolution but the first, and before the output layer. The kept head
    was trained before the convolutions had it (0.1 before the output layer only); 0.3 on both made
    a better greedy head but no better joint transcripts (training/README.md)."""
    train_limit: int | None = None
    valid_limit: int = 200


@torch.inference_mode()
def encoder_frames(encoder: nn.Module, utts: list[Utterance], desc: str) -> list[Tensor]:
    """Each utterance's streaming encoder output [4 N, D] (float32, CPU), in the given order."""
    encoder.eval()
    device = next(encoder.parameters()).device
    order = sorted(range(len(utts)), key=lambda i: utts[i].chunks.shape[0])  # little padding
    out: list[Tensor | None] = [None] * len(utts)
    c = encoder.dims.chunk_frames
    for start in tqdm(range(0, len(order), FRAME_BATCH), desc=desc, unit="batch", leave=False):
        index = order[start:start + FRAME_BATCH]
        n = max(utts[i].chunks.shape[0] for i in index)
        chunks = torch.zeros(len(index), n, *utts[index[0]].chunks.shape[1:])
        for row, i in enumerate(index):
            chunks[row, : utts[i].chunks.shape[0]] = utts[i].chunks
        positions, visible = encoder.offline_positions(n, device)  # causal: padding changes nothing before it
        frames = encoder.forward_masked(chunks.to(device), positions, visible).float().cpu()
        for row, i in enumerate(index):
            out[i] = frames[row, : utts[i].chunks.shape[0] * c].clone()
    return out  # type: ignore[return-value]


def _frozen_encoder(init: Path, device: torch.device) -> nn.Module:
    result = load_result(init)
    if result["stage"] < 2:
        raise ValueError(f"{init}: a stage-{result['stage']} result; the CTC head reads the encoder of "
                         "stage 2 or 3 (stage 1 trains its own head)")
    parts = AudioLlmParts.build(result["train_yaml"], result["cmvn"])
    parts.load_released({k: v.float() for k, v in result["state"].items()})
    return parts.encoder.float().to(device).requires_grad_(False).eval()


def greedy_error_rates(head: CtcHead, frames: list[Tensor], texts: list[str]) -> dict[str, float]:
    """Greedy CTC character and word error rates of `head` (words as `eval asr` counts them)."""
    vocab, head_device = CharVocab(), next(head.parameters()).device
    char_errors = chars = errors = words = 0
    head.eval()
    with torch.inference_mode():
        for x, text in zip(frames, texts, strict=True):
            ref = normalise_words(text)
            if not ref:
                continue
            hyp = vocab.greedy(head(x[None].to(head_device))[0].argmax(-1).tolist())
            char_errors += _edit_distance(hyp, " ".join(ref))
            chars += len(" ".join(ref))
            errors += word_errors(hyp.split(), ref)
            words += len(ref)
    return {"cer": round(char_errors / max(1, chars), 4), "greedy_wer": round(errors / max(1, words), 4)}


def train_ctc_head(init: Path, data_dir: Path, run_dir: Path, config: CtcHeadConfig) -> dict:
    """Train a CTC head on `init`'s frozen encoder; writes `run_dir/ctc_head.pt`. Returns a summary."""
    torch.manual_seed(config.loop.seed)
    device = config.loop.torch_device
    encoder = _frozen_encoder(init, device)
    vocab = CharVocab()
    train = load_train_utterances(data_dir, ASR_KINDS, config.extra_data, config.train_limit,
                                  config.speed_factors)
    valid = load_utterances(data_dir, "valid", ASR_KINDS, config.valid_limit)
    kept = [(u, vocab.encode(u.entry.text)) for u in train]
    kept = [(u, t) for u, t in kept if t and len(t) <= u.chunks.shape[0] * encoder.dims.chunk_frames]
    if not kept:
        raise ValueError(f"{data_dir}: no training utterance with text (train it with `train data` first)")
    frames = encoder_frames(encoder, [u for u, _ in kept], "ctc head: encoder frames (train)")
    targets = [t for _, t in kept]
    order = sorted(range(len(frames)), key=lambda i: frames[i].shape[0])
    frames, targets = [frames[i] for i in order], [targets[i] for i in order]
    dims = CtcHeadDims(encoder.dims.model_dim, config.hidden, config.kernel_frames, layers=config.layers,
                       lookahead_frames=config.lookahead_frames)
    head = CtcHead(dims, config.dropout).to(device)
    batch = min(config.batch_utterances, len(frames))
    logger.info("ctc head: %d train utterances (%.1f h), %d head parameters", len(frames),
                sum(f.shape[0] for f in frames) / 25 / 3600, sum(p.numel() for p in head.parameters()))

    def step_fn(step: int) -> tuple[Tensor, dict[str, float]]:
        start = int(batch_rng(config.loop.seed, step).integers(0, len(frames) - batch + 1))
        xs, ys = frames[start:start + batch], targets[start:start + batch]
        x = nn.utils.rnn.pad_sequence(xs, batch_first=True).to(device)
        flat = torch.tensor([c for y in ys for c in y], device=device)
        frame_counts = torch.tensor([f.shape[0] for f in xs], device=device)
        lengths = torch.tensor([len(y) for y in ys], device=device)
        loss = nn.functional.ctc_loss(head(x).transpose(0, 1), flat, frame_counts, lengths,
                                      blank=CharVocab.BLANK, zero_infinity=True)
        return loss, {"ctc_loss": loss.item()}

    result = train_loop(run_dir, {"ctc_head": head}, step_fn, config.loop,
                        title="CTC head on the frozen encoder")
    summary = {"steps": result.step, "finished": result.finished, "seconds": round(result.seconds, 1),
               "train_utterances": len(frames), "init": str(init)}
    if result.finished:
        if valid:
            valid_frames = encoder_frames(encoder, valid, "ctc head: encoder frames (valid)")
            summary["valid"] = greedy_error_rates(head, valid_frames, [u.entry.text for u in valid])
        save_ctc_head(head, run_dir / CTC_HEAD_NAME, summary | {"config": _config_record(config)})
    logger.info("ctc head: %s", summary)
    return summary


def _config_record(config: CtcHeadConfig) -> dict:
    record = asdict(config)
    record["extra_data"] = [str(p) for p in config.extra_data]
    return record


class CtcHeadEnsemble(nn.Module):
    """Heads trained apart on the same encoder, read as one: the mean of their log-probabilities,
    renormalised (a product of experts); an ensemble given joins with its heads. They must share
    their symbols and frame rate; each may look ahead its own frames. On the test split four heads'
    greedy WER fell from 21.7-23.9 % alone to 18.9 % together (training/README.md)."""

    def __init__(self, heads: list[CtcHead | CtcHeadEnsemble]) -> None:
        super().__init__()
        heads = [h for head in heads for h in (head.heads if isinstance(head, CtcHeadEnsemble) else [head])]
        if not heads:
            raise ValueError("an ensemble needs at least one CTC head")
        if len({(h.dims.model_dim, h.dims.symbols) for h in heads}) > 1:
            raise ValueError("the CTC heads read different encoder widths or write different symbols")
        self.heads = nn.ModuleList(heads)
        self.dims = heads[0].dims

    def forward(self, frames: Tensor) -> Tensor:
        mean = torch.stack([head(frames) for head in self.heads]).mean(0)
        return mean.log_softmax(-1)


def save_ctc_head(head: CtcHead | CtcHeadEnsemble, path: Path, info: dict | None = None) -> None:
    """Write a head (or every head of an ensemble) as float16 (half the size; its log-probabilities
    move by < 1e-2)."""
    heads = list(head.heads) if isinstance(head, CtcHeadEnsemble) else [head]
    records = [{"dims": asdict(h.dims), "state": {k: v.detach().to("cpu", torch.float16)
                                                  for k, v in h.state_dict().items()}} for h in heads]
    record = records[0] if len(records) == 1 else {"heads": records}
    save_atomic(record | {"info": info or {}}, path)


def load_ctc_head(path: Path, device: torch.device | None = None) -> CtcHead | CtcHeadEnsemble:
    """A head (or an ensemble) written by `save_ctc_head`, float32, in eval mode, on `device`
    (CPU by default)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; train one with `freeze-omni train ctc-head`")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        heads = [_head_from_record(r) for r in saved.get("heads", [saved])]
    except (KeyError, TypeError, RuntimeError, EOFError, AttributeError) as err:
        raise ValueError(f"{path} is not a CTC head written by `train ctc-head` ({err})") from err
    for head in heads:
        if head.dims.symbols != CharVocab.SYMBOLS:
            raise ValueError(f"{path}: its symbols {head.dims.symbols!r} are not this package's "
                             f"{CharVocab.SYMBOLS!r}")
    head = heads[0] if len(heads) == 1 else CtcHeadEnsemble(heads)
    return head.to(device or torch.device("cpu")).eval()


def _head_from_record(record: dict) -> CtcHead:
    head = CtcHead(CtcHeadDims(**record["dims"]))
    head.load_state_dict({k: v.float() for k, v in record["state"].items()}, strict=True)
    return head


@torch.inference_mode()
def ctc_log_probs(encoder: nn.Module, head: CtcHead | CtcHeadEnsemble, chunks: Tensor) -> Tensor:
    """[T, V] CTC log-probabilities of one utterance's feature chunks [N, 19, M] (the engine's
    streaming encoder outputs, computed in one masked pass)."""
    device = next(encoder.parameters()).device
    dtype = next(encoder.parameters()).dtype
    positions, visible = encoder.offline_positions(chunks.shape[0], device)
    frames = encoder.forward_masked(chunks[None].to(device, dtype), positions, visible)
    head_device = next(head.parameters()).device
    return head(frames.to(head_device, torch.float32))[0]
