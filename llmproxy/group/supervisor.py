# -*- test-case-name: llmproxy.test.test_group_supervisor -*-
"""
Keeping a group's worker processes running: N workers, each in a slot
numbered 0 to N - 1, and one spare.

  - The spare is a worker that has started (imports, configuration,
    service built, connected to the master) but does not accept. When a
    worker exits, the spare takes its slot at once (one message; it adopts
    the sockets and serves within milliseconds), and a new spare starts in
    the background. Starting a Python process takes about half a second on
    an idle machine and more on a busy one; the spare keeps that out of the
    time a slot stays empty. Without a booted spare, the slot gets a new
    process directly.
  - A slot (or the spare) is started again no sooner than
    L{RESTART_INTERVAL} after its previous start, so a worker that cannot
    start does not spin; L{BOOT_FAILURES} exits in a row before serving
    stop the group (the caller's C{give_up}).
  - Stopping sends SIGTERM to every process (each worker drains as a single
    process does) and fires once all have exited; one that outlives the
    deadline is killed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from attrs import define
from twisted.internet.defer import Deferred, TimeoutError, inlineCallbacks
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.group.channel import GROUP, Channel
from llmproxy.group.spec import WorkerSpec

log = Logger(namespace="llmproxy.group")

SPARE = -1
"""The index of the spare."""

RESTART_INTERVAL = 0.5
"""The least time between two starts of one slot (or of the spare), in seconds."""

BOOT_FAILURES = 5
"""Processes of one slot that exit in a row before serving stop the group."""

PROMOTE_TIMEOUT = 5.0
"""Seconds a promoted spare has to say it serves."""


@define
class Slot:
    """
    A worker position, held by one process at a time.

    @ivar index: 0 to N - 1, or L{SPARE}.
    @ivar ready: the process serves (the spare: has booted).
    @ivar generation: the configuration generation it started with.
    @ivar promoted: when the spare holding it was told to take it over.
    """

    index: int
    process: IProcessTransport | None = None
    pid: int | None = None
    channel: Channel | None = None
    ready: bool = False
    started: float = float("-inf")
    boot_failures: int = 0
    generation: int = 0
    restart: IDelayedCall | None = None
    promoted: float | None = None

    @property
    def name(self) -> str:
        return "the spare worker" if self.index == SPARE else f"worker {self.index}"


class _WorkerProcess(ProcessProtocol):
    """
    Tells the supervisor when the process of C{slot} with C{pid} ends.
    """

    def __init__(self, supervisor: Supervisor, slot: Slot) -> None:
        self._supervisor = supervisor
        self._slot = slot
        self.pid = 0

    def processEnded(self, reason: Failure) -> None:
        self._supervisor._ended(self._slot, self.pid, reason)


def _how(reason: Failure) -> tuple[str, bool]:
    """
    How a process ended, in words, and whether that was a clean exit.
    """
    if reason.check(ProcessDone):
        return "exited with status 0", True
    value: Any = reason.value
    if reason.check(ProcessTerminated) and value.signal is not None:
        return f"was killed by signal {value.signal}", False
    return f"exited with status {getattr(value, 'exitCode', '?')}", False


def _signal(process: IProcessTransport, name: str) -> None:
    # An exited process: its end is on the way.
    with contextlib.suppress(ProcessExitedAlready):
        process.signalProcess(name)


class Supervisor:
    """
    The workers of one master.

    @ivar slots: the workers, by index.
    @ivar spare: the spare's slot, or C{None} between spares.
    @ivar generation: bumped by each accepted reload; a process that started
        before it is told to reload once it is ready.
    """

    def __init__(
        self,
        reactor: Any,
        count: int,
        spec_for: Callable[[int], tuple[WorkerSpec, dict[int, int], dict[str, str]]],
        on_ready: Callable[[Slot], object],
        give_up: Callable[[], object],
        on_ended: Callable[[int], object],
    ) -> None:
        self._reactor = reactor
        self._spec_for = spec_for
        self._on_ready = on_ready
        self._give_up = give_up
        self._on_ended = on_ended
        self.slots = [Slot(index) for index in range(count)]
        self.spare: Slot | None = None
        self.generation = 0
        self.stopping = False
        self._spare_restart: IDelayedCall | None = None
        self._waiters: list[Deferred[None]] = []

    def processes(self) -> Iterator[Slot]:
        """
        Every slot with a running process, the spare's included.
        """
        for slot in [*self.slots, self.spare]:
            if slot is not None and slot.process is not None:
                yield slot

    def serving(self) -> Iterator[Slot]:
        """
        Every ready slot with a channel, the booted spare's included.
        """
        for slot in [*self.slots, self.spare]:
            if slot is not None and slot.ready and slot.channel is not None:
                yield slot

    # -- starting ---------------------------------------------------------------

    def start(self) -> None:
        """
        Start the workers; the spare follows once they all serve, so it
        does not slow their start.
        """
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        slot.restart = None
        if self.stopping:
            return
        spec, child_fds, environ = self._spec_for(slot.index)
        argv = [sys.executable, "-m", "llmproxy.group.worker", spec.to_json()]
        fds: dict[int, Any] = {0: "w", 1: 1, 2: 2, **child_fds}
        protocol = _WorkerProcess(self, slot)
        process = self._reactor.spawnProcess(
            protocol, sys.executable, argv, env=environ, path=os.getcwd(), childFDs=fds
        )
        process.closeStdin()
        slot.process, slot.ready, slot.channel = process, False, None
        slot.pid = protocol.pid = process.pid
        slot.started = self._reactor.seconds()
        slot.generation = self.generation
        log.debug("{name} started (pid {pid})", name=slot.name, pid=slot.pid)

    def _later(self, slot: Slot) -> IDelayedCall:
        delay = max(0.0, slot.started + RESTART_INTERVAL - self._reactor.seconds())
        call: IDelayedCall = self._reactor.callLater(delay, self._spawn, slot)
        return call

    def _spawn_spare(self, slot: Slot) -> None:
        self.spare = slot
        self._spare_restart = self._later(slot)

    # -- what the processes say -----------------------------------------------

    def hello(self, channel: Channel, index: int, pid: int) -> Slot | None:
        """
        A process connected: the slot it belongs to, or C{None} for a
        stranger.
        """
        if index == SPARE:
            slot = self.spare
        else:
            slot = self.slots[index] if 0 <= index < len(self.slots) else None
        if slot is None or slot.pid != pid:
            return None
        slot.channel = channel
        return slot

    def ready(self, slot: Slot) -> None:
        """
        A worker serves, or the spare has booted.
        """
        slot.ready = True
        slot.boot_failures = 0
        now = self._reactor.seconds()
        if slot.promoted is not None:
            log.info(
                "{name} (pid {pid}) serving, {ms:.0f}ms after its promotion",
                name=slot.name,
                pid=slot.pid,
                ms=(now - slot.promoted) * 1000,
            )
        else:
            log.info(
                "{name} (pid {pid}) {what}, {seconds:.2f}s after it was started",
                name=slot.name,
                pid=slot.pid,
                what="booted" if slot.index == SPARE else "serving",
                seconds=now - slot.started,
            )
        if slot.generation != self.generation and slot.channel is not None:
            # It read the files before the last reload.
            slot.generation = self.generation
            slot.channel.call(GROUP, ["reload"], PROMOTE_TIMEOUT * 12).addErrback(lambda f: None)
        if self.spare is None and all(s.ready for s in self.slots) and not self.stopping:
            self._spawn_spare(Slot(SPARE))
        self._on_ready(slot)

    # -- a process ends -------------------------------------------------------------

    def _ended(self, slot: Slot, pid: int, reason: Failure) -> None:
        how, clean = _how(reason)
        self._on_ended(pid)
        was_ready = slot.ready
        slot.process, slot.ready = None, False
        if slot.channel is not None:
            slot.channel.close()
            slot.channel = None
        if self.stopping:
            (log.info if clean else log.error)(
                "{name} (pid {pid}) {how}", name=slot.name, pid=pid, how=how
            )
            if not any(self.processes()):
                waiters, self._waiters = self._waiters, []
                for waiter in waiters:
                    waiter.callback(None)
            return
        if not was_ready:
            slot.boot_failures += 1
            if slot.boot_failures >= BOOT_FAILURES:
                log.critical(
                    "{name} exited {count} times in a row before serving; stopping",
                    name=slot.name,
                    count=slot.boot_failures,
                )
                self._give_up()
                return
        if slot is self.spare:
            log.warn("{name} (pid {pid}) {how}; starting another", name=slot.name, pid=pid, how=how)
            self._spawn_spare(slot)
            return
        if self.slots[slot.index] is not slot:
            return
        if self._promote(slot):
            log.warn(
                "{name} (pid {pid}) {how}; the spare (pid {spare}) takes its place",
                name=slot.name,
                pid=pid,
                how=how,
                spare=self.slots[slot.index].pid,
            )
            return
        log.warn("{name} (pid {pid}) {how}; starting another", name=slot.name, pid=pid, how=how)
        slot.restart = self._later(slot)

    def _promote(self, dead: Slot) -> bool:
        """
        Put the booted spare in C{dead}'s place and start a new spare.
        """
        spare = self.spare
        if spare is None or not spare.ready or spare.channel is None:
            return False
        self.spare = None
        spare.index, spare.ready = dead.index, False
        spare.promoted = self._reactor.seconds()
        self.slots[dead.index] = spare
        promoted = spare.channel.call(GROUP, ["serve", dead.index], PROMOTE_TIMEOUT)

        def served(result: object) -> None:
            self.ready(spare)

        def failed(failure: Failure) -> None:
            log.error(
                "{name} (pid {pid}, the spare) could not take over: {error}; replacing it",
                name=spare.name,
                pid=spare.pid,
                error=failure.getErrorMessage(),
            )
            if spare.process is not None:
                _signal(spare.process, "KILL")

        promoted.addCallbacks(served, failed)
        replacement = Slot(SPARE, started=spare.started)
        self._spawn_spare(replacement)
        return True

    # -- stopping ---------------------------------------------------------------------

    @inlineCallbacks
    def stop(self, deadline: float) -> Any:
        """
        SIGTERM to every process; fires once all have exited, killing those
        still running after C{deadline} seconds.
        """
        self.stopping = True
        for slot in [*self.slots, self.spare]:
            if slot is None:
                continue
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
        if self._spare_restart is not None and self._spare_restart.active():
            self._spare_restart.cancel()
        for slot in self.processes():
            assert slot.process is not None
            _signal(slot.process, "TERM")
        ended = self._wait()
        ended.addTimeout(deadline, self._reactor)
        try:
            yield ended
        except TimeoutError:
            log.error("workers outlived the drain deadline; killing them")
            for slot in self.processes():
                assert slot.process is not None
                _signal(slot.process, "KILL")
            yield self._wait()

    def _wait(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if not any(self.processes()):
            waiter.callback(None)
        else:
            self._waiters.append(waiter)
        return waiter
