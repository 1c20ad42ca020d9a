"""`freeze-omni serve`: the models and the session server, headless (no local audio device).

A GPU box serving kiosks: one copy of the weights, `scheduler.executors` executors, clients on
a Unix socket and optionally TCP (`docs/PROTOCOL.md`). SIGTERM/SIGINT tell every client and exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from assistant.config import AssistantConfig
from assistant.scheduler import Scheduler, SchedulerSettings
from assistant.server import ServerSettings, SessionServer

logger = logging.getLogger(__name__)

EXIT_BAD_CONFIG = 2  # as every other command's bad input
CHUNK_MS = 160  # one listen step


def default_socket_path(env: dict | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "freeze-omni.sock"
    return Path(tempfile.gettempdir()) / f"freeze-omni-{os.getuid()}.sock"


def scheduler_settings(config: AssistantConfig) -> SchedulerSettings:
    s = config.scheduler
    return SchedulerSettings(executors=s.executors, max_sessions=s.max_sessions,
                             session_idle_timeout_s=s.session_idle_timeout_s,
                             reserved_listen_executors=s.reserved_listen_executors)


def server_settings(config: AssistantConfig) -> ServerSettings:
    """Raises ValueError for a non-local TCP bind without a token."""
    s = config.server
    return ServerSettings(
        socket_path=str(Path(s.socket_path).expanduser()) if s.socket_path else str(default_socket_path()),
        tcp_enabled=s.tcp_enabled, tcp_host=s.tcp_host, tcp_port=s.tcp_port, token=s.token,
        max_payload_bytes=s.max_payload_bytes, send_queue_events=s.send_queue_events,
        max_dropped_events=s.max_dropped_events, keepalive_timeout_s=s.keepalive_timeout_s,
        max_lead_s=s.client_lead_s,
        min_barge_in_chunks=-(-config.dialogue.min_barge_in_ms // CHUNK_MS))


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """`serve`'s own flags (None: take the configuration's value)."""
    from assistant.config_cli import add_layer_flags

    p.add_argument("--socket", dest="socket_path", default=None, help="Unix socket for clients")
    p.add_argument("--tcp", default=None, metavar="HOST:PORT",
                   help="also listen on TCP (a non-local HOST needs server.token)")
    p.add_argument("--executors", type=int, default=None, help="executor threads sharing the models")
    p.add_argument("--max-sessions", type=int, default=None, help="concurrent sessions at most")
    add_layer_flags(p)
    p.set_defaults(model_dir=None, llm_dir=None, backend=None, onnx_dir=None, quantization=None, seed=None,
                   device=None, dtype=None)


def serve_assignments(args: argparse.Namespace) -> list[str]:
    """`serve`'s flags as `--set` assignments, so every layer rule applies to them too."""
    out = []
    if args.socket_path:
        out.append(f"server.socket_path={args.socket_path}")
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        out += ["server.tcp_enabled=true", f"server.tcp_host={host.strip('[]') or '127.0.0.1'}",
                f"server.tcp_port={port}"]
    if args.executors is not None:
        out.append(f"scheduler.executors={args.executors}")
    if args.max_sessions is not None:
        out.append(f"scheduler.max_sessions={args.max_sessions}")
    return out


def run_serve_command(args: argparse.Namespace, load_models: Callable[[AssistantConfig], Any]) -> int:
    """`freeze-omni serve` from parsed arguments; `load_models` loads what `config.models` names."""
    from assistant.config import ConfigError
    from assistant.config_cli import print_problems
    from assistant.observability import configure_logging
    from assistant.run_daemon import load_run_config
    from assistant.sd_notify import under_systemd

    args.set = list(args.set or []) + serve_assignments(args)
    try:
        config = load_run_config(args).config
    except ConfigError as err:
        print_problems(err)
        return EXIT_BAD_CONFIG
    level = logging.DEBUG if args.debug else config.observability.log_level.upper()
    configure_logging(level, under_systemd())
    return run_serve(config, load_models)


def build_server(config: AssistantConfig, models: Any) -> SessionServer:
    """Engine, scheduler and server over loaded models (the executors are not started yet)."""
    from assistant.conversation import Conversation
    from assistant.engine import Engine
    from assistant.run_daemon import engine_options
    from assistant.voice_session import device_stream_context

    engine = Engine(models, engine_options(config.daemon_settings(), models.server_settings))
    scheduler = Scheduler(scheduler_settings(config), executor_context=device_stream_context(models.device))
    role = None

    def make_conversation(seed: int | None) -> Conversation:
        return Conversation(engine, seed=config.models.seed if seed is None else seed, role=role)

    return SessionServer(server_settings(config), scheduler, make_conversation)


def start_background_server(config: AssistantConfig, models: Any) -> Callable[[], None] | None:
    """`freeze-omni run` with `server.socket_path` set or `server.tcp_enabled`: serve network sessions
    beside the local one, on the same models; returns the function that stops them (None: not configured).
    """
    from assistant.server import ServerThread

    if not config.server.socket_path and not config.server.tcp_enabled:
        return None
    server = build_server(config, models)
    server.scheduler.start()
    thread = ServerThread(server).start()
    logger.info("serving network sessions beside the local one")

    def stop() -> None:
        thread.stop()
        server.scheduler.stop()

    return stop


def server_samples(server: SessionServer) -> Iterable[Any]:
    """The server's and the scheduler's counters for /metrics (read at scrape time)."""
    from assistant.observability import Sample

    prefix = "freeze_omni_server"
    stats, sched = server.stats, server.scheduler.stats
    yield Sample(f"{prefix}_sessions_active", "gauge", "Client sessions open", server.scheduler.session_count)
    yield Sample(f"{prefix}_sessions_max", "gauge", "Client sessions allowed",
                 server.scheduler.settings.max_sessions)
    for name, value, help_text in (
            ("connections_total", stats.connections, "Client connections accepted"),
            ("sessions_started_total", stats.sessions_started, "Client sessions started"),
            ("sessions_refused_total", stats.refused, "Session starts refused because all were in use"),
            ("dropped_events_total", stats.dropped_events, "Events dropped for clients that read too slowly"),
            ("step_failures_total", sched.failures, "Model steps that failed (their session was closed)")):
        yield Sample(f"{prefix}_{name}", "counter", help_text, value)
    for code, count in sorted(stats.ended.items()):
        yield Sample(f"{prefix}_sessions_ended_total", "counter", "Sessions ended, by reason", count,
                     (("reason", code),))
    for kind, count in sorted(sched.steps.items()):
        yield Sample(f"{prefix}_steps_total", "counter", "Model steps run, by priority class", count,
                     (("kind", kind.lower()),))
    yield Sample(f"{prefix}_listen_wait_max_seconds", "gauge",
                 "Longest wait of a listen chunk before its step started", sched.listen_wait_max_s)


def _start_http(config: AssistantConfig, server: SessionServer) -> Any:
    """/health and /metrics when `server.http_enabled` (None otherwise)."""
    from assistant.observability import Health, HttpEndpoint, Metrics

    if not config.server.http_enabled:
        return None
    metrics, health = Metrics(), Health()
    metrics.collectors.append(lambda: server_samples(server))
    health.set("ready")
    return HttpEndpoint(metrics, health, config.server.http_host, config.server.http_port).start()


def run_serve(config: AssistantConfig, load_models: Callable[[AssistantConfig], Any]) -> int:
    """Load, serve until SIGTERM/SIGINT; returns the exit status."""
    import torch

    from assistant.sd_notify import Notifier

    settings = server_settings(config)  # a bad bind fails before the models load
    if config.scheduler.torch_threads:
        torch.set_num_threads(config.scheduler.torch_threads)
    notifier = Notifier()
    try:
        notifier.status("loading models")
        server = build_server(config, load_models(config))
        server.scheduler.start()
        endpoint = _start_http(config, server)
        try:
            asyncio.run(_serve_forever(server, notifier, settings))
        finally:
            if endpoint is not None:
                endpoint.close()
            server.scheduler.stop()
    finally:
        notifier.close()
    logger.info("stopped")
    return 0


async def _serve_forever(server: SessionServer, notifier: Any, settings: ServerSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    where = [f"unix:{settings.socket_path}"] if settings.socket_path else []
    if settings.tcp_enabled:
        where.append(f"tcp:{settings.tcp_host}:{server.tcp_port}")
    notifier.ready(f"serving on {', '.join(where)}")
    logger.info("serving on %s", ", ".join(where))
    await stop.wait()
    notifier.status("stopping")
    await server.stop()
