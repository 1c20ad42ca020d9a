"""Full-duplex figures on a virtual PulseAudio card: per-turn latency, AEC echo reduction,
barge-in reaction. Writes the section `duplex-tiny-cpu` of docs/BENCHMARKS.md.

    python -m benchmarks.duplex_figures [--questions 10] [--barge-ins 5]

The daemon runs its real loop (PortAudio streams, webrtcvad, pywebrtc-audio AEC3) on the
official tiny fixture (random weights, `turn_end: vad`) on this machine's CPU, against the
virtual card of the test-suite (`tests/pulse_harness.py`). Needs pulseaudio, pacat, pactl.

- Echo run: the speaker leaks back into the microphone (40 ms, full volume: about −37 dBFS at
  the microphone); each question waits for the previous answer to end. Echo reduction is the
  canceller's microphone power over its output power on every played-over frame (after AEC3
  and the residual gate).
- Barge-in run (no echo path, AEC on): after one answer heard to its end, a second question
  is played 0.8 s into each answer; reaction is the time from the daemon's cut (its respond
  decision flushes the queue) to the end of the old answer's sound on `spk.monitor`.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from assistant.bench import write_section
from assistant.conversation import Conversation
from assistant.daemon import Daemon
from assistant.daemon_config import DaemonSettings, DialogueSettings, EchoSettings, TurnEnd
from assistant.engine import Engine, EngineOptions
from assistant.run_daemon import DeviceEchoPolicy, build_vad
from audio_io.aec import WebRtcEchoCanceller
from audio_io.duplex import DuplexStream
from quantized_models.model_dir import load_models
from quantized_models.sampling import TextSamplingConfig
from tests.conftest import TINY_FIXTURE
from tests.pulse_harness import INPUT_DEVICE, MONITOR_RATE_HZ, OUTPUT_DEVICE, PulseHarness, wait_until
from tests.test_daemon_echo import _wait_quiet

logger = logging.getLogger(__name__)
SECTION = "duplex-tiny-cpu"
SILENT_LEVEL = 1e-3  # mean |x| of a 10 ms window of the speaker monitor below which it is silent
QUIET_WINDOWS = 5  # 50 ms of silence ends the old answer
LATENCY_KEYS = ("decision_to_first_text_token_ms", "decision_to_first_speech_token_ms",
                "decision_to_first_pcm_ms", "decision_to_first_played_ms")


def _engine(max_new_tokens: int) -> Engine:
    models = load_models(TINY_FIXTURE / "checkpoints", TINY_FIXTURE / "llm", torch.device("cpu"),
                         torch.float32)
    return Engine(models, EngineOptions(text_sampling=TextSamplingConfig(1.0, 1, 0.0), speech_top_k=1,
                                        max_new_tokens=max_new_tokens, max_speech_tokens=120))


class _Running:
    """A daemon thread over a duplex stream on the virtual card."""

    def __init__(self, engine: Engine, canceller: WebRtcEchoCanceller | None) -> None:
        self.settings = DaemonSettings(echo=EchoSettings(aec_enabled=canceller is not None),
                                       dialogue=DialogueSettings(turn_end=TurnEnd.VAD))
        self.audio = DuplexStream(INPUT_DEVICE, OUTPUT_DEVICE, echo_canceller=canceller)
        self.conversation = Conversation(engine, seed=0)
        self.daemon = Daemon(self.conversation, self.audio, build_vad(self.settings),
                             DeviceEchoPolicy(self.audio, True), self.settings)  # full duplex either way
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.daemon.run, args=(self._stop.is_set,), daemon=True)

    def __enter__(self) -> "_Running":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.audio.close()


def echo_run(pulse: PulseHarness, engine: Engine, question: np.ndarray, rate: int, questions: int) -> dict:
    pulse.add_echo_path(40, 100)
    canceller = WebRtcEchoCanceller()
    with _Running(engine, canceller) as run:
        for i in range(questions):
            pulse.play_into(question, rate).wait()
            wait_until(lambda: run.daemon.counters.turns_answered > i, 10.0)
            _wait_quiet(run.conversation, run.audio, 1.0, 30.0)
        records = [r for r in run.daemon.turn_log if not r["barge_in"]]
        return {"records": records, "counters": run.daemon.counters,
                "erle_db": canceller.echo_return_loss_enhancement_db,
                "gated_frames": canceller.gated_frames,
                "played_over_frames": canceller.active_reference_frames,
                "near_end_frames": canceller.near_end.near_end_frames}


def barge_in_run(pulse: PulseHarness, engine: Engine, question: np.ndarray, rate: int,
                 cuts: int) -> list[float]:
    reactions_ms = []
    # no echo path in this room: AEC3 alone would suppress the user under the answer, the
    # canceller's near-end detector lets them through
    with _Running(engine, WebRtcEchoCanceller()) as run:
        flush = run.audio.flush_playback
        cut_at: dict[str, int] = {}

        def flush_and_mark() -> int:  # the daemon's cut: remember where the monitor was
            cut_at.setdefault("bytes", pulse.recorded_bytes("spk"))
            return flush()

        run.audio.flush_playback = flush_and_mark
        # one answer heard to its end first: the canceller learns how the speaker couples into
        # the microphone from playback without the user (as after an assistant's greeting)
        pulse.play_into(question, rate).wait()
        wait_until(lambda: run.daemon.counters.turns_answered > 0, 10.0)
        _wait_quiet(run.conversation, run.audio, 1.0, 30.0)
        for i in range(cuts):
            answered = run.daemon.counters.turns_answered
            pulse.play_into(question, rate).wait()
            wait_until(lambda: run.daemon.counters.turns_answered > answered, 10.0)
            time.sleep(0.8)
            cut_at.clear()
            cuts_before = run.daemon.counters.barge_ins
            pulse.play_into(question, rate).wait()
            if not wait_until(lambda: run.daemon.counters.barge_ins > cuts_before, 10.0):
                logger.warning("barge-in %d did not happen", i)
                break
            time.sleep(0.3)
            after = pulse.recording("spk", cut_at["bytes"])
            reactions_ms.append(_silence_onset_ms(after))
            _wait_quiet(run.conversation, run.audio, 1.0, 30.0)
    return reactions_ms


def _silence_onset_ms(recording: np.ndarray) -> float:
    window = MONITOR_RATE_HZ // 100
    n = len(recording) // window
    loud = np.abs(recording[: n * window]).reshape(n, window).mean(axis=1) > SILENT_LEVEL  # (n,)
    for start in range(max(0, n - QUIET_WINDOWS + 1)):  # the first 50 ms of silence, not a soft syllable
        if not loud[start:start + QUIET_WINDOWS].any():
            return float(10 * start)
    return float("nan")


def _stats(values: list[float]) -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "–"
    p90 = float(np.percentile(values, 90))
    return f"{statistics.median(values):.0f} / {p90:.0f}"


def render(echo: dict, reactions_ms: list[float], questions: int) -> str:
    rows = [f"| decision → {key.removeprefix('decision_to_').removesuffix('_ms').replace('_', ' ')} | "
            f"{_stats([r[key] for r in echo['records']])} |" for key in LATENCY_KEYS]
    c = echo["counters"]
    return "\n".join([
        "### Full duplex on a virtual sound card (tiny fixture, CPU)", "",
        f"`python -m benchmarks.duplex_figures`; {time.strftime('%Y-%m-%d')}; the daemon's real loop "
        f"(PortAudio, webrtcvad, AEC3) on `{torch.get_num_threads()}` CPU threads "
        "with the tiny random-weight "
        "model (`turn_end: vad`, so `user end → decision` is the VAD stop itself).", "",
        f"Per-turn latency over {len(echo['records'])} answered questions (median / p90, ms):", "",
        "| stage | ms |", "|---|---|", *rows, "",
        f"Echo: the answer leaks back into the microphone at full volume. Over {questions} questions the "
        f"canceller reduced the echo by **{echo['erle_db']:.1f} dB** (microphone over output power on "
        f"{echo['played_over_frames']} played-over 10 ms frames; {echo['gated_frames']} of them silenced by "
        f"the residual gate, {echo['near_end_frames']} taken for the user); the daemon answered "
        f"{c.turns_answered} turns, heard {c.interruptions_heard} "
        f"interruptions (ignored {c.ignored_interruptions}, answered {c.interruptions_answered}) and cut "
        f"{c.barge_ins} answers.", "",
        f"Barge-in reaction (daemon's cut → old answer silent on `spk.monitor`; no echo path, AEC on), "
        f"{len(reactions_ms)} cuts: "
        f"median / p90 **{_stats(reactions_ms)} ms** (one output block is 20 ms; the rest is the device "
        "latency of the virtual card and its monitor).", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--barge-ins", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/BENCHMARKS.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    question, rate = soundfile.read(TINY_FIXTURE / "inputs/question.wav", dtype="float32")
    engine = _engine(max_new_tokens=8)
    with tempfile.TemporaryDirectory() as tmp:
        with PulseHarness(Path(tmp) / "echo") as pulse:
            echo = echo_run(pulse, engine, question, rate, args.questions)
        with PulseHarness(Path(tmp) / "cut") as pulse:
            reactions = barge_in_run(pulse, _engine(max_new_tokens=24), question, rate, args.barge_ins)
    text = render(echo, reactions, args.questions)
    print(text)
    write_section(args.out, SECTION, text)
    print(f"wrote section {SECTION!r} of {args.out}")


if __name__ == "__main__":
    main()
