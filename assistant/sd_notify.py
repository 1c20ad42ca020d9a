"""The systemd notification protocol (sd_notify(3)), spoken directly over `$NOTIFY_SOCKET`.

A service of `Type=notify` sends newline-separated `KEY=value` assignments as one datagram
to the unix socket systemd names in `NOTIFY_SOCKET` (a path, or `@name` for the abstract
namespace). Without that variable every call is a no-op, so the daemon runs the same by hand.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

logger = logging.getLogger(__name__)


class Notifier:
    """Sends READY=1, STATUS=, WATCHDOG=1, RELOADING=1 and STOPPING=1 to systemd.

    Args:
        env: the environment to read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from
            (default: os.environ).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval_s = _watchdog_interval_s(env)
        self._socket: socket.socket | None = None
        self._last_status: str | None = None
        if self.address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    @property
    def watchdog_enabled(self) -> bool:
        return self.enabled and self.watchdog_interval_s is not None

    def send(self, *assignments: str) -> bool:
        """One datagram of `KEY=value` lines; False (logged once at DEBUG) if it could not be sent."""
        if self._socket is None:
            return False
        try:
            self._socket.sendto("\n".join(assignments).encode("utf-8"), self.address)
        except OSError as err:
            # systemd may be gone or restarting; a daemon must not die over its notifications
            logger.debug("sd_notify %s failed: %s", assignments, err)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *self._status_line(status))

    def status(self, text: str) -> bool:
        """STATUS=text, sent only when it differs from the last one."""
        if text == self._last_status:
            return True
        self._last_status = text
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self, monotonic_usec: int) -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *self._status_line(status))

    def _status_line(self, status: str | None) -> list[str]:
        if status is None:
            return []
        self._last_status = status
        return [f"STATUS={status}"]

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):  # abstract namespace: a leading NUL byte instead of the @
        return b"\0" + value[1:].encode("utf-8")
    if value.startswith("/"):
        return value
    logger.warning("NOTIFY_SOCKET=%r is neither a path nor @abstract; not notifying systemd", value)
    return None


def _watchdog_interval_s(env: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC (systemd's advice), if the watchdog is meant for this process."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        return max(int(usec), 1) / 2e6
    except ValueError:
        logger.warning("WATCHDOG_USEC=%r is not a number; watchdog pings off", usec)
        return None


def under_systemd(env: Mapping[str, str] | None = None) -> bool:
    """Started by systemd (its journal adds timestamps, a terminal is not attached)."""
    env = os.environ if env is None else env
    return bool(env.get("INVOCATION_ID") or env.get("JOURNAL_STREAM"))
