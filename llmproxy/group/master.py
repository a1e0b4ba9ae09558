# -*- test-case-name: tests.e2e.test_workers -*-
"""
The master of a group of workers (C{server.workers} above 1).

It is the process twistd runs and systemd knows (the main PID): it opens
the listeners (and never accepts on them), keeps the group's shared state
(L{llmproxy.group.stateservice}: the memory rate limiter's counters, the
budgets' spend), and runs the workers
(L{llmproxy.group.worker}), each a process serving on the same sockets.

  - Start: the listeners are bound before the reactor runs, as in a single
    process (a port that cannot be bound ends the start with status 1);
    the workers start once it runs; systemd hears C{READY=1} when every
    worker says it serves.
  - A worker that exits is replaced at once, by a spare kept booted for
    that (L{llmproxy.group.supervisor}); workers that keep exiting before
    they serve stop the group with status 1.
  - SIGHUP: the master reads and validates every configuration file first;
    an invalid file changes nothing (the error is logged, as by a single
    process). Otherwise it takes the new limits itself (and starts or drops
    the budgets' spend store), then asks every worker to reload, and tells
    systemd C{READY=1} once they all have.
  - SIGTERM / SIGINT: C{STOPPING=1}; every worker drains as a single process
    does (C{/health} 503, grace, close, finish, flush); the master closes
    its own copies of the listeners after the grace period, waits for the
    workers (killing any that outlive the drain deadline), and exits 0.
  - C{WATCHDOG=1} comes from the master's reactor.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from prometheus_client.multiprocess import mark_process_dead
from twisted.application.service import IService, IServiceCollection, MultiService
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredLock,
    gatherResults,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, Logger

from llmproxy.budgets import MemorySpendStore, spend_store_for, tracks_spend
from llmproxy.budgets.remote import SpendServer
from llmproxy.config import Config, RateLimitConfig, load_config
from llmproxy.group.channel import BUDGETS, GROUP, RATE_LIMIT, Channel, RemoteError
from llmproxy.group.listeners import hold, passed, refusing_factory
from llmproxy.group.spec import WorkerSpec, worker_environment
from llmproxy.group.stateservice import StateService
from llmproxy.group.supervisor import Slot, Supervisor
from llmproxy.group.view import SNAPSHOT_TIMEOUT, Gathered, MasterFacts, WorkerSnapshot
from llmproxy.logs import LevelHolder, WholeLines, process_log
from llmproxy.ratelimit.memory import MemoryRateLimiter, sweeper_service
from llmproxy.ratelimit.remote import serve_limiter
from llmproxy.service import CLOSE_WAIT_SECONDS, IDLE_CLOSE_DELAY, listen_all, offer_log_observer
from llmproxy.systemd import Notifier, monotonic_usec

log = Logger(namespace="llmproxy.group")

STOP_MARGIN = 10.0
"""
Seconds a worker may outlive its own drain deadline (grace + drain timeout +
closing) before the master kills it.
"""

RELOAD_TIMEOUT = 60.0
"""Seconds the master waits for each worker's reload."""


class MasterService(MultiService):
    """
    The root service of a master.

    @ivar ports: the listening ports, held for the workers.
    @ivar notifier: the line to systemd.
    @ivar directory: the private directory of the state socket and the
        metrics files (made at start, removed at stop).
    @ivar workers: the worker processes.
    """

    def __init__(
        self,
        reactor: Any,
        config: Config,
        config_paths: Sequence[str],
        descriptions: Sequence[str],
        workers: int,
        log_observer: ILogObserver | None = None,
        level: LevelHolder | None = None,
        notifier: Notifier | None = None,
        monotonic: Callable[[], int] = monotonic_usec,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._config = config
        self._paths = list(config_paths)
        self._descriptions = list(descriptions)
        self.log_observer = log_observer
        self._level = level
        self.notifier = (
            notifier if notifier is not None else Notifier.from_environment(os.environ, os.getpid())
        )
        self._monotonic = monotonic
        self.ports: list[IListeningPort] = []
        self.directory = ""
        self.workers = Supervisor(
            reactor, workers, self._spec_for, self._worker_ready, self._give_up, self._worker_ended
        )
        self._limiter: MemoryRateLimiter | None = None
        self._spend: MemorySpendStore | None = None
        self._spend_server = SpendServer(lambda: self._spend, reactor)
        self._sweeper: IService | None = None
        self._announced = False
        self._reload_lock = DeferredLock()
        self._previous_sighup: Any = None
        self._started_at = reactor.seconds()
        watchdog = self.notifier.watchdog_service(reactor)
        if watchdog is not None:
            watchdog.setServiceParent(self)

    def setServiceParent(self, parent: IServiceCollection) -> None:
        super().setServiceParent(parent)
        offer_log_observer(parent, self.log_observer)

    # -- start ----------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """
        Make the private directory, bind the listeners (and stop accepting
        on them), host the memory limiter and spend store, open the state
        service.
        """
        self.directory = tempfile.mkdtemp(prefix="llmproxy-")
        os.mkdir(self._metrics_directory)
        reactor = self._reactor
        self.ports = listen_all(
            self._descriptions, partial(serverFromString, reactor), refusing_factory()
        )
        hold(self.ports)
        handlers = {
            GROUP: self._group_request,
            RATE_LIMIT: serve_limiter(lambda: self._limiter),
            BUDGETS: self._spend_server.handle,
        }
        state = StateService(reactor, self._state_path, handlers, self._channel_lost)
        state.setServiceParent(self)
        self._host_limiter(self._config.features.rate_limiting)
        self._host_spend(self._config)
        super().privilegedStartService()

    @property
    def _metrics_directory(self) -> str:
        return os.path.join(self.directory, "metrics")

    @property
    def _state_path(self) -> str:
        return os.path.join(self.directory, "state.sock")

    def startService(self) -> None:
        super().startService()
        self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
        for port in self.ports:
            log.info("listening on {address}", address=str(port.getHost()))
        log.info(
            "starting {count} workers; the group's state socket and metrics are in {directory}",
            count=len(self.workers.slots),
            directory=self.directory,
        )
        self._reactor.callWhenRunning(self.workers.start)

    def _spec_for(self, index: int) -> tuple[WorkerSpec, dict[int, int], dict[str, str]]:
        """
        What the worker of slot C{index} is told, the descriptors it gets,
        its environment.
        """
        inherited, child_fds = passed(self.ports, self._descriptions)
        spec = WorkerSpec(
            index=index,
            configs=tuple(self._paths),
            listeners=tuple(inherited),
            state=self._state_path,
            metrics=self._metrics_directory,
        )
        return spec, child_fds, worker_environment(os.environ, self._metrics_directory)

    def _worker_ended(self, pid: int) -> None:
        # Its live gauges (streams, circuits) go; its counters stay counted.
        mark_process_dead(pid, self._metrics_directory)

    def _give_up(self) -> None:
        """
        Stop the group and exit with status 1 (after the log is flushed:
        that trigger was registered first).
        """
        self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        if self._reactor.running:
            self._reactor.stop()

    # -- the workers' requests ------------------------------------------------

    def _group_request(self, channel: Channel, body: list[Any]) -> Any:
        op = body[0]
        if op == "hello":
            slot = self.workers.hello(channel, int(body[1]), int(body[2]))
            if slot is None:
                channel.close()
                raise RemoteError(f"no worker {body[1]} with pid {body[2]} here")
            channel.peer = slot
            return None
        slot = channel.peer
        if slot is None:
            raise RemoteError("say hello first")
        if op in ("ready", "booted"):
            self.workers.ready(slot)
            return None
        if op == "gather":
            return self._gather(str(body[1]))
        raise RemoteError(f"unknown group request {op!r}")

    def _worker_ready(self, slot: Slot) -> None:
        slots = self.workers.slots
        if self._announced or not all(s.ready for s in slots):
            return
        self._announced = True
        addresses = ", ".join(str(port.getHost()) for port in self.ports) or "no listener"
        log.info("{count} workers serving on {addresses}", count=len(slots), addresses=addresses)
        if not self.workers.stopping:
            self.notifier.ready(f"serving on {addresses} with {len(slots)} workers")

    def _gather(self, name: str) -> Deferred[Any]:
        asks: list[Deferred[WorkerSnapshot]] = []
        for slot in self.workers.slots:
            index, pid = slot.index, slot.pid
            if slot.ready and slot.channel is not None:
                asked = slot.channel.call(GROUP, ["snapshot", name], SNAPSHOT_TIMEOUT)
                asked.addCallbacks(
                    lambda snapshot, index=index, pid=pid: WorkerSnapshot(
                        index, pid, "serving", snapshot
                    ),
                    lambda failure, index=index, pid=pid: WorkerSnapshot(
                        index, pid, "unresponsive", None
                    ),
                )
                asks.append(asked)
            else:
                status = "starting" if slot.process is not None else "stopped"
                asks.append(succeed(WorkerSnapshot(index, pid, status, None)))
        spare = self.workers.spare
        facts = MasterFacts(
            pid=os.getpid(),
            started_at=self._started_at,
            draining=self.workers.stopping,
            workers=len(self.workers.slots),
            spare=spare.pid if spare is not None and spare.ready else None,
        )
        gathered = gatherResults(asks)
        return gathered.addCallback(lambda workers: Gathered(facts, tuple(workers)).to_json())

    def _channel_lost(self, channel: Channel) -> None:
        self._spend_server.lost(channel)
        slot = channel.peer
        if slot is not None and slot.channel is channel:
            slot.channel = None

    # -- the limiter ----------------------------------------------------------

    def _host_limiter(self, limits: RateLimitConfig) -> None:
        """
        Keep the memory backend's counters here when the configuration asks
        for it; a reload keeps the counts and takes the new limits.
        """
        old_sweeper = self._sweeper
        if not (limits.enabled and limits.backend == "memory"):
            self._limiter = self._sweeper = None
        elif self._limiter is None:
            self._limiter = MemoryRateLimiter(limits, self._reactor)
            self._sweeper = sweeper_service(
                self._limiter, limits.sweep_interval_seconds, self._reactor
            )
        else:
            self._limiter.reconfigure(limits)
            self._sweeper = sweeper_service(
                self._limiter, limits.sweep_interval_seconds, self._reactor
            )
        if old_sweeper is not None:
            old_sweeper.disownServiceParent()
        if self._sweeper is not None:
            self._sweeper.setServiceParent(self)

    def _host_spend(self, config: Config) -> None:
        """
        Keep the budgets' spend here when the configuration counts it in
        memory: rebuilt from the cost records at start (the workers' records
        all go to that file), kept by a reload as a single process keeps it.
        """
        if not tracks_spend(config.auth) or config.features.rate_limiting.backend != "memory":
            self._spend = None
        elif self._spend is None:
            store: object = spend_store_for(config, self._reactor, deferToThread)
            self._spend = store if isinstance(store, MemorySpendStore) else None

    # -- reload ---------------------------------------------------------------

    def _on_sighup(self, signum: int, frame: object) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[bool]:
        """
        Validate the files, then reload every worker (see the module
        docstring). Reloads run one at a time, in order.

        @return: a Deferred that fires with whether the files were accepted.
        """
        return self._reload_lock.run(self._reload_once)

    @inlineCallbacks
    def _reload_once(self) -> Any:
        log.info("SIGHUP: reloading configuration")
        self.notifier.reloading(self._monotonic())
        try:
            config = yield deferToThread(load_config, self._paths, os.environ)
        except Exception as error:
            log.error(
                "configuration reload failed; keeping the running configuration:\n{error}",
                error=str(error),
            )
            if not self.workers.stopping:
                self.notifier.ready(
                    "configuration reload failed; running the previous configuration"
                )
            return False
        workers = self.workers
        if config.server.workers != len(workers.slots):
            log.warn(
                "server.workers is now {new}; {count} workers keep running until a restart",
                new=config.server.workers,
                count=len(workers.slots),
            )
        self._config = config
        if self._level is not None:
            self._level.set(config.logging.level)
        self._host_limiter(config.features.rate_limiting)
        self._host_spend(config)
        workers.generation += 1
        asked = []
        for slot in workers.serving():
            assert slot.channel is not None
            slot.generation = workers.generation
            asked.append((slot.name, slot.channel.call(GROUP, ["reload"], RELOAD_TIMEOUT)))
        answers = yield DeferredList([d for _, d in asked], consumeErrors=True)
        kept = [
            name
            for (name, _), (ok, answer) in zip(asked, answers, strict=True)
            if not (ok and answer)
        ]
        if kept:
            log.error(
                "{names} kept the previous configuration (see their errors above)",
                names=", ".join(kept),
            )
        log.info("configuration reloaded")
        if not workers.stopping:
            self.notifier.ready("configuration reloaded")
        return True

    # -- stop -----------------------------------------------------------------

    @inlineCallbacks
    def stopService(self) -> Any:
        """
        Drain every worker, then stop (see the module docstring).
        """
        server = self._config.server
        running = len(list(self.workers.processes()))
        self.notifier.stopping(f"draining {running} workers")
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
        log.info(
            "draining the workers: grace {grace}s, timeout {timeout}s",
            grace=server.shutdown_grace_seconds,
            timeout=server.drain_timeout_seconds,
        )
        deadline = (
            server.shutdown_grace_seconds
            + server.drain_timeout_seconds
            + IDLE_CLOSE_DELAY
            + CLOSE_WAIT_SECONDS
            + STOP_MARGIN
        )
        stopped = self.workers.stop(deadline)
        if server.shutdown_grace_seconds > 0:
            yield deferLater(self._reactor, server.shutdown_grace_seconds, lambda: None)
        yield DeferredList(
            [maybeDeferred(port.stopListening) for port in self.ports], consumeErrors=True
        )
        yield stopped
        yield MultiService.stopService(self)
        shutil.rmtree(self.directory, ignore_errors=True)
        # As in a single process: the drain completed, so exit 0 rather
        # than "killed by SIGTERM" (twistd re-raises the signal otherwise).
        if hasattr(self._reactor, "_exitSignal"):
            self._reactor._exitSignal = None
        log.info("stopped")


def build_master(
    reactor: Any, config: Config, config_paths: Sequence[str], listen: Sequence[str], workers: int
) -> MasterService:
    """
    The master's service tree, with its log on the stdout it shares with
    its workers.
    """
    logging = config.logging
    level, observer = process_log(
        logging.format, logging.level, WholeLines(sys.stdout.fileno()), reactor
    )
    return MasterService(reactor, config, config_paths, listen, workers, observer, level)
