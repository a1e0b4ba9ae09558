# -*- test-case-name: tests.e2e.test_workers -*-
"""
A worker of a group: the normal proxy service, on sockets the master
opened, with the group's shared state behind its channel to the master.

The master runs C{python -m llmproxy.group.worker SPEC}, where C{SPEC} is
the JSON of a L{WorkerSpec}, with the listening sockets at descriptors 3,
4, ... and C{PROMETHEUS_MULTIPROC_DIR} set to the group's metrics
directory. The worker:

  1. reads the configuration files, as the master just did;
  2. connects to the master's state service (a blocking connect to a local
     socket, before the reactor runs) and says who it is;
  3. builds the proxy service of a single process (L{build_service}) with
     a worker's L{ProcessRole}: it adopts the inherited sockets, asks the
     master for rate-limit and budget decisions, counts metrics in the
     group's directory, writes whole log lines to the shared stdout;
  4. tells the master it is ready once its reactor runs (it accepts from
     then on), and runs until SIGTERM or SIGINT, then drains as a single
     process does and exits 0.

A spare (index -1) does all but adopt the sockets: it says it has booted
and waits. When a worker dies, the master promotes the spare to take its
place, which takes a message and a few milliseconds instead of the half
second (or more, on a busy machine) a new Python process needs to start.

systemd never hears from a worker (the master is the main process): its
environment has no C{NOTIFY_SOCKET}, C{WATCHDOG_*} or C{LISTEN_*}. If the
master goes away (its connection closes), the worker drains and exits.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger, globalLogBeginner

from llmproxy.allocator import tune_allocator
from llmproxy.budgets.remote import remote_spend_factory
from llmproxy.config import ConfigError, load_config
from llmproxy.group.channel import GROUP, Channel, RemoteError
from llmproxy.group.health import health_snapshot
from llmproxy.group.listeners import adopting_endpoints
from llmproxy.group.spec import WorkerSpec
from llmproxy.group.status import status_snapshot
from llmproxy.group.view import GroupView
from llmproxy.logs import WholeLines
from llmproxy.metrics import Metrics
from llmproxy.ratelimit.remote import remote_limiter_factory
from llmproxy.runtime import Runtime
from llmproxy.service import ProxyService
from llmproxy.tap import ProcessRole, build_service, freeze_heap

log = Logger(namespace="llmproxy.group")


class Worker:
    """
    One worker process: its channel to the master, its service, its stop.
    """

    def __init__(self, reactor: Any, spec: WorkerSpec) -> None:
        self._reactor = reactor
        self.spec = spec
        self._stopping = False
        self.service: ProxyService | None = None
        self.channel = Channel({GROUP: self._group_request}, reactor, self._master_gone)
        self.view = GroupView(self.channel, spec.index)

    def connect(self) -> None:
        """
        Connect to the master's state service, before the reactor runs.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.spec.state)
            sock.setblocking(False)
            factory = Factory.forProtocol(lambda: self.channel)
            factory.noisy = False
            self._reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, factory)
        finally:
            sock.close()
        self.channel.tell(GROUP, ["hello", self.spec.index, os.getpid()])

    def build(self, config: Any) -> ProxyService:
        spec = self.spec
        role = ProcessRole(
            endpoint_for=adopting_endpoints(self._reactor, spec.listeners),
            memory_limiter=remote_limiter_factory(self.channel, self._reactor),
            memory_spend=remote_spend_factory(self.channel, self._reactor),
            metrics=partial(Metrics.for_group, spec.metrics),
            log_stream=WholeLines(sys.stdout.fileno()),
        )
        descriptions = [listener.description for listener in spec.listeners]
        service = build_service(self._reactor, config, spec.configs, descriptions, role)
        service.state.group = self.view
        self.view.provide("health", partial(health_snapshot, service.state))
        self.view.provide("status", partial(status_snapshot, service.state))
        self.service = service
        return service

    def serve(self) -> None:
        """
        Adopt the listening sockets and start serving (a spare does this
        when the master promotes it).
        """
        service = self.service
        assert service is not None
        service.privilegedStartService()
        service.startService()
        self._reactor.addSystemEventTrigger("before", "shutdown", service.stopService)

    def _group_request(self, channel: Channel, body: list[Any]) -> Any:
        """
        The master asks for a snapshot, a reload, or (of a spare) to serve.
        """
        op = body[0]
        if op == "snapshot":
            return self.view.snapshot(body[1])
        if op == "reload" and self.service is not None:
            reloading = self.service.reload()
            if reloading is None:
                return False
            done: Deferred[Runtime | None] = reloading
            return done.addCallback(lambda runtime: runtime is not None)
        if op == "serve" and self.view.index < 0 and not self._stopping:
            self.view.index = int(body[1])
            self.serve()
            return True
        raise RemoteError(f"worker {self.view.index} cannot do {op!r}")

    def booted(self) -> None:
        """
        Tell the master this worker runs: a worker serves from now on; a
        spare waits to be promoted.
        """
        self.channel.tell(GROUP, ["ready" if self.spec.index >= 0 else "booted"])

    def stop(self) -> None:
        """
        Drain and exit, once, however many signals ask.
        """
        if self._stopping:
            return
        self._stopping = True
        if self._reactor.running:
            self._reactor.stop()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self.stop)

    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _master_gone(self, channel: Channel) -> None:
        if not self._stopping:
            log.warn("worker {index}: the master is gone; draining", index=self.spec.index)
            self._reactor.callLater(0, self.stop)


def run(reactor: Any, spec: WorkerSpec) -> None:
    """
    Serve until stopped (see the module docstring).
    """
    tune_allocator()
    try:
        config = load_config(list(spec.configs), os.environ)
    except ConfigError as error:
        sys.stderr.write(f"llmproxy worker {spec.index}: invalid configuration:\n{error}\n")
        raise SystemExit(1) from None
    worker = Worker(reactor, spec)
    worker.connect()
    service = worker.build(config)
    assert service.log_observer is not None
    globalLogBeginner.beginLoggingTo([service.log_observer], redirectStandardIO=False)
    if spec.index >= 0:
        worker.serve()
    worker.install_signals()
    reactor.callWhenRunning(worker.booted)
    freeze_heap()
    reactor.run(installSignalHandlers=False)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv if argv is None else argv)
    if len(args) != 2:
        sys.stderr.write("usage: python -m llmproxy.group.worker SPEC (started by the master)\n")
        raise SystemExit(2)
    spec = WorkerSpec.from_json(args[1])
    from twisted.internet import reactor

    run(reactor, spec)


if __name__ == "__main__":
    main()
