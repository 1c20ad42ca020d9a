"""Unplug-and-replug cycles run in a fresh process, so their memory is measured alone.

The hot-plug tests ask "does a re-open leak?". Inside the whole test run the process carries
hundreds of MB of other tests' heap, and its resident size moves by tens of MB either way while
the allocator reuses and returns it (seen in CI: +31 MB and -46 MB between two cycles of the
same test), which no bound can tell from a leak. A child process holds only what the cycles
need, so a leak is the only thing that grows.

    python -m tests.hotplug_cycles stream|daemon ROOT OUT_JSON [--cycles N]

ROOT: an empty directory for the private PulseAudio daemon. The child asserts what each cycle
must do (lost once, back within 2 s) and writes its measurements to OUT_JSON for the test.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from tests.pulse_harness import INPUT_DEVICE, OUTPUT_DEVICE, PulseHarness, settle

BACK_WITHIN_S = 2.0


def settled_size() -> dict[str, int]:
    """Threads, open file descriptors, live Python objects and resident kB once freed heap went
    back to the OS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    status = Path("/proc/self/status").read_text()
    return {"threads": len(os.listdir("/proc/self/task")), "fds": len(os.listdir("/proc/self/fd")),
            "objects": len(gc.get_objects()), "rss_kb": int(status.split("VmRSS:")[1].split()[0])}


def wait_until(predicate, timeout_s: float, poll_s: float = 0.01) -> float:
    """Seconds until predicate() held; AssertionError after timeout_s."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(poll_s)
    return time.monotonic() - start


class _LossCounter(logging.Handler):
    """Counts 'audio device lost' warnings (the loss must be reported once per unplug)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.losses = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.losses += "audio device lost" in record.getMessage()


def stream_cycles(pulse: PulseHarness, cycles: int) -> dict:
    """A bare `DuplexStream` playing a tone loses the microphone or the speaker, then gets it back."""
    from audio_io.duplex import DuplexStream

    tone = (0.2 * np.sin(2 * np.pi * 300 * np.arange(48_000) / 24_000)).astype(np.float32)
    sizes, back_s = [], []
    with DuplexStream(INPUT_DEVICE, OUTPUT_DEVICE) as stream:
        settle(stream)
        for cycle in range(cycles):
            sink = "spk" if cycle % 2 else "mic"
            stream.play(tone)  # an answer is playing when the device goes
            time.sleep(0.3)
            played_before = stream.played_samples_24k
            pulse.unload_sink(sink)
            wait_until(lambda: not stream.healthy, timeout_s=2.0)
            assert not stream.reopen(), f"cycle {cycle}: re-opened a device that is gone"
            pulse.load_sink(sink)
            back_s.append(wait_until(stream.reopen, timeout_s=BACK_WITHIN_S, poll_s=0.5))  # the daemon's pace
            settle(stream)
            assert stream.healthy, f"cycle {cycle}: not healthy after the re-open"
            assert stream.queued_samples_24k == 0, f"cycle {cycle}: audio for the lost device kept"
            assert stream.played_samples_24k >= played_before, f"cycle {cycle}: playback clock went back"
            stream.flush_playback()
            sizes.append(settled_size())
    return {"sizes": sizes, "back_s": back_s}


def daemon_cycles(pulse: PulseHarness, cycles: int) -> dict:
    """The daemon on the tiny model answers the question; a device goes mid-answer and comes back."""
    import soundfile
    import torch

    from assistant.conversation import Conversation
    from assistant.daemon import Daemon
    from assistant.daemon_config import DaemonSettings, DialogueSettings, EchoSettings, TurnEnd
    from assistant.engine import Engine, EngineOptions
    from assistant.run_daemon import DeviceEchoPolicy, build_vad
    from audio_io.duplex import DuplexStream
    from quantized_models.model_dir import load_models
    from quantized_models.sampling import TextSamplingConfig
    from tests.conftest import TINY_FIXTURE  # imported here: the stream child stays without torch

    torch.manual_seed(0)
    torch.set_num_threads(1)  # as every test runs
    models = load_models(TINY_FIXTURE / "checkpoints", TINY_FIXTURE / "llm", torch.device("cpu"),
                         torch.float32)
    engine = Engine(models, EngineOptions(text_sampling=TextSamplingConfig(1.0, 1, 0.0), speech_top_k=1,
                                          max_new_tokens=24, max_speech_tokens=120))
    settings = DaemonSettings(echo=EchoSettings(aec_enabled=False),
                              dialogue=DialogueSettings(turn_end=TurnEnd.VAD))
    question, rate = soundfile.read(TINY_FIXTURE / "inputs/question.wav", dtype="float32")
    audio = DuplexStream(INPUT_DEVICE, OUTPUT_DEVICE)
    daemon = Daemon(Conversation(engine, seed=0), audio, build_vad(settings),
                    DeviceEchoPolicy(audio, aec_enabled=True), settings)
    stop = threading.Event()
    loop = threading.Thread(target=daemon.run, args=(stop.is_set,), daemon=True)
    loop.start()
    sizes, back_s = [], []
    try:
        for cycle in range(cycles):
            answered = daemon.counters.turns_answered
            pulse.play_into(question, rate).wait()
            wait_until(lambda: daemon.counters.turns_answered > answered and audio.playing, 10.0)
            sink = "spk" if cycle % 2 else "mic"
            pulse.unload_sink(sink)
            wait_until(lambda: daemon.counters.device_losses == cycle + 1, 3.0)
            time.sleep(0.5)
            assert loop.is_alive() and not audio.healthy, f"cycle {cycle}: daemon died or missed the loss"
            pulse.load_sink(sink)
            back_s.append(wait_until(lambda: audio.healthy, BACK_WITHIN_S))
            wait_until(lambda: not daemon.conv.answering and not audio.playing, 10.0)
            time.sleep(0.5)
            sizes.append(settled_size())
    finally:
        stop.set()
        loop.join(timeout=10)
        audio.close()
    return {"sizes": sizes, "back_s": back_s, "loop_ended": not loop.is_alive(),
            "device_losses": daemon.counters.device_losses, "recoveries": daemon.counters.recoveries,
            "turns_answered": daemon.counters.turns_answered}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=("stream", "daemon"))
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--cycles", type=int, default=10)
    args = parser.parse_args(argv)
    losses = _LossCounter()
    logging.getLogger().addHandler(losses)
    logging.getLogger().setLevel(logging.WARNING)
    run = stream_cycles if args.scenario == "stream" else daemon_cycles
    with PulseHarness(args.root) as pulse:
        result = run(pulse, args.cycles)
    result["loss_warnings"] = losses.losses
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
