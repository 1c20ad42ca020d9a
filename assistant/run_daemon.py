"""`freeze-omni run` and `freeze-omni devices`: wire models, audio devices and the daemon loop."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable

from assistant.config import AssistantConfig, ConfigError, LoadedConfig, Problem, Setting, load_config, \
    parse_assignments
from assistant.conversation import Conversation
from assistant.daemon import MODEL_CHUNK_S, Daemon
from assistant.daemon_config import DaemonSettings, EchoSettings, TurnEnd
from assistant.dialogue import DecisionThresholds
from assistant.engine import Engine, EngineOptions, SpeechEmission
from assistant.segmentation import SegmentationRule
from audio_io.vad import VadChunkGate
from quantized_models.embedded_model import embedded_model_dir
from quantized_models.sampling import TextSamplingConfig

logger = logging.getLogger(__name__)

EXIT_NO_AUDIO_DEVICE = 69  # EX_UNAVAILABLE: a service it needs is not there
MODEL_INPUT_RATE_HZ = 16_000


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


RUN_FLAGS = {  # argparse dest → (config key, flag as the user wrote it)
    "input_device": ("audio.input_device", "--input-device"),
    "output_device": ("audio.output_device", "--output-device"),
    "turn_end": ("dialogue.turn_end", "--turn-end"),
    "aec_enabled": ("aec.aec_enabled", "--no-aec"),
    "vad_aggressiveness": ("vad.aggressiveness", "--vad-aggressiveness"),
    "events": ("observability.events_path", "--events"),
    "model_dir": ("models.model_dir", "--model-dir"),
    "llm_dir": ("models.llm_dir", "--llm-dir"),
    "backend": ("models.backend", "--backend"),
    "onnx_dir": ("models.onnx_dir", "--onnx-dir"),
    "quantization": ("models.quantization", "--quantization"),
    "device": ("models.device", "--device"),
    "dtype": ("models.dtype", "--dtype"),
    "seed": ("models.seed", "--seed"),
}


def flag_layer(args: argparse.Namespace) -> tuple[list[Setting], list[Problem]]:
    """The command-line layer: flags the user gave (None: not given), then every --set."""
    settings = []
    for dest, (key, flag) in RUN_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            settings.append(Setting(key, str(value) if isinstance(value, Path) else value, flag))
    assigned, problems = parse_assignments(getattr(args, "set", None) or [])
    return settings + assigned, problems


def load_run_config(args: argparse.Namespace, check_paths: bool = True) -> LoadedConfig:
    """Every configuration layer for `freeze-omni run`; raises ConfigError listing all problems."""
    flags, problems = flag_layer(args)
    if problems:
        raise ConfigError(problems)
    loaded = load_config(getattr(args, "config", None), cli=flags, check_paths=check_paths)
    models = loaded.config.models
    if models.model_dir is None and models.llm_dir is None and embedded_model_dir() is not None:
        return loaded  # the embedded default model
    missing = [Problem("configuration", key, f"not set: pass {flag} or set {key} in a config file")
               for key, flag in (("models.model_dir", "--model-dir"), ("models.llm_dir", "--llm-dir"))
               if getattr(loaded.config.models, key.split(".")[1]) is None]
    if models.model_dir is None and models.llm_dir is None:
        missing = [Problem("configuration", "models.model_dir", "not set and this install has no embedded "
                           "default model: pass --model-dir and --llm-dir or set models.* in a config file")]
    if missing:
        raise ConfigError(missing)
    return loaded


def _echo_canceller(echo: EchoSettings) -> Any:
    from audio_io.aec import AecUnavailableError, HalfDuplexGate, WebRtcEchoCanceller

    if echo.aec_enabled:
        try:
            return WebRtcEchoCanceller(warmup_ms=echo.aec_warmup_ms,
                                       near_end_margin_db=echo.near_end_margin_db)
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
                                stop_frames=max(1, vad.stop_ms // vad.frame_ms), preroll_ms=vad.preroll_ms,
                                min_level_dbfs=vad.min_level_dbfs))


def check_devices(settings: DaemonSettings) -> None:
    """Fail fast (before loading models) when the configured devices are not there."""
    from audio_io.devices import find_device

    find_device(settings.audio.input_device, "input")
    find_device(settings.audio.output_device, "output")


def run_daemon(config: AssistantConfig, load_models: Callable[[AssistantConfig], Any],
               reload_config: Callable[[], AssistantConfig] | None = None,
               debug_logging: bool = False) -> int:
    """Load, warm up, serve until SIGTERM/SIGINT (SIGHUP reloads); returns the process exit status.

    Args:
        config: the merged configuration.
        load_models: loads the model stack that `config.models` names.
        reload_config: re-reads every layer (SIGHUP); None: SIGHUP only logs.
        debug_logging: `--debug` was given.
    """
    from assistant.observability import Health, Metrics
    from assistant.sd_notify import Notifier
    from assistant.telemetry import Telemetry
    from audio_io.devices import NoAudioDeviceError

    notifier, health = Notifier(), Health()
    telemetry = Telemetry(Metrics(), _recorder(config))
    endpoint = _start_endpoint(config, telemetry, health)
    try:
        notifier.status("loading models")
        conversation = _warm_conversation(config, load_models, telemetry, notifier)
        from assistant.serve import start_background_server

        # network sessions share the loaded models; the local microphone is one more session
        stop_sessions = start_background_server(config, conversation.engine.models)
        try:
            audio = open_audio(config.daemon_settings())
        except NoAudioDeviceError as err:
            logger.error("%s", err)
            if stop_sessions is not None:
                stop_sessions()
            return EXIT_NO_AUDIO_DEVICE
        try:
            return _serve(config, conversation, audio, notifier, health, telemetry, reload_config,
                          debug_logging)
        finally:
            audio.close()
            if stop_sessions is not None:
                stop_sessions()
    finally:
        if endpoint is not None:
            endpoint.close()
        notifier.close()


def _serve(config: AssistantConfig, conversation: Conversation, audio: Any, notifier: Any, health: Any,
           telemetry: Any, reload_config: Callable[[], AssistantConfig] | None, debug_logging: bool) -> int:
    from assistant.service import ServiceLoop

    settings = config.daemon_settings()
    echo_policy = DeviceEchoPolicy(audio, settings.echo.aec_enabled)
    daemon = Daemon(conversation, audio, build_vad(settings), echo_policy, settings)
    telemetry.daemon_collector(daemon, audio)
    service = ServiceLoop(daemon, config, notifier, health, telemetry, reload_config, debug_logging)
    service.install_signal_handlers()
    health.set("ready")
    notifier.ready("listening")
    logger.info("listening (input %r, output %r)", settings.audio.input_device, settings.audio.output_device)
    daemon.run(service.should_stop)
    service.finish()
    logger.info("stopped")
    return 0


def _warm_conversation(config: AssistantConfig, load_models: Callable[[AssistantConfig], Any],
                       telemetry: Any, notifier: Any) -> Conversation:
    """Load the models and run the first steps once, so the first user turn is not the slow one."""
    import torch

    from assistant.progress import Progress, wants_bar
    from assistant.telemetry import InstrumentedEngine

    if config.scheduler.torch_threads:
        torch.set_num_threads(config.scheduler.torch_threads)
    if not wants_bar():  # transformers draws its own weight-loading bar: carriage returns in the journal
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with Progress(2, "starting", on_step=notifier.status) as progress:
        progress.step("loading models")
        models = load_models(config)
        progress.advance()
        progress.step("warming up")
        options = engine_options(config.daemon_settings(), models.server_settings)
        warm = Engine(models, options)  # not instrumented: warm-up is no session and no turn
        state = warm.prefill_system(warm.new_session(0))
        silence = torch.zeros(int(MODEL_INPUT_RATE_HZ * MODEL_CHUNK_S))
        for _ in range(config.scheduler.warmup_chunks):
            _, state = warm.listen_chunk(state, silence, follow_decision=False)
        conversation = Conversation(InstrumentedEngine(models, options, telemetry), seed=config.models.seed)
        progress.advance()
    return conversation


def _recorder(config: AssistantConfig) -> Any:
    from assistant.debug_recording import DebugRecorder

    directory = config.observability.debug_recording_dir
    if directory is None:
        return None
    dialogue = config.dialogue
    thresholds = (dialogue.respond_probability, dialogue.ignore_probability)
    return DebugRecorder(Path(directory).expanduser(), thresholds)


def _start_endpoint(config: AssistantConfig, telemetry: Any, health: Any) -> Any:
    from assistant.observability import HttpEndpoint

    if not config.server.http_enabled:
        return None
    return HttpEndpoint(telemetry.metrics, health, config.server.http_host, config.server.http_port).start()


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """`run`'s own flags; every default is None so that only given flags override the config."""
    from assistant.config_cli import add_layer_flags

    p.add_argument("--input-device", default=None, help="substring of the microphone's name")
    p.add_argument("--output-device", default=None, help="substring of the speaker's name")
    p.add_argument("--turn-end", choices=[TurnEnd.MODEL.value, TurnEnd.VAD.value], default=None,
                   help="model: the state head ends the turn (default); vad: silence does")
    p.add_argument("--no-aec", dest="aec_enabled", action="store_const", const=False, default=None,
                   help="half duplex: mute the microphone while speaking")
    p.add_argument("--vad-aggressiveness", type=int, default=None, choices=range(4))
    p.add_argument("--events", default=None, help="append one JSON line per answered turn here")
    add_layer_flags(p)
    # the model flags are shared with `respond`, where they have defaults; here the config has them
    p.set_defaults(model_dir=None, llm_dir=None, backend=None, onnx_dir=None, quantization=None, seed=None,
                   device=None, dtype=None)
