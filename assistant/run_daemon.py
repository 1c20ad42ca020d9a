"""`freeze-omni run` and `freeze-omni devices`: wire models, audio devices and the daemon loop."""
from __future__ import annotations

import argparse
import logging
import signal
from dataclasses import replace
from typing import Any

import numpy as np

from assistant.conversation import Conversation
from assistant.daemon import Daemon
from assistant.daemon_config import DaemonSettings, EchoSettings, TurnEnd
from assistant.dialogue import DecisionThresholds
from assistant.engine import Engine, EngineOptions, SpeechEmission
from assistant.segmentation import SegmentationRule
from quantized_models.sampling import TextSamplingConfig

logger = logging.getLogger(__name__)

EXIT_NO_AUDIO_DEVICE = 69  # EX_UNAVAILABLE: a service it needs is not there


class VadChunkGate:
    """Adapts the frame-level `audio_io.vad.VadGate` to the daemon's per-chunk view."""

    def __init__(self, vad: Any) -> None:
        self.vad = vad

    def speech_started(self, chunk: np.ndarray) -> tuple[bool, bool]:
        from audio_io.vad import VadEventKind

        kinds = [event.kind for event in self.vad.push(chunk)]
        return VadEventKind.START in kinds, VadEventKind.STOP in kinds


class DeviceEchoPolicy:
    """The duplex stream cancels echo itself; this only says when barge-in may fire."""

    def __init__(self, audio: Any, aec_enabled: bool) -> None:
        self.audio, self.aec_enabled = audio, aec_enabled

    @property
    def allows_barge_in(self) -> bool:
        canceller = getattr(self.audio, "echo_canceller", None)
        if canceller is None:
            return True
        # Half duplex mutes the microphone while playing; AEC must finish adapting first.
        return self.aec_enabled and not canceller.in_warmup


def engine_options(settings: DaemonSettings, server_settings: dict) -> EngineOptions:
    """Live dialogue decoding: the demo server's eager segmentation and emission settings."""
    dialogue = settings.dialogue
    return EngineOptions(
        text_sampling=TextSamplingConfig(temperature=0.8, top_k=20, top_p=0.8),
        speech_top_k=int(server_settings.get("decoder_top_k", 2)),
        max_new_tokens=dialogue.max_answer_tokens,
        max_speech_tokens=dialogue.max_speech_tokens_per_segment,
        segmentation=SegmentationRule.EAGER,
        thresholds=DecisionThresholds(ignore_probability=dialogue.ignore_probability,
                                      respond_probability=dialogue.respond_probability),
        emission=SpeechEmission.from_server_json(server_settings),
    )


def settings_from_args(args: argparse.Namespace) -> DaemonSettings:
    base = DaemonSettings()
    audio = replace(base.audio, input_device=args.input_device, output_device=args.output_device)
    echo = replace(base.echo, aec_enabled=not args.no_aec)
    dialogue = replace(base.dialogue, turn_end=TurnEnd(args.turn_end))
    vad = replace(base.vad, aggressiveness=args.vad_aggressiveness)
    return DaemonSettings(audio=audio, vad=vad, echo=echo, dialogue=dialogue, events_path=args.events)


def _echo_canceller(echo: EchoSettings) -> Any:
    from audio_io.aec import AecUnavailableError, HalfDuplexGate, WebRtcEchoCanceller

    if echo.aec_enabled:
        try:
            return WebRtcEchoCanceller(warmup_ms=echo.aec_warmup_ms)
        except AecUnavailableError as err:
            logger.warning("echo cancellation unavailable (%s); falling back to half duplex", err)
    return HalfDuplexGate(tail_ms=echo.half_duplex_tail_ms)


def open_audio(settings: DaemonSettings) -> Any:
    """Open the duplex stream; raises audio_io.devices.NoAudioDeviceError when there is none."""
    from audio_io.duplex import DuplexStream

    return DuplexStream(settings.audio.input_device, settings.audio.output_device,
                        block_ms=settings.audio.block_ms, echo_canceller=_echo_canceller(settings.echo))


def build_vad(settings: DaemonSettings) -> VadChunkGate:
    from audio_io.vad import VadGate

    vad = settings.vad
    return VadChunkGate(VadGate(frame_ms=vad.frame_ms, aggressiveness=vad.aggressiveness,
                                start_frames=max(1, vad.start_ms // vad.frame_ms),
                                stop_frames=max(1, vad.stop_ms // vad.frame_ms), preroll_ms=vad.preroll_ms))


def check_devices(settings: DaemonSettings) -> None:
    """Fail fast (before loading models) when the configured devices are not there."""
    from audio_io.devices import find_device

    find_device(settings.audio.input_device, "input")
    find_device(settings.audio.output_device, "output")


def run_daemon(models: Any, settings: DaemonSettings, seed: int | None = None) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit status."""
    from audio_io.devices import NoAudioDeviceError

    try:
        audio = open_audio(settings)
    except NoAudioDeviceError as err:
        logger.error("%s", err)
        return EXIT_NO_AUDIO_DEVICE
    engine = Engine(models, engine_options(settings, models.server_settings))
    daemon = Daemon(Conversation(engine, seed=seed), audio, build_vad(settings),
                    DeviceEchoPolicy(audio, settings.echo.aec_enabled), settings)
    stop = {"requested": False}

    def request_stop(signum: int, _frame: object) -> None:
        logger.info("signal %d: stopping", signum)
        stop["requested"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    logger.info("listening (input %r, output %r)", settings.audio.input_device, settings.audio.output_device)
    try:
        daemon.run(lambda: stop["requested"])
    finally:
        audio.close()
    return 0


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-device", default=None, help="substring of the microphone's name")
    p.add_argument("--output-device", default=None, help="substring of the speaker's name")
    p.add_argument("--turn-end", choices=[TurnEnd.MODEL.value, TurnEnd.VAD.value], default=TurnEnd.MODEL.value)
    p.add_argument("--no-aec", action="store_true", help="half duplex: mute the microphone while speaking")
    p.add_argument("--vad-aggressiveness", type=int, default=2, choices=range(4))
    p.add_argument("--events", default=None, help="append one JSON line per answered turn here")
