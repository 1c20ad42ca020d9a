"""`freeze-omni train stage1|stage2|stage3|state-head|ctc-head|average|export`: argparse builders and handlers.

Registered in `training.cli` (STEP_PARSERS / TRAIN_HANDLERS). Arguments only build the frozen
stage configs; heavy imports happen inside the handlers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.common import LoopConfig
from training.device import training_device


def _add_speed_perturb(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--speed-perturb", type=float, nargs="+", default=(), metavar="FACTOR",
                   help=f"add copies of --data's train {what} played FACTOR times as fast (e.g. 0.9 1.1: "
                        "pitch and tempo move together), for voices outside the training range")


def _add_extra_data(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--extra-data", type=Path, nargs="+", default=(),
                   help=f"more `train data` directories (e.g. another --seed) whose train {what} are added, "
                        "less any text --data holds out for valid or test")


def _add_loop_args(p: argparse.ArgumentParser, steps: int, lr: float, batch: int) -> None:
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, loss.csv, result.pt)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=batch, help="utterances per step")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even if the run directory has a checkpoint")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training utterances")
    add_compute_args(p)


def add_compute_args(p: argparse.ArgumentParser, bf16: bool = True) -> None:
    """`--device`, `--threads` and (unless `bf16` is False) `--bf16`, shared by every training
    step's parser."""
    p.add_argument("--device", default="cpu",
                   help="torch device of the models and batches: cpu (default), cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    if bf16:
        p.add_argument("--bf16", action="store_true",
                       help="bfloat16 autocast for the forward (faster on CPUs with AVX512-BF16 or AMX and "
                            "on GPUs; on a CPU without native bfloat16 ignored with a warning)")


def loop_config(args: argparse.Namespace) -> LoopConfig:
    """The LoopConfig of parsed loop arguments (this module's and `training.tts.cli`'s); a device this
    machine cannot use is refused here, before any data or model loads."""
    training_device(args.device)
    return LoopConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps,
                      checkpoint_every_steps=args.checkpoint_every, log_every_steps=args.log_every,
                      seed=args.seed, resume=args.resume, bf16_autocast=args.bf16, device=args.device)


def add_stage1(steps: argparse._SubParsersAction) -> None:
    p = steps.add_parser("stage1", help="train the streaming encoder as chunk-wise CTC ASR")
    p.add_argument("--data", type=Path, required=True, help="data directory with manifest.jsonl")
    _add_loop_args(p, steps=3000, lr=1e-3, batch=16)
    p.add_argument("--dim", type=int, default=256, help="encoder width")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--blocks", type=int, default=6)


def add_stage2(steps: argparse._SubParsersAction) -> None:
    p = steps.add_parser("stage2", help="train encoder + adapter so the frozen LLM transcribes")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--init", type=Path, required=True, help="stage-1 run directory (or its result.pt)")
    p.add_argument("--llm-dir", type=Path, default=None, help="frozen LLM (default: the converted SmolLM2)")
    _add_loop_args(p, steps=1500, lr=5e-4, batch=4)
    p.add_argument("--encoder-frozen-steps", type=int, default=0,
                   help="train only the adapter and task vector for the first N steps")
    _add_extra_data(p, "utterances")
    p.add_argument("--freq-mask-bins", type=int, default=0,
                   help="SpecAugment: one frequency mask of up to N mel bins per utterance (0: off)")
    p.add_argument("--time-masks", type=int, default=0, help="SpecAugment: N time masks per utterance (0: off)")
    p.add_argument("--time-mask-frames", type=int, default=10, help="longest time mask, in 10 ms frames")
    _add_speed_perturb(p, "utterances")


def add_stage3(steps: argparse._SubParsersAction) -> None:
    p = steps.add_parser("stage3", help="train prompt embeddings and the state head")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--init", type=Path, required=True, help="stage-2 run directory (or its result.pt)")
    p.add_argument("--llm-dir", type=Path, default=None, help="frozen LLM (default: the converted SmolLM2)")
    _add_loop_args(p, steps=1000, lr=2e-3, batch=4)
    p.add_argument("--tail-chunks", type=int, default=1, help="silent chunks after each turn, end-labelled")
    p.add_argument("--state-loss-weight", type=float, default=1.0,
                   help="weight of the state loss against the answer loss (the prompt vectors serve both)")
    p.add_argument("--end-class-weight", type=float, default=3.0,
                   help="state cross-entropy weight of classes 1 and 2 relative to class 0")
    _add_extra_data(p, "turns")


def add_state_head(steps: argparse._SubParsersAction) -> None:
    p = steps.add_parser("state-head", help="refit the state head of a stage-3 result on cached LLM "
                                            "features, chosen by the replayed `eval states` rates on the "
                                            "valid split")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--init", type=Path, required=True, help="stage-3 run directory (or its result.pt)")
    p.add_argument("--llm-dir", type=Path, default=None, help="frozen LLM (default: the converted SmolLM2)")
    p.add_argument("--out", type=Path, required=True, help="run directory (feature caches, result.pt)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training turns")
    _add_extra_data(p, "turns")
    p.add_argument("--extra-valid", type=Path, nargs="+", default=(),
                   help="more `train data` directories whose valid splits join --data's in the choice, e.g. "
                        "the same --seed made with `--valid-voices unheard` (texts --data trains on are left out)")
    _add_speed_perturb(p, "turns")
    add_compute_args(p, bf16=False)  # no --bf16: the features must be the float32 states the engine's head reads


def add_average(steps: argparse._SubParsersAction) -> None:
    p = steps.add_parser("average", help="average the prompt vectors and state heads of stage-3 runs continued "
                                         "from one result (refit the head on the average with `state-head`)")
    p.add_argument("--init", type=Path, nargs="+", required=True,
                   help="two or more stage-3 run directories (or result.pt files) that share their encoder")
    p.add_argument("--out", type=Path, required=True, help="run directory to write result.pt into")


def add_export(steps: argparse._SubParsersAction) -> None:
    p = steps.add_parser("export", help="write a stage-2/3 result as a model directory (released layout)")
    p.add_argument("--init", type=Path, required=True, help="run directory (or result.pt) of stage 2 or 3")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--speech-from", type=Path, default=None,
                   help="copy decoder/ and codec/ from this model directory (default: random placeholders)")
    p.add_argument("--ctc-head", type=Path, nargs="+", default=None,
                   help="a `train ctc-head` file (RUN/ctc_head.pt) that `transcribe` decodes with; "
                        "several are written as one ensemble (the mean of their log-probabilities)")


def add_ctc_head(steps: argparse._SubParsersAction) -> None:
    p = steps.add_parser("ctc-head", help="train a character CTC head on the frozen encoder of a stage-2/3 "
                                          "result (transcribe decodes with it beside the LLM)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--init", type=Path, required=True, help="stage-2/3 run directory (or its result.pt)")
    _add_extra_data(p, "utterances")
    _add_speed_perturb(p, "utterances")
    p.add_argument("--hidden", type=int, default=384, help="width of the head's convolutions")
    p.add_argument("--kernel-frames", type=int, default=9,
                   help="convolution width in encoder frames (40 ms each)")
    p.add_argument("--layers", type=int, default=3, help="convolutions in a row")
    p.add_argument("--lookahead-frames", type=int, default=4,
                   help="frames each convolution sees ahead (0: causal; transcribe reads whole files, "
                        "so it may look ahead)")
    p.add_argument("--dropout", type=float, default=0.1,
                   help="dropout before every convolution but the first and before the output layer")
    _add_loop_args(p, steps=6000, lr=2e-3, batch=32)


def _setup(args: argparse.Namespace) -> None:
    from training.device import set_torch_threads

    set_torch_threads(args.threads)


def _llm_dir(args: argparse.Namespace) -> Path:
    if args.llm_dir is not None:
        return args.llm_dir
    from quantized_models.smollm2 import prepare_smollm2

    return prepare_smollm2()


def _report(summary: dict) -> int:
    print(json.dumps(summary))
    return 0


def run_stage1(args: argparse.Namespace) -> int:
    from training.model_config import EncoderGeometry
    from training.stage1_encoder import Stage1Config, train_stage1

    _setup(args)
    config = Stage1Config(geometry=EncoderGeometry(args.dim, args.heads, args.ffn, args.blocks),
                          loop=loop_config(args), batch_utterances=args.batch, train_limit=args.train_limit)
    return _report(train_stage1(args.data, args.out, config))


def run_stage2(args: argparse.Namespace) -> int:
    from training.stage2_connect import Stage2Config, train_stage2

    _setup(args)
    config = Stage2Config(loop=loop_config(args), batch_utterances=args.batch, train_limit=args.train_limit,
                          encoder_frozen_steps=args.encoder_frozen_steps, extra_data=tuple(args.extra_data),
                          freq_mask_bins=args.freq_mask_bins, time_masks=args.time_masks,
                          time_mask_frames=args.time_mask_frames, speed_factors=tuple(args.speed_perturb))
    return _report(train_stage2(args.init, args.data, _llm_dir(args), args.out, config))


def run_stage3(args: argparse.Namespace) -> int:
    from training.stage3_dialogue import Stage3Config, train_stage3

    _setup(args)
    config = Stage3Config(loop=loop_config(args), batch_utterances=args.batch, train_limit=args.train_limit,
                          tail_chunks=args.tail_chunks, state_loss_weight=args.state_loss_weight,
                          end_class_weight=args.end_class_weight, extra_data=tuple(args.extra_data))
    return _report(train_stage3(args.init, args.data, _llm_dir(args), args.out, config))


def run_state_head(args: argparse.Namespace) -> int:
    from training.state_head import HeadFitConfig, fit_state_head

    _setup(args)
    training_device(args.device)
    return _report(fit_state_head(args.init, args.data, _llm_dir(args), args.out,
                                  HeadFitConfig(train_limit=args.train_limit,
                                                speed_factors=tuple(args.speed_perturb), device=args.device),
                                  tuple(args.extra_data), tuple(args.extra_valid)))


def run_average(args: argparse.Namespace) -> int:
    from training.average import write_average

    return _report(write_average(list(args.init), args.out))


def run_ctc_head(args: argparse.Namespace) -> int:
    from training.ctc_head import CtcHeadConfig, train_ctc_head

    _setup(args)
    if min(args.hidden, args.kernel_frames, args.layers) < 1:
        raise ValueError("--hidden, --kernel-frames and --layers must be at least 1")
    if not 0 <= args.lookahead_frames < args.kernel_frames:
        raise ValueError("--lookahead-frames must be 0 to --kernel-frames - 1")
    if not 0 <= args.dropout < 1:
        raise ValueError("--dropout must be at least 0 and below 1")
    config = CtcHeadConfig(loop=loop_config(args), batch_utterances=args.batch, hidden=args.hidden,
                           kernel_frames=args.kernel_frames, layers=args.layers,
                           lookahead_frames=args.lookahead_frames, extra_data=tuple(args.extra_data),
                           train_limit=args.train_limit, speed_factors=tuple(args.speed_perturb),
                           dropout=args.dropout)
    return _report(train_ctc_head(args.init, args.data, args.out, config))


def run_export(args: argparse.Namespace) -> int:
    from training.export import export_model_dir

    out = export_model_dir(args.init, args.out, speech_from=args.speech_from, ctc_head=args.ctc_head)
    print(f"wrote {out}")
    return 0


STAGE_PARSERS = {"stage1": add_stage1, "stage2": add_stage2, "stage3": add_stage3,
                 "state-head": add_state_head, "ctc-head": add_ctc_head, "average": add_average,
                 "export": add_export}
"""Step name -> function adding its subparser (merged into `training.cli.STEP_PARSERS`)."""
STAGE_HANDLERS = {"stage1": run_stage1, "stage2": run_stage2, "stage3": run_stage3,
                  "state-head": run_state_head, "ctc-head": run_ctc_head, "average": run_average,
                  "export": run_export}
"""Step name -> handler (merged into `training.cli.TRAIN_HANDLERS`)."""
