"""Metrics in the Prometheus text format, /health and /metrics over HTTP, and log formatting.

The daemon's loop is single-threaded; the HTTP server runs in one daemon thread of the
standard library's `http.server` and only reads: histograms are observed under a lock,
counters are read from the daemon's plain integer fields when scraped, and the health
state is a snapshot the loop writes once per tick.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable

logger = logging.getLogger(__name__)

CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


@dataclass(frozen=True)
class Sample:
    """One line of the exposition: a counter or gauge value read at scrape time."""

    name: str
    kind: str
    """counter or gauge."""
    help: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


class Histogram:
    """Cumulative buckets per label value (one label at most keeps this small)."""

    def __init__(self, name: str, help_text: str, buckets: Iterable[float], label: str | None = None) -> None:
        self.name, self.help, self.label = name, help_text, label
        self.buckets = tuple(sorted(buckets))
        self._series: dict[str, list[float]] = {}  # label value → [per-bucket counts..., +Inf count, sum]
        self._lock = threading.Lock()

    def observe(self, value: float, label_value: str = "") -> None:
        with self._lock:
            series = self._series.setdefault(label_value, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1
            series[-2] += 1
            series[-1] += value

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            snapshot = {k: list(v) for k, v in self._series.items()}
        for label_value, series in sorted(snapshot.items()):
            base = f'{self.label}="{_escape(label_value)}",' if self.label else ""
            for bound, count in zip(self.buckets, series):
                lines.append(f'{self.name}_bucket{{{base}le="{_number(bound)}"}} {_number(count)}')
            lines.append(f'{self.name}_bucket{{{base}le="+Inf"}} {_number(series[-2])}')
            suffix = f"{{{base.rstrip(',')}}}" if base else ""
            lines.append(f"{self.name}_sum{suffix} {_number(series[-1])}")
            lines.append(f"{self.name}_count{suffix} {_number(series[-2])}")
        return lines


class Metrics:
    """Histograms observed by the loop plus collectors read when /metrics is scraped."""

    def __init__(self) -> None:
        self.histograms: list[Histogram] = []
        self.collectors: list[Callable[[], Iterable[Sample]]] = []

    def histogram(self, name: str, help_text: str, buckets: Iterable[float],
                  label: str | None = None) -> Histogram:
        hist = Histogram(name, help_text, buckets, label)
        self.histograms.append(hist)
        return hist

    def render(self) -> str:
        lines: list[str] = []
        by_name: dict[str, list[Sample]] = {}
        for collect in self.collectors:
            try:
                for sample in collect():
                    by_name.setdefault(sample.name, []).append(sample)
            except Exception:  # noqa: BLE001 - one broken collector must not hide the others
                logger.exception("metrics collector failed")
        for name, samples in by_name.items():
            lines += [f"# HELP {name} {samples[0].help}", f"# TYPE {name} {samples[0].kind}"]
            for s in samples:
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels)
                series = f"{name}{{{labels}}}" if labels else name
                lines.append(f"{series} {_number(s.value)}")
        for hist in self.histograms:
            lines += hist.render()
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Health:
    """What /health answers: starting, ready, degraded (with a reason) or stopping."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._started_s = clock()
        self.state, self.reason = "starting", "loading models"

    def set(self, state: str, reason: str = "") -> bool:
        """Returns True if this changed the state or reason."""
        with self._lock:
            changed = (state, reason) != (self.state, self.reason)
            self.state, self.reason = state, reason
        return changed

    def snapshot(self) -> dict:
        with self._lock:
            return {"status": self.state, "reason": self.reason,
                    "uptime_s": round(self._clock() - self._started_s, 1)}


class HttpEndpoint:
    """GET /health (200 when ready, 503 otherwise; JSON) and GET /metrics, in a daemon thread.

    Args:
        host, port: where to listen (port 0: any free port; see `port` after start).
    """

    def __init__(self, metrics: Metrics, health: Health, host: str = "127.0.0.1", port: int = 0) -> None:
        handler = _handler_class(metrics, health)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as err:
            raise OSError(err.errno, f"server.http_port: cannot listen on {host}:{port} ({err.strerror}); "
                                     "choose another port or set server.http_enabled: false") from err
        self._server.daemon_threads = True
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="freeze-omni-http",
                                        daemon=True)

    def start(self) -> "HttpEndpoint":
        self._thread.start()
        logger.info("health and metrics on http://%s:%d/health and /metrics", self.host, self.port)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler_class(metrics: Metrics, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_METRICS, metrics.render())
            elif path == "/health":
                snap = health.snapshot()
                status = 200 if snap["status"] == "ready" else 503
                self._reply(status, "application/json", json.dumps(snap) + "\n")
            else:
                self._reply(404, "text/plain; charset=utf-8", "try /health or /metrics\n")

        def _reply(self, status: int, content_type: str, body: str) -> None:
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args: object) -> None:
            logger.debug("http %s " + fmt, self.client_address[0], *args)

    return Handler


# ---- logs -------------------------------------------------------------------------------

class LogContext(logging.Filter):
    """Adds the current session and turn ids to every record (`%(session)s`, `%(turn)s`)."""

    session = "-"
    turn = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.session, record.turn = LogContext.session, LogContext.turn
        record.priority = _SYSLOG_PRIORITY.get(record.levelno, 6)
        return True


_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}
JOURNAL_FORMAT = "<%(priority)d>%(levelname)s %(name)s [session=%(session)s turn=%(turn)s] %(message)s"
TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s [session=%(session)s turn=%(turn)s] %(message)s"


def configure_logging(level: int, under_systemd: bool) -> None:
    """Structured lines with session and turn ids on the root logger's handlers.

    Under systemd there is no timestamp (the journal adds its own) and each line starts with
    its syslog priority in angle brackets, which journald reads as the entry's priority.
    """
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    formatter = logging.Formatter(JOURNAL_FORMAT if under_systemd else TERMINAL_FORMAT)
    for handler in root.handlers:
        handler.setFormatter(formatter)
        if not any(isinstance(f, LogContext) for f in handler.filters):
            handler.addFilter(LogContext())
    root.setLevel(level)
