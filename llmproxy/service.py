# -*- test-case-name: llmproxy.test.test_service -*-
"""
The process's service tree: listening, draining on stop, reloading on
SIGHUP, telling systemd about each (L{llmproxy.systemd}). Child services
(the cost sink, the limiter sweeper, the systemd watchdog) hang off
L{ProxyService} and are stopped only after the drain, so every record made
by a draining request is still flushed, and systemd keeps hearing from a
process that drains for minutes.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import IServiceCollection, MultiService
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredLock,
    inlineCallbacks,
    maybeDeferred,
)
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from llmproxy.config import Config
from llmproxy.runtime import ProxyState, Runtime
from llmproxy.site import ProxySite
from llmproxy.systemd import Notifier, monotonic_usec

log = Logger(namespace="llmproxy.service")

CLOSE_WAIT_SECONDS = 2.0
"""After the drain, how long closing connections may take to flush."""

IDLE_CLOSE_DELAY = 0.5
"""
After the listeners close, how long a connection without a request may
still deliver one before it is closed as idle. A connection accepted just
before the listener closed has usually not been read yet: closing it at
once would drop a request its client already sent (a restart on a shared
socket hands the next connections to the new process, but not that one).
"""


class ProxyService(MultiService):
    """
    The root service.

    @ivar ports: the listening ports, once bound.
    @ivar notifier: the line to systemd; by default read from the process
        environment (a no-op outside systemd).
    """

    def __init__(
        self,
        reactor: Any,
        descriptions: Sequence[str],
        site: ProxySite,
        state: ProxyState,
        pool: HTTPConnectionPool,
        reloader: Callable[[], Deferred[Runtime]] | None = None,
        log_observer: ILogObserver | None = None,
        notifier: Notifier | None = None,
        monotonic: Callable[[], int] = monotonic_usec,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._descriptions = list(descriptions)
        self._site = site
        self._state = state
        self._pool = pool
        self._reloader = reloader
        self._log_observer = log_observer
        self.ports: list[IListeningPort] = []
        self._previous_sighup: Any = None
        self.notifier = (
            notifier if notifier is not None else Notifier.from_environment(os.environ, os.getpid())
        )
        self._monotonic = monotonic
        self._reload_lock = DeferredLock()
        watchdog = self.notifier.watchdog_service(reactor)
        if watchdog is not None:
            watchdog.setServiceParent(self)

    def setServiceParent(self, parent: IServiceCollection) -> None:
        """
        When twistd makes us the child of its application, give the
        application our log observer: twistd installs the observer it finds
        there instead of its own, so C{logging.format} decides what is printed.
        """
        super().setServiceParent(parent)
        set_component = getattr(parent, "setComponent", None)
        if self._log_observer is not None and set_component is not None:
            set_component(ILogObserver, self._log_observer)

    def privilegedStartService(self) -> None:
        """
        Bind every listener now, before the reactor runs: a port that cannot
        be bound ends the process with a clear message and a non-zero exit,
        instead of a daemon that serves nothing.
        """
        for description in self._descriptions:
            failures: list[Failure] = []
            endpoint = serverFromString(self._reactor, description)
            listening = endpoint.listen(self._site)
            listening.addCallbacks(self.ports.append, failures.append)
            if failures:
                sys.stderr.write(
                    f"llmproxy: cannot listen on {description}: {failures[0].getErrorMessage()}\n"
                )
                raise SystemExit(1)
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        # Before the "listening on" lines: whoever waits for them (a test, a
        # supervisor) may send SIGHUP at once.
        if self._reloader is not None:
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
        addresses = [str(port.getHost()) for port in self.ports]
        for address in addresses:
            log.info("listening on {address}", address=address)
        # The ports are bound; they accept once the reactor runs (twistd
        # starts services just before running it).
        self._reactor.callWhenRunning(
            self._notify_ready, "serving on " + ", ".join(addresses or ["no listener"])
        )

    def _notify_ready(self, status: str) -> None:
        if self.running and not self._state.draining:
            self.notifier.ready(status)

    def _on_sighup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[Runtime | None] | None:
        """
        Re-read every config file; swap the runtime on success, keep the old
        one and log the error on failure.

        Reloads run one at a time, in the order they were asked for: a
        SIGHUP during a reload starts another once it ends, so the last
        signal always leaves the files' latest content in force. systemd
        hears C{RELOADING=1} when each begins and C{READY=1} when it ends,
        unless the process began to drain meanwhile.

        @return: a L{Deferred} that fires with the new L{Runtime}, or with
            C{None} when the files were rejected; C{None} when this service
            cannot reload.
        """
        if self._reloader is None:
            return None
        reloader = self._reloader

        def once() -> Deferred[Runtime | None]:
            log.info("SIGHUP: reloading configuration")
            self.notifier.reloading(self._monotonic())
            loaded: Deferred[Runtime] = maybeDeferred(reloader)

            def swapped(runtime: Runtime) -> Runtime | None:
                self._state.runtime = runtime
                log.info("configuration reloaded")
                if not self._state.draining:
                    self.notifier.ready("configuration reloaded")
                return runtime

            def failed(failure: Failure) -> None:
                log.error(
                    "configuration reload failed; keeping the running configuration:\n{error}",
                    error=failure.getErrorMessage(),
                )
                if not self._state.draining:
                    self.notifier.ready(
                        "configuration reload failed; running the previous configuration"
                    )

            return loaded.addCallbacks(swapped, failed)

        return self._reload_lock.run(once)

    @inlineCallbacks
    def stopService(self) -> Any:
        """
        Drain: answer 503 on C{/health} at once, keep listening for the grace
        period (so a load balancer sees it), stop listening, close the
        connections that carry no request (after L{IDLE_CLOSE_DELAY}), let
        in-flight requests and streams finish up to the drain timeout, close
        the connections (flushing their last writes), then stop the children
        (the cost sink flushes here) and close the upstream pool.
        """
        state = self._state
        server = state.runtime.config.server
        state.draining = True
        self.notifier.stopping(f"draining {state.inflight} requests in flight")
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
        log.info(
            "draining: {inflight} requests in flight, grace {grace}s, timeout {timeout}s",
            inflight=state.inflight,
            grace=server.shutdown_grace_seconds,
            timeout=server.drain_timeout_seconds,
        )
        if server.shutdown_grace_seconds > 0:
            yield deferLater(self._reactor, server.shutdown_grace_seconds, lambda: None)
        yield DeferredList(
            [maybeDeferred(port.stopListening) for port in self.ports], consumeErrors=True
        )
        if any(not getattr(channel, "requests", None) for channel in list(self._site.channels)):
            yield deferLater(self._reactor, IDLE_CLOSE_DELAY, lambda: None)
        self._close_idle_connections()
        idle = state.wait_idle()
        idle.addTimeout(server.drain_timeout_seconds, self._reactor)
        try:
            yield idle
        except DeferredTimeoutError:
            log.warn("drain timeout: {inflight} requests cut", inflight=state.inflight)
        for channel in list(self._site.channels):
            if channel.transport is not None:
                channel.transport.loseConnection()
        yield self._wait_closed()
        yield MultiService.stopService(self)
        yield self._pool.closeCachedConnections()
        # twistd re-raises the signal that stopped the reactor once it has
        # shut down, so the exit status would say "killed by SIGTERM". The
        # drain completed: report a clean exit (0) instead.
        if hasattr(self._reactor, "_exitSignal"):
            self._reactor._exitSignal = None
        log.info("stopped")

    def _close_idle_connections(self) -> None:
        """
        Close keep-alive connections with no request in progress, and mark the
        busy ones to close after their current response.
        """
        for channel in list(self._site.channels):
            channel.persistent = False
            if not getattr(channel, "requests", None) and channel.transport is not None:
                channel.transport.loseConnection()

    @inlineCallbacks
    def _wait_closed(self) -> Any:
        waited = 0.0
        step = 0.02
        while waited < CLOSE_WAIT_SECONDS and any(
            getattr(channel.transport, "connected", False) for channel in list(self._site.channels)
        ):
            yield deferLater(self._reactor, step, lambda: None)
            waited += step


def describe_listen(config: Config, requested: Sequence[str], port_env: str | None) -> list[str]:
    """
    Where to listen: C{--listen}, else C{server.listen}, else C{tcp:$PORT},
    else C{tcp:9002}.
    """
    if requested:
        return list(requested)
    if config.server.listen:
        return list(config.server.listen)
    if port_env:
        return [f"tcp:{port_env}"]
    return ["tcp:9002"]
