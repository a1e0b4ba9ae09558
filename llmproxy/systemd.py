# -*- test-case-name: llmproxy.test.test_systemd -*-
"""
Telling systemd how the process is doing: the C{sd_notify} protocol.

A C{Type=notify} unit gives the process C{$NOTIFY_SOCKET}, a Unix datagram
socket (a path, or an abstract address written with a leading C{@}). Each
datagram holds newline-separated C{KEY=value} assignments:

  - C{READY=1} once the listeners accept connections: C{systemctl start}
    returns, and units ordered after this one start;
  - C{RELOADING=1} with C{MONOTONIC_USEC=} (the C{CLOCK_MONOTONIC} time in
    microseconds, which systemd uses to match the reload to the request
    that caused it) when a reload begins, and C{READY=1} when it ends,
    whatever its outcome;
  - C{STOPPING=1} when the drain begins;
  - C{WATCHDOG=1} regularly when the unit sets C{WatchdogSec=}: systemd
    kills and restarts a process that stays silent for that long, so a
    wedged reactor is noticed;
  - C{STATUS=} a line C{systemctl status} shows.

Outside systemd (no C{$NOTIFY_SOCKET}) every call does nothing, so the
daemon runs the same under C{make run}, in tests and under systemd.

Sending is one non-blocking C{sendto()} of a few bytes on a socket opened for
the occasion: cheap enough to do on the reactor thread. A send that fails
(no receiver, a full queue) is logged at debug level and otherwise ignored:
a notification must never take the proxy down.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from attrs import frozen
from twisted.application.internet import TimerService
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="llmproxy.systemd")

__all__ = ["Notifier", "monotonic_usec", "notify_address", "sd_notify", "watchdog_interval"]


def notify_address(value: str | None) -> bytes | None:
    """
    The address to send to, from the value of C{$NOTIFY_SOCKET}: a file
    system path, or an abstract address (C{@name} becomes C{\\0name}).
    Anything else (unset, empty, another address family) is C{None}.
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None


def _send(address: bytes, state: bytes) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(state, address)
    except (OSError, ValueError) as error:
        log.debug(
            "sd_notify {state!r} to {address!r} failed: {error}",
            state=state,
            address=address,
            error=str(error),
        )
        return False
    return True


def sd_notify(state: bytes, environ: Mapping[str, str] | None = None) -> bool:
    """
    Send C{state} (e.g. C{b"READY=1"}) to C{$NOTIFY_SOCKET}.

    @param environ: where to read C{NOTIFY_SOCKET}; the process environment
        by default.
    @return: whether the datagram was sent; C{False} also when there is no
        socket to send to. Never raises.
    """
    source = os.environ if environ is None else environ
    address = notify_address(source.get("NOTIFY_SOCKET"))
    if address is None:
        return False
    return _send(address, state)


def monotonic_usec() -> int:
    """
    C{CLOCK_MONOTONIC} now, in microseconds, as C{MONOTONIC_USEC=} wants it.
    """
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """
    How often to send C{WATCHDOG=1}, in seconds: half of C{$WATCHDOG_USEC},
    as systemd recommends, so one late tick does not get the process
    killed. C{None} when the watchdog is off, or meant for another process
    (C{$WATCHDOG_PID} set to a pid that is not C{pid}).
    """
    owner = environ.get("WATCHDOG_PID")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def _one_line(text: str) -> str:
    return " ".join(text.split())


@frozen
class Notifier:
    """
    The process's line to systemd.

    @ivar address: where to send, or C{None} outside systemd (every method
        is then a no-op).
    @ivar watchdog_seconds: the C{WATCHDOG=1} interval, or C{None}.
    """

    address: bytes | None
    watchdog_seconds: float | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], pid: int) -> Notifier:
        """
        Read C{NOTIFY_SOCKET}, C{WATCHDOG_USEC} and C{WATCHDOG_PID}.
        """
        address = notify_address(environ.get("NOTIFY_SOCKET"))
        interval = watchdog_interval(environ, pid) if address is not None else None
        return cls(address, interval)

    def notify(self, *assignments: str) -> bool:
        """
        Send C{KEY=value} assignments in one datagram.

        @return: whether it was sent.
        """
        if self.address is None or not assignments:
            return False
        return _send(self.address, "\n".join(assignments).encode("utf-8"))

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", "STATUS=" + _one_line(status))

    def reloading(self, monotonic: int, status: str = "reloading the configuration") -> bool:
        return self.notify(
            "RELOADING=1", f"MONOTONIC_USEC={monotonic}", "STATUS=" + _one_line(status)
        )

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", "STATUS=" + _one_line(status))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def watchdog_service(self, clock: IReactorTime) -> IService | None:
        """
        A service that sends C{WATCHDOG=1} every L{watchdog_seconds} while it
        runs, from the reactor thread: if the reactor stops turning, the
        pings stop and systemd restarts the process. C{None} when there is
        no watchdog.
        """
        if self.watchdog_seconds is None:
            return None
        service = TimerService(self.watchdog_seconds, self.watchdog)
        service.clock = clock
        service.setName("systemd-watchdog")
        return service
