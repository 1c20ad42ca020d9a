"""Layered configuration: nested frozen dataclasses read from YAML files, the environment and flags.

Layers, later wins:

    built-in defaults
    /etc/freeze-omni/config.yaml                      (system; the kiosk unit)
    $XDG_CONFIG_HOME/freeze-omni/config.yaml          (user; default ~/.config)
    --config FILE
    FREEZE_OMNI_<SECTION>__<FIELD>=value              (environment; e.g. FREEZE_OMNI_VAD__AGGRESSIVENESS=3)
    command-line flags                                (`freeze-omni run --input-device ...`, `--set k=v`)

Every problem (unknown key, wrong type, out-of-range value, missing model) is collected with
the place the value came from, so one run of `freeze-omni config check` lists them all.
The daemon's own sections (audio, vad, aec, dialogue) are `assistant.daemon_config`'s classes,
so a field added there is configurable here without a second definition.
"""
from __future__ import annotations

import difflib
import os
import typing
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from assistant.config_values import coerce, shown
from assistant.daemon_config import (
    AudioSettings,
    DaemonSettings,
    DialogueSettings,
    EchoSettings,
    VadSettings,
    settings_problems,
)

SYSTEM_CONFIG_PATH = Path("/etc/freeze-omni/config.yaml")
ENV_PREFIX = "FREEZE_OMNI_"
DEFAULTS = "default"


@dataclass(frozen=True)
class ModelsConfig:
    model_dir: str | None = None
    """Freeze-Omni checkpoint directory (audiollm/, decoder/, codec/); unset: the embedded model."""
    llm_dir: str | None = None
    """Local Hugging Face directory of the frozen LLM; unset with model_dir: the embedded model's."""
    backend: str = "torch"
    """Encoder, speech decoder and codec on `torch` or `onnx` (onnxruntime)."""
    onnx_dir: str | None = None
    """Graphs written by `freeze-omni export-onnx` (backend onnx only)."""
    quantization: str = "none"
    """Frozen LLM weights: none, int8 or nf4 (bitsandbytes)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1 ..."""
    dtype: str = "auto"
    """auto, float32, bfloat16 or float16."""
    seed: int | None = None
    """Sampling seed (None: a fresh one per session)."""


@dataclass(frozen=True)
class SchedulerConfig:
    torch_threads: int = 0
    """CPU threads for torch's intra-op work (0: torch's default)."""
    warmup_chunks: int = 2
    """Silent 160 ms chunks run through the models before the daemon reports ready."""
    executors: int = 1
    """`serve`: executor threads sharing one copy of the models, 1..64 (on CUDA each has its own stream)."""
    reserved_listen_executors: int = 1
    """`serve`: executors kept free of answer generation for listen steps (at most executors - 1)."""
    max_sessions: int = 8
    """`serve`: concurrent client sessions at most; one more is refused with an `error` event `full`."""
    session_idle_timeout_s: float = 300.0
    """`serve`: a session with no audio in or out (pings do not count) for this long is closed."""


@dataclass(frozen=True)
class ServerConfig:
    http_enabled: bool = False
    """Serve /health and /metrics over HTTP."""
    http_host: str = "127.0.0.1"
    """Address the HTTP endpoint listens on (keep it on localhost unless behind a proxy)."""
    http_port: int = 9477
    """TCP port of the HTTP endpoint, 1..65535 (0: any free port, logged at start)."""
    drain_timeout_s: float = 5.0
    """SIGTERM: longest wait for the phrase being played to finish before exiting."""
    socket_path: str | None = None
    """`serve`: Unix socket for clients (None: $XDG_RUNTIME_DIR/freeze-omni.sock, else /tmp)."""
    tcp_enabled: bool = False
    """`serve`: also listen on TCP (docs/PROTOCOL.md)."""
    tcp_host: str = "127.0.0.1"
    """`serve`: TCP address; any non-loopback address requires `token`."""
    tcp_port: int = 10700
    """`serve`: TCP port, 1..65535 (0: any free port, logged at start)."""
    token: str = ""
    """`serve`: secret TCP clients give in `session-start` (set it by environment, not by flag)."""
    max_payload_bytes: int = 65536
    """`serve`: largest payload of one client event; larger ends that session."""
    send_queue_events: int = 256
    """`serve`: events queued for one client at most; audio beyond it is dropped and counted."""
    max_dropped_events: int = 256
    """`serve`: a client that has lost this many events is disconnected as a slow reader."""
    keepalive_timeout_s: float = 30.0
    """`serve`: a connection idle this long (nothing received, not even `ping`, nothing sent, no answer
    in hand) is disconnected."""
    client_lead_s: float = 2.0
    """`serve`: answer audio generated ahead of a client's playback at most."""


@dataclass(frozen=True)
class ObservabilityConfig:
    log_level: str = "info"
    """debug, info, warning or error (`--debug` forces debug)."""
    events_path: str | None = None
    """JSON-lines file receiving one record per answered turn (latencies), or None."""
    debug_recording_dir: str | None = None
    """Save each turn's input and output audio and a state-probability plot here (None: off)."""
    status_interval_s: float = 5.0
    """How often the systemd STATUS= line is refreshed."""


@dataclass(frozen=True)
class AssistantConfig:
    audio: AudioSettings = field(default_factory=AudioSettings)
    vad: VadSettings = field(default_factory=VadSettings)
    aec: EchoSettings = field(default_factory=EchoSettings)
    dialogue: DialogueSettings = field(default_factory=DialogueSettings)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)

    def daemon_settings(self) -> DaemonSettings:
        return DaemonSettings(audio=self.audio, vad=self.vad, echo=self.aec, dialogue=self.dialogue,
                              events_path=self.observability.events_path)


LIVE_KEYS = frozenset({
    "dialogue.respond_probability", "dialogue.ignore_probability", "dialogue.silence_end_s",
    "dialogue.idle_timeout_s", "dialogue.min_barge_in_ms", "dialogue.playback_lead_s",
    "dialogue.max_answer_steps_per_tick", "observability.log_level", "observability.events_path",
    "observability.debug_recording_dir", "observability.status_interval_s",
})
"""Keys that SIGHUP applies to a running daemon; a change to any other key needs a restart."""
CHOICES: dict[str, tuple[str, ...]] = {
    "models.backend": ("torch", "onnx"),
    "models.quantization": ("none", "int8", "nf4"),
    "models.dtype": ("auto", "float32", "bfloat16", "float16"),
    "observability.log_level": ("debug", "info", "warning", "error"),
    "dialogue.turn_end": ("model", "vad"),
}
RANGES: dict[str, tuple[float, float]] = {
    "server.http_port": (0, 65535),
    "scheduler.torch_threads": (0, 1024),
    "scheduler.warmup_chunks": (0, 1000),
    "server.drain_timeout_s": (0.0, 600.0),
    "scheduler.executors": (1, 64),
    "scheduler.reserved_listen_executors": (0, 63),
    "scheduler.max_sessions": (1, 10_000),
    "scheduler.session_idle_timeout_s": (1.0, 86_400.0),
    "server.tcp_port": (0, 65535),
    "server.max_payload_bytes": (1024, 16 * 1024 * 1024),
    "server.send_queue_events": (8, 100_000),
    "server.max_dropped_events": (1, 1_000_000),
    "server.keepalive_timeout_s": (0.5, 3600.0),
    "server.client_lead_s": (0.2, 60.0),
    "observability.status_interval_s": (0.1, 3600.0),
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration, said so that it can be fixed."""

    source: str
    """Where the value came from: a file path, an environment variable or a flag."""
    key: str
    """`section.field`, or `section` / `(file)` for problems above the field level."""
    message: str
    """What is wrong and how to fix it."""

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}"


class ConfigError(ValueError):
    """The configuration cannot be used; `problems` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class Setting:
    """One value of one layer."""

    key: str
    value: Any
    source: str
    raw: bool = False
    """True: `value` is the text of an environment variable or flag, parsed for the field's type."""


@dataclass(frozen=True)
class LoadedConfig:
    config: AssistantConfig
    sources: dict[str, str]
    """`section.field` → where its value came from (`default` if no layer set it)."""


def section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(AssistantConfig)
    return {f.name: hints[f.name] for f in fields(AssistantConfig)}


def field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in fields(section_cls)}


def all_keys() -> list[str]:
    return [f"{s}.{name}" for s, cls in section_classes().items() for name in field_types(cls)]


def user_config_path(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", str(Path.home()))) / ".config")
    return Path(base) / "freeze-omni" / "config.yaml"


# ---- layers ------------------------------------------------------------------------------

def read_yaml_layer(path: Path, label: str | None = None) -> tuple[list[Setting], list[Problem]]:
    """Settings of one YAML file: a mapping of sections, each a mapping of fields."""
    label = label or str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        return [], [Problem(label, "(file)", f"cannot be read ({err.strerror}); check the path")]
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        return [], [Problem(label, "(file)", f"is not valid YAML{line}: {getattr(err, 'problem', err)}")]
    if data is None:
        return [], []
    if not isinstance(data, dict):
        return [], [Problem(label, "(file)", "must be a mapping of sections (audio:, vad:, ...)")]
    return _settings_from_mapping(data, label)


def _settings_from_mapping(data: dict, label: str) -> tuple[list[Setting], list[Problem]]:
    settings, problems = [], []
    sections = section_classes()
    for section, body in data.items():
        section = str(section)
        if section not in sections:
            problems.append(Problem(label, section, _unknown_section(section)))
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append(Problem(label, section, f"must be a mapping of fields (e.g. `{section}:` "
                                                    "followed by indented `field: value` lines)"))
            continue
        known = field_types(sections[section])
        for name, value in body.items():
            key = f"{section}.{name}"
            if name not in known:
                problems.append(Problem(label, key, "unknown key" + _did_you_mean(str(name), known, section)))
            else:
                settings.append(Setting(key, value, label))
    return settings, problems


def env_layer(env: Mapping[str, str]) -> tuple[list[Setting], list[Problem]]:
    """FREEZE_OMNI_<SECTION>__<FIELD>=value; any other FREEZE_OMNI_ variable is an error."""
    settings, problems = [], []
    keys = {k.upper().replace(".", "__"): k for k in all_keys()}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX):]
        if name in keys:
            settings.append(Setting(keys[name], env[var], f"environment {var}", raw=True))
            continue
        close = difflib.get_close_matches(name, list(keys), n=1)
        hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else \
            f"; variables are {ENV_PREFIX}<SECTION>__<FIELD>, e.g. {ENV_PREFIX}VAD__AGGRESSIVENESS"
        problems.append(Problem(f"environment {var}", name.lower().replace("__", "."), "unknown key" + hint))
    return settings, problems


def parse_assignments(items: Iterable[str], source: str = "--set") -> tuple[list[Setting], list[Problem]]:
    """`section.field=value` strings (the `--set` flag)."""
    settings, problems = [], []
    known = all_keys()
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            problems.append(Problem(source, key, "write it as section.field=value"))
        elif key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            problems.append(Problem(source, key, "unknown key" + hint))
        else:
            settings.append(Setting(key, value, f"{source} {key}", raw=True))
    return settings, problems


def _unknown_section(section: str) -> str:
    names = list(section_classes())
    close = difflib.get_close_matches(section, names, n=1)
    if close:
        return f"unknown section; did you mean {close[0]}?"
    owners = [s for s in names if section in field_types(section_classes()[s])]
    if owners:
        return f"unknown section; fields go inside their section: {owners[0]}.{section}"
    return f"unknown section; sections are {', '.join(names)}"


def _did_you_mean(name: str, known: Iterable[str], section: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    if close:
        return f"; did you mean {section}.{close[0]}?"
    return f"; {section} has {', '.join(known)}"




# ---- merging and checking ----------------------------------------------------------------

def build(layers: Iterable[list[Setting]], problems: list[Problem] | None = None,
          check_paths: bool = False) -> LoadedConfig:
    """Apply the layers in order over the defaults and check the result.

    Raises:
        ConfigError: listing `problems` (from reading the layers) and every new one.
    """
    problems = list(problems or [])
    sources = {key: DEFAULTS for key in all_keys()}
    values: dict[str, dict[str, Any]] = {s: {} for s in section_classes()}
    types_by_key = {f"{s}.{n}": t for s, cls in section_classes().items()
                    for n, t in field_types(cls).items()}
    for layer in layers:
        for setting in layer:
            section, name = setting.key.split(".", 1)
            try:
                values[section][name] = coerce(setting.value, types_by_key[setting.key], setting.raw)
            except ValueError as err:
                problems.append(Problem(setting.source, setting.key, str(err)))
                continue
            sources[setting.key] = setting.source
    config = AssistantConfig(**{s: cls(**values[s]) for s, cls in section_classes().items()})
    problems += _value_problems(config, sources)
    if check_paths:
        problems += model_path_problems(config, sources)
    if problems:
        raise ConfigError(problems)
    return LoadedConfig(config, sources)


def _value_problems(config: AssistantConfig, sources: dict[str, str]) -> list[Problem]:
    found: list[tuple[str, str]] = []
    for key, allowed in CHOICES.items():
        value = shown(get_value(config, key))
        if value not in allowed:
            found.append((key, f"use one of {', '.join(allowed)}"))
    for key, (low, high) in RANGES.items():
        if not low <= get_value(config, key) <= high:
            found.append((key, f"use {low}..{high}"))
    seen = {key for key, _ in found}
    for key, message in settings_problems(config.audio, config.vad, config.aec, config.dialogue):
        key = key.replace("echo.", "aec.", 1)  # the daemon calls the aec section `echo`
        if key not in seen:
            found.append((key, message))
            seen.add(key)
    return [Problem(sources[key], key, f"{shown(get_value(config, key))!r}: {message}")
            for key, message in found]


def model_path_problems(config: AssistantConfig, sources: dict[str, str]) -> list[Problem]:
    """Model directories that are set must exist and hold what they should."""
    from quantized_models.model_dir import REQUIRED_FILES

    problems = []
    models = config.models
    checks = (("models.model_dir", models.model_dir, REQUIRED_FILES, "a Freeze-Omni checkpoint directory"),
              ("models.llm_dir", models.llm_dir, ("config.json",), "a Hugging Face model directory"),
              ("models.onnx_dir", models.onnx_dir if models.backend == "onnx" else None, (),
               "the output of `freeze-omni export-onnx`"))
    for key, value, required, what in checks:
        if value is None:
            continue
        path = Path(value).expanduser()
        if not path.is_dir():
            problems.append(Problem(sources[key], key, f"{value}: no such directory; point it at {what}"))
            continue
        missing = [name for name in required if not (path / name).is_file()]
        if missing:
            problems.append(Problem(sources[key], key,
                                    f"{value} is not {what}: missing {', '.join(missing)}"))
    if models.backend == "onnx" and models.onnx_dir is None:
        problems.append(Problem(sources["models.backend"], "models.onnx_dir", "backend onnx needs "
                                "models.onnx_dir (write it with `freeze-omni export-onnx`)"))
    return problems


def get_value(config: AssistantConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(config, section), name)


def load_config(config_file: Path | None = None, cli: Iterable[Setting] = (),
                env: Mapping[str, str] | None = None, system_path: Path | None = SYSTEM_CONFIG_PATH,
                user_path: Path | None = None, check_paths: bool = False) -> LoadedConfig:
    """Every layer in order (defaults, system file, user file, `config_file`, environment, `cli`).

    The system and user files are optional; `config_file`, when given, must exist.

    Raises:
        ConfigError: any problem in any layer.
    """
    env = os.environ if env is None else env
    layers, problems = [], []
    user_path = user_config_path(env) if user_path is None else user_path
    for path in (system_path, user_path):
        if path is not None and path.is_file():
            found, bad = read_yaml_layer(path)
            layers.append(found)
            problems += bad
    if config_file is not None:
        found, bad = read_yaml_layer(Path(config_file), f"--config {config_file}")
        layers.append(found)
        problems += bad
    found, bad = env_layer(env)
    layers += [found, list(cli)]
    return build(layers, problems + bad, check_paths=check_paths)


def changed_keys(old: AssistantConfig, new: AssistantConfig) -> list[str]:
    return [key for key in all_keys() if get_value(old, key) != get_value(new, key)]


def as_dict(config: AssistantConfig) -> dict[str, dict[str, Any]]:
    """{section: {field: YAML-ready value}}."""
    return {s: {n: shown(get_value(config, f"{s}.{n}")) for n in field_types(cls)}
            for s, cls in section_classes().items()}


def with_live_values(current: AssistantConfig, new: AssistantConfig) -> AssistantConfig:
    """`current` with the values of `LIVE_KEYS` taken from `new` (what SIGHUP may change)."""
    by_section: dict[str, dict[str, Any]] = {}
    for key in LIVE_KEYS:
        section, name = key.split(".", 1)
        by_section.setdefault(section, {})[name] = get_value(new, key)
    return dataclasses.replace(current, **{s: dataclasses.replace(getattr(current, s), **values)
                                           for s, values in by_section.items()})
