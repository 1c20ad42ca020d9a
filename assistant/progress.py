"""Progress of long work (model loading, export, benchmarks): a bar on a terminal, log lines otherwise.

Under systemd (or with stderr redirected to a file) a redrawn bar would fill the journal
with carriage returns, so each step becomes one INFO line instead.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

from assistant.sd_notify import under_systemd

logger = logging.getLogger(__name__)

T = TypeVar("T")


def wants_bar(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not under_systemd()


class Progress:
    """Counts steps of one long job.

    Args:
        total: number of steps (None: unknown).
        description: what the job is ("loading models").
        bar: draw a tqdm bar (default: only on a terminal outside systemd).
        on_step: also called with a one-line description of each step (e.g. systemd STATUS=).
    """

    def __init__(self, total: int | None, description: str, bar: bool | None = None,
                 on_step: Callable[[str], Any] | None = None) -> None:
        self.total, self.description, self.on_step = total, description, on_step
        self.done = 0
        self._started_s = time.monotonic()
        self._bar = None
        if wants_bar() if bar is None else bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit="step", leave=False)

    def step(self, what: str) -> None:
        """Say that the next step, `what`, begins now."""
        of = f"/{self.total}" if self.total else ""
        line = f"{self.description}: {what} ({self.done + 1}{of})"
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=True)
        else:
            logger.info("%s", line)
        if self.on_step is not None:
            self.on_step(line)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        logger.info("%s: done in %.1f s", self.description, time.monotonic() - self._started_s)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], description: str, total: int | None = None, name: Callable[[T], str] = str,
          bar: bool | None = None) -> Iterator[T]:
    """Yield `items`, reporting each as one step."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, description, bar=bar) as progress:
        for item in items:
            progress.step(name(item))
            yield item
            progress.advance()
