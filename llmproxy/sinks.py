# -*- test-case-name: llmproxy.test.test_sinks -*-
# twisted.application.service is unannotated; calling it is fine.
# mypy: disallow-untyped-calls=False
"""
Cost sinks: where cost records go.

The forwarder calls L{ICostSink.write} once per request, in the reactor
thread, so a write must never block and never raise. L{FileCostSink}
buffers records in memory and appends them to a JSON Lines file from a
thread, once per flush interval and at shutdown.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

from llmproxy.config import CostTrackingConfig
from llmproxy.metrics import Metrics
from llmproxy.records import CostRecord

log = Logger()

DROP_WARNING_INTERVAL = 60.0
"""Seconds between two warnings about dropped records."""

STOP_ATTEMPTS = 3
"""Appends tried in a row at shutdown before the remaining records are given up."""

FILE_MODE = 0o640
"""Records name users and key ids: not for every local account to read."""


class ICostSink(Interface):
    """
    Receives one cost record per forwarded request.
    """

    wants_records = Attribute(
        "Whether records given to this sink go anywhere: when not, nobody "
        "builds them (a record costs about as much as the rest of accounting)."
    )

    def write(record: CostRecord) -> None:  # noqa: N805 (zope interface method)
        """
        Accept C{record}. Never blocks, never raises.
        """


@implementer(ICostSink)
class NullCostSink:
    """
    The sink when cost tracking is off: records are dropped on purpose.
    """

    wants_records = False

    def write(self, record: CostRecord) -> None:
        pass


class ThreadRunner(Protocol):
    """
    Runs a blocking callable off the reactor thread; the Deferred fires in
    the reactor thread with its result or failure.
    """

    def __call__(self, f: Callable[[], None]) -> Deferred[None]: ...


def threadpool_runner(reactor: IReactorFromThreads, pool: ThreadPool) -> ThreadRunner:
    """
    A L{ThreadRunner} over a Twisted thread pool.
    """

    def run(f: Callable[[], None]) -> Deferred[None]:
        return deferToThreadPool(reactor, pool, f)

    return run


class PartialWriteError(Exception):
    """
    Appending failed after C{written} bytes reached the file.
    """

    def __init__(self, written: int, cause: OSError) -> None:
        super().__init__(written, cause)
        self.written = written
        self.cause = cause

    def __str__(self) -> str:
        return f"{self.cause} (after {self.written} bytes)"


def append_bytes(path: str, data: bytes) -> None:
    """
    Append C{data} to C{path}, creating the file and its directories.
    Blocking: run it in a thread.

    The file is opened for each flush, so a log rotation that moves it away
    is followed by a fresh file at the next flush (no copytruncate needed).

    @raise PartialWriteError: if it fails, with the number of bytes that did
        reach the file, so a retry appends exactly the rest and never
        duplicates a line.
    """
    written = 0
    try:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            view = memoryview(data)
            while written < len(data):
                written += os.write(fd, view[written:])
        finally:
            os.close(fd)
    except OSError as e:
        raise PartialWriteError(written, e) from e


@implementer(ICostSink)
class FileCostSink(Service):
    """
    Appends cost records to a JSON Lines file, in batches, off the reactor
    thread.

      - L{write} serialises the record and adds it to the pending batch.
        Nothing else happens in the caller's stack, except that a batch
        reaching half of C{queue_size} starts a flush early.
      - Every C{flush_interval} seconds, the whole pending batch goes to
        the file in one append, in a thread; at most one flush is in flight.
      - A failed append is logged and its unwritten part is put back at the
        head of the batch, to be retried at the next flush, in order.
      - At most C{queue_size} records wait (pending plus in flight). Beyond
        that (the disk has been failing for a while), new records are
        dropped, counted in C{llmproxy_cost_records_dropped_total} and
        reported in a warning at most once a minute.
      - L{stopService} waits for the flush in flight, then writes everything
        left; twistd's shutdown waits for its Deferred. A record written
        after that is appended synchronously, as a last resort.
    """

    wants_records = True

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        run_in_thread: ThreadRunner,
        flush_interval: float,
        queue_size: int,
        metrics: Metrics,
    ) -> None:
        self.path = path
        self._clock = clock
        self._run = run_in_thread
        self._interval = flush_interval
        self._queue_size = queue_size
        self._metrics = metrics
        self._pending: list[bytes] = []
        self._pending_records = 0
        self._inflight_records = 0
        self._flushing = False
        self._failures = 0
        self._waiters: list[Deferred[None]] = []
        self._loop: LoopingCall | None = None
        self._stopped = False
        self._dropped_unreported = 0
        self._last_drop_warning: float | None = None

    @classmethod
    def from_reactor(
        cls,
        path: str,
        reactor: Any,
        flush_interval: float,
        queue_size: int,
        metrics: Metrics,
    ) -> FileCostSink:
        """
        A sink that writes in the reactor's thread pool. C{reactor} provides
        L{IReactorTime}, L{IReactorThreads} and L{IReactorFromThreads}.
        """
        runner = threadpool_runner(reactor, reactor.getThreadPool())
        return cls(path, reactor, runner, flush_interval, queue_size, metrics)

    @property
    def queued(self) -> int:
        """
        Records accepted but not yet on disk.
        """
        return self._pending_records + self._inflight_records

    # -- ICostSink ------------------------------------------------------------

    def write(self, record: CostRecord) -> None:
        try:
            line = record.to_json() + b"\n"
        except Exception:
            log.failure("Could not serialise a cost record; dropped")
            self._drop(1)
            return
        if self._stopped:
            self._write_now(line)
            return
        if self.queued >= self._queue_size:
            self._drop(1)
            return
        self._pending.append(line)
        self._pending_records += 1
        if self._pending_records * 2 >= self._queue_size and not self._flushing:
            self._start_flush()

    # -- flushing -------------------------------------------------------------

    def flush(self) -> Deferred[None]:
        """
        Start appending the pending batch, unless a flush is already in
        flight or nothing is pending.

        @return: a Deferred that fires with C{None} (never a failure) when
            the flush in flight, if any, is over, whether it succeeded or
            not.
        """
        if not self._flushing and self._pending:
            self._start_flush()
        if not self._flushing:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._waiters.append(done)
        return done

    def _start_flush(self) -> None:
        batch = b"".join(self._pending)
        self._inflight_records = self._pending_records
        self._pending = []
        self._pending_records = 0
        self._flushing = True
        try:
            d = self._run(partial(append_bytes, self.path, batch))
        except Exception:
            d = fail()
        d.addCallbacks(self._flushed, self._flush_failed, errbackArgs=(batch,))
        d.addErrback(lambda f: log.failure("Cost record flush bookkeeping failed", f))
        d.addBoth(self._flush_over)

    def _flushed(self, result: object) -> None:
        self._inflight_records = 0
        self._failures = 0

    def _flush_failed(self, failure: Failure, batch: bytes) -> None:
        written = failure.value.written if isinstance(failure.value, PartialWriteError) else 0
        rest = batch[written:]
        kept = rest.count(b"\n")
        self._inflight_records = 0
        self._failures += 1
        self._pending.insert(0, rest)
        self._pending_records += kept
        log.failure(
            "Appending {records} cost records to {path} failed; they are kept and retried",
            failure,
            records=kept,
            path=self.path,
        )

    def _flush_over(self, result: object) -> None:
        self._flushing = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _tick(self) -> None:
        """
        The timer's body. It must not raise: a LoopingCall whose function
        raises stops for good.
        """
        try:
            self._report_drops()
            self.flush()
        except Exception:
            log.failure("Cost record flush failed")

    # -- dropping -------------------------------------------------------------

    def _drop(self, n: int) -> None:
        self._metrics.cost_record_dropped(n)
        self._dropped_unreported += n
        self._report_drops()

    def _report_drops(self) -> None:
        """
        Warn about records dropped since the last warning, at most once per
        L{DROP_WARNING_INTERVAL}.
        """
        if not self._dropped_unreported:
            return
        now = self._clock.seconds()
        last = self._last_drop_warning
        if last is not None and now - last < DROP_WARNING_INTERVAL:
            return
        self._last_drop_warning = now
        log.warn(
            "Dropped {dropped} cost records: {queued} were already waiting to be written to "
            "{path} (features.cost_tracking.queue_size: {queue_size})",
            dropped=self._dropped_unreported,
            queued=self.queued,
            path=self.path,
            queue_size=self._queue_size,
        )
        self._dropped_unreported = 0

    def _write_now(self, line: bytes) -> None:
        """
        Last resort after shutdown: append in the calling thread.
        """
        try:
            append_bytes(self.path, line)
        except PartialWriteError:
            log.failure("Could not write a cost record after shutdown; dropped")
            self._metrics.cost_record_dropped(1)

    # -- IService -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        loop = self._loop = LoopingCall(self._tick)
        loop.clock = self._clock
        loop.start(self._interval, now=False).addErrback(
            lambda f: log.failure("Cost flush timer stopped", f)
        )

    def stopService(self) -> Deferred[None]:
        """
        Stop the timer, then write everything: the flush in flight first,
        then what is left (including records that arrive meanwhile).

        @return: a Deferred that fires when every record is on disk. It
            never fails: after L{STOP_ATTEMPTS} failed appends in a row the
            remaining records are logged and counted as dropped, so a broken
            disk cannot hang the shutdown.
        """
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._failures = 0
        return self._drain(None)

    def _drain(self, result: object) -> Deferred[None]:
        if self._flushing or (self._pending and self._failures < STOP_ATTEMPTS):
            return self.flush().addCallback(self._drain)
        if self._pending:
            lost = self._pending_records
            log.error(
                "Giving up on {records} cost records that could not be written to {path}",
                records=lost,
                path=self.path,
            )
            self._pending = []
            self._pending_records = 0
            self._metrics.cost_record_dropped(lost)
        self._stopped = True
        return succeed(None)


def cost_sink_for(
    config: CostTrackingConfig, reactor: Any, metrics: Metrics
) -> tuple[ICostSink, IService | None]:
    """
    The sink for C{features.cost_tracking}, and the service to start and
    stop with the process (C{None} when there is nothing to flush).

    Every configured file transport receives every record.
    """
    if not config.enabled or not config.transports:
        return NullCostSink(), None
    sinks = [
        FileCostSink.from_reactor(
            transport.path,
            reactor,
            config.flush_interval_seconds,
            config.queue_size,
            metrics,
        )
        for transport in config.transports
    ]
    if len(sinks) == 1:
        return sinks[0], sinks[0]
    parent = MultiService()
    for sink in sinks:
        sink.setServiceParent(parent)
    return FanOutCostSink(sinks), parent


@implementer(ICostSink)
class FanOutCostSink:
    """
    Gives every record to several sinks.
    """

    wants_records = True

    def __init__(self, sinks: Sequence[ICostSink]) -> None:
        self._sinks = tuple(sinks)

    def write(self, record: CostRecord) -> None:
        for sink in self._sinks:
            sink.write(record)
