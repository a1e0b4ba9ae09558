# trial's assertion methods and twisted.application are unannotated.
# mypy: disallow-untyped-calls=False
"""
Tests for L{llmproxy.sinks}.

Most tests drive L{FileCostSink} with a L{Clock} and a fake thread runner
that runs the file write only when the test says so; one test uses the real
reactor and thread pool to show the write happens off the reactor thread.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import Any, cast

import orjson
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from llmproxy import sinks
from llmproxy.config import CostTrackingConfig, FileTransport
from llmproxy.metrics import Metrics
from llmproxy.pricing import UNPRICED
from llmproxy.records import CostRecord, make_record
from llmproxy.sinks import (
    DROP_WARNING_INTERVAL,
    STOP_ATTEMPTS,
    FanOutCostSink,
    FileCostSink,
    ICostSink,
    NullCostSink,
    PartialWriteError,
    cost_sink_for,
)
from llmproxy.usage import Usage

INTERVAL = 5.0


def record(i: int) -> CostRecord:
    return make_record(
        now=1735787045.0 + i,
        request_id=f"req-{i}",
        provider="openai",
        model="gpt-4o",
        endpoint="/openai/v1/chat/completions",
        user_id=None,
        key_id=None,
        is_streaming=False,
        status=200,
        complete=True,
        usage=Usage(input_tokens=i, output_tokens=1, reported=True),
        cost=UNPRICED,
        duration_ms=1.0,
        ttfb_ms=None,
    )


def read_ids(path: str) -> list[str]:
    """
    The request ids in the file, in order; every line must be a whole JSON
    object.
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        return []
    assert data.endswith(b"\n"), data[-100:]
    return [orjson.loads(line)["request_id"] for line in data.splitlines()]


def ids(*numbers: int) -> list[str]:
    return [f"req-{i}" for i in numbers]


class FakeRunner:
    """
    A L{sinks.ThreadRunner} that queues the work; L{run} does the oldest
    piece, as the thread would.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[[], None], Deferred[None]]] = []

    def __call__(self, f: Callable[[], None]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.calls.append((f, d))
        return d

    def run(self) -> None:
        f, d = self.calls.pop(0)
        try:
            f()
        except BaseException:
            d.errback()
        else:
            d.callback(None)


class SinkTestMixin:
    """
    A sink on a L{Clock}, a L{FakeRunner} and a fresh L{Metrics}, with its
    log events and file appends captured.
    """

    def setUpSink(self, test: SynchronousTestCase, queue_size: int = 1000) -> None:
        self.test = test
        self.clock = Clock()
        self.runner = FakeRunner()
        self.metrics = Metrics()
        self.path = os.path.join(test.mktemp(), "logs", "cost.jsonl")
        self.events: list[dict[str, Any]] = []
        test.patch(sinks, "log", Logger(observer=cast(ILogObserver, self.events.append)))
        self.appends: list[int] = []
        real_append = sinks.append_bytes

        def counting_append(path: str, data: bytes) -> None:
            self.appends.append(data.count(b"\n"))
            real_append(path, data)

        test.patch(sinks, "append_bytes", counting_append)
        self.sink = FileCostSink(
            self.path, self.clock, self.runner, INTERVAL, queue_size, self.metrics
        )

    def dropped(self) -> float | None:
        return self.metrics.registry.get_sample_value("llmproxy_cost_records_dropped_total")

    def levels(self) -> list[LogLevel]:
        return [e["log_level"] for e in self.events]


class FileCostSinkTests(SinkTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.setUpSink(self)
        self.sink.startService()
        self.addCleanup(self._stop)

    def _stop(self) -> None:
        if self.sink.running:
            d = self.sink.stopService()
            while self.runner.calls:
                self.runner.run()
            self.successResultOf(d)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ICostSink, self.sink))

    def test_batching(self) -> None:
        """
        Records wait in memory until the timer fires; then all of them go
        to the file in one append, in order, creating the directories.
        """
        for i in range(100):
            self.sink.write(record(i))
        self.clock.advance(INTERVAL - 0.1)
        self.assertEqual(self.runner.calls, [])
        self.assertFalse(os.path.exists(self.path))
        self.clock.advance(0.1)
        self.assertEqual(len(self.runner.calls), 1)
        self.assertFalse(os.path.exists(self.path), "the write happened outside the runner")
        self.runner.run()
        self.assertEqual(self.appends, [100])
        self.assertEqual(read_ids(self.path), ids(*range(100)))
        self.assertEqual(self.sink.queued, 0)

    def test_appends(self) -> None:
        """
        Each flush appends; nothing is rewritten and an idle tick writes
        nothing.
        """
        self.sink.write(record(0))
        self.clock.advance(INTERVAL)
        self.runner.run()
        self.clock.advance(INTERVAL)
        self.assertEqual(self.runner.calls, [])
        self.sink.write(record(1))
        self.sink.write(record(2))
        self.clock.advance(INTERVAL)
        self.runner.run()
        self.assertEqual(self.appends, [1, 2])
        self.assertEqual(read_ids(self.path), ids(0, 1, 2))

    def test_oneFlushInFlight(self) -> None:
        """
        While a flush is in flight, ticks start no other; records written
        meanwhile go in the next one.
        """
        for i in range(10):
            self.sink.write(record(i))
        self.clock.advance(INTERVAL)
        for i in range(10, 15):
            self.sink.write(record(i))
        self.clock.advance(INTERVAL)
        self.clock.advance(INTERVAL)
        self.assertEqual(len(self.runner.calls), 1)
        self.assertEqual(self.sink.queued, 15)
        self.runner.run()
        self.clock.advance(INTERVAL)
        self.runner.run()
        self.assertEqual(self.appends, [10, 5])
        self.assertEqual(read_ids(self.path), ids(*range(15)))

    def test_earlyFlushAtHalfQueue(self) -> None:
        """
        A batch reaching half the queue starts a flush before the timer.
        """
        sink = FileCostSink(self.path, self.clock, self.runner, INTERVAL, 10, self.metrics)
        for i in range(4):
            sink.write(record(i))
        self.assertEqual(self.runner.calls, [])
        sink.write(record(4))
        self.assertEqual(len(self.runner.calls), 1)
        self.runner.run()
        self.assertEqual(read_ids(self.path), ids(*range(5)))

    def test_flushOnStop(self) -> None:
        """
        stopService writes what is pending; its Deferred fires once the
        records are on disk; the timer is stopped.
        """
        for i in range(3):
            self.sink.write(record(i))
        d = self.sink.stopService()
        self.assertNoResult(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.runner.run()
        self.successResultOf(d)
        self.assertEqual(read_ids(self.path), ids(0, 1, 2))

    def test_stopWaitsForInFlightFlush(self) -> None:
        """
        stopService waits for the flush in flight, then writes the records
        that came after it, and those that arrive while it waits.
        """
        for i in range(3):
            self.sink.write(record(i))
        self.clock.advance(INTERVAL)
        self.sink.write(record(3))
        d = self.sink.stopService()
        self.sink.write(record(4))
        self.assertEqual(len(self.runner.calls), 1)
        self.runner.run()
        self.assertNoResult(d)
        self.runner.run()
        self.successResultOf(d)
        self.assertEqual(read_ids(self.path), ids(0, 1, 2, 3, 4))

    def test_writeAfterStop(self) -> None:
        """
        A record that arrives after the sink stopped is appended at once.
        """
        self.sink.write(record(0))
        d = self.sink.stopService()
        self.runner.run()
        self.successResultOf(d)
        self.sink.write(record(1))
        self.assertEqual(self.runner.calls, [])
        self.assertEqual(read_ids(self.path), ids(0, 1))

    def test_stopWithNothingPending(self) -> None:
        self.successResultOf(self.sink.stopService())
        self.assertEqual(self.runner.calls, [])

    def test_writeErrorRetried(self) -> None:
        """
        A failed append is logged; its records are kept and written, once and
        in order, at the next flush after the problem is fixed.
        """
        blocker = os.path.dirname(os.path.dirname(self.path))
        os.makedirs(os.path.dirname(blocker), exist_ok=True)
        with open(blocker, "w"):
            pass  # a file where the sink needs a directory
        for i in range(3):
            self.sink.write(record(i))
        self.clock.advance(INTERVAL)
        self.runner.run()
        self.assertEqual(self.sink.queued, 3)
        failures = [e for e in self.events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0]["log_failure"].value, PartialWriteError)
        self.assertEqual(failures[0]["records"], 3)
        self.sink.write(record(3))
        self.clock.advance(INTERVAL)
        self.runner.run()
        self.assertEqual(self.sink.queued, 4)
        os.remove(blocker)
        self.clock.advance(INTERVAL)
        self.runner.run()
        self.assertEqual(read_ids(self.path), ids(0, 1, 2, 3))
        self.assertEqual(self.sink.queued, 0)
        self.assertEqual(self.dropped(), 0.0)

    def test_partialWriteResumes(self) -> None:
        """
        After an append that failed part-way, the retry appends exactly the
        rest: no duplicated and no broken line.
        """
        real_append = sinks.append_bytes
        calls: list[bytes] = []

        def failing_append(path: str, data: bytes) -> None:
            calls.append(data)
            if len(calls) == 1:
                cut = data.index(b"\n") + 10  # one record and a bit of the next
                real_append(path, data[:cut])
                raise PartialWriteError(cut, OSError(errno.ENOSPC, "No space left on device"))
            real_append(path, data)

        self.patch(sinks, "append_bytes", failing_append)
        for i in range(3):
            self.sink.write(record(i))
        self.clock.advance(INTERVAL)
        self.runner.run()
        self.assertEqual(self.sink.queued, 2)
        self.sink.write(record(3))
        self.clock.advance(INTERVAL)
        self.runner.run()
        self.assertEqual(read_ids(self.path), ids(0, 1, 2, 3))

    def test_appendBytesReportsWhatWasWritten(self) -> None:
        """
        L{sinks.append_bytes} raises L{PartialWriteError} with the bytes that
        reached the file.
        """
        self.patch(sinks, "append_bytes", sinks.append_bytes)
        real_write = os.write
        writes: list[int] = []

        def short_write(fd: int, data: Any) -> int:
            if writes:
                raise OSError(errno.EIO, "I/O error")
            writes.append(real_write(fd, bytes(data[:7])))
            return writes[-1]

        self.patch(os, "write", short_write)
        with self.assertRaises(PartialWriteError) as caught:
            sinks.append_bytes(self.path, b"0123456789\n")
        self.assertEqual(caught.exception.written, 7)
        self.assertEqual(caught.exception.cause.errno, errno.EIO)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"0123456")

    def test_overflowCountedAndWarned(self) -> None:
        """
        At most C{queue_size} records wait; the rest are counted as dropped
        and reported in a warning at most once a minute.
        """
        sink = FileCostSink(self.path, self.clock, self.runner, INTERVAL, 4, self.metrics)
        sink.startService()
        self.addCleanup(sink.stopService)
        for i in range(7):
            sink.write(record(i))
        # Two went into an early flush (still in flight), two wait, three dropped.
        self.assertEqual(sink.queued, 4)
        self.assertEqual(self.dropped(), 3.0)
        warnings = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual([w["dropped"] for w in warnings], [1])
        self.clock.advance(DROP_WARNING_INTERVAL)
        warnings = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual([w["dropped"] for w in warnings], [1, 2])
        self.runner.run()
        self.clock.advance(INTERVAL)
        self.runner.run()
        self.assertEqual(read_ids(self.path), ids(0, 1, 2, 3))
        sink.write(record(7))
        self.assertEqual(self.dropped(), 3.0)

    def test_timerSurvivesAnException(self) -> None:
        """
        The timer keeps firing after its body raised.
        """
        real_flush = self.sink.flush
        attempts: list[float] = []

        def broken_flush() -> Deferred[None]:
            attempts.append(self.clock.seconds())
            if len(attempts) == 1:
                raise RuntimeError("boom")
            return real_flush()

        self.patch(self.sink, "flush", broken_flush)
        self.sink.write(record(0))
        self.clock.advance(INTERVAL)
        self.assertEqual(self.runner.calls, [])
        self.assertIn(LogLevel.critical, self.levels())
        self.clock.advance(INTERVAL)
        self.runner.run()
        self.assertEqual(attempts, [INTERVAL, 2 * INTERVAL])
        self.assertEqual(read_ids(self.path), ids(0))

    def test_runnerRaising(self) -> None:
        """
        A runner that raises instead of returning a Deferred is a failed
        flush like any other: logged, records kept, the timer still runs.
        """
        calls: list[int] = []

        def runner(f: Callable[[], None]) -> Deferred[None]:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("no threads")
            return self.runner(f)

        self.sink._run = runner
        self.sink.write(record(0))
        self.clock.advance(INTERVAL)
        self.assertEqual(self.sink.queued, 1)
        self.clock.advance(INTERVAL)
        self.runner.run()
        self.assertEqual(read_ids(self.path), ids(0))

    def test_stopGivesUpOnBrokenDisk(self) -> None:
        """
        At shutdown a disk that keeps failing does not hang the process:
        after a few attempts the records are logged and counted as dropped.
        """
        blocker = os.path.dirname(os.path.dirname(self.path))
        os.makedirs(os.path.dirname(blocker), exist_ok=True)
        with open(blocker, "w"):
            pass
        for i in range(3):
            self.sink.write(record(i))
        d = self.sink.stopService()
        for _ in range(STOP_ATTEMPTS):
            self.assertNoResult(d)
            self.runner.run()
        self.successResultOf(d)
        self.assertEqual(self.runner.calls, [])
        self.assertEqual(self.dropped(), 3.0)
        self.assertEqual(self.sink.queued, 0)
        self.assertIn(LogLevel.error, self.levels())

    def test_unserialisableRecordDropped(self) -> None:
        """
        A record that cannot be serialised is counted, not raised.
        """
        bad = record(0)
        object.__setattr__(bad, "request_id", object())
        self.sink.write(bad)
        self.assertEqual(self.dropped(), 1.0)
        self.assertEqual(self.sink.queued, 0)


class ThreadedClock(Clock):
    """
    Enough of a reactor for L{FileCostSink.from_reactor}: time and a thread
    pool that is never started.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pool = ThreadPool()

    def getThreadPool(self) -> ThreadPool:
        return self.pool


class OtherSinksTests(SynchronousTestCase):
    def test_null(self) -> None:
        sink = NullCostSink()
        self.assertTrue(verifyObject(ICostSink, sink))
        sink.write(record(0))

    def test_fanOut(self) -> None:
        got: list[list[CostRecord]] = [[], []]

        class ListSink:
            def __init__(self, into: list[CostRecord]) -> None:
                self.into = into

            def write(self, record: CostRecord) -> None:
                self.into.append(record)

        fan = FanOutCostSink([cast(ICostSink, ListSink(got[0])), cast(ICostSink, ListSink(got[1]))])
        fan.write(record(0))
        self.assertEqual(got, [[record(0)], [record(0)]])

    def test_costSinkFor(self) -> None:
        """
        Disabled tracking gets the null sink and no service; one file gets a
        L{FileCostSink} that is its own service; several get a fan-out.
        """
        reactor = ThreadedClock()
        metrics = Metrics()
        sink, service = cost_sink_for(CostTrackingConfig(), reactor, metrics)
        self.assertIsInstance(sink, NullCostSink)
        self.assertIsNone(service)

        enabled = CostTrackingConfig(enabled=True, transports=(FileTransport(path="a.jsonl"),))
        sink, service = cost_sink_for(enabled, reactor, metrics)
        self.assertIsInstance(sink, FileCostSink)
        self.assertIs(sink, service)
        assert isinstance(sink, FileCostSink)
        self.assertEqual(sink.path, "a.jsonl")

        two = CostTrackingConfig(
            enabled=True, transports=(FileTransport(path="a"), FileTransport(path="b"))
        )
        sink, service = cost_sink_for(two, reactor, metrics)
        self.assertIsInstance(sink, FanOutCostSink)
        self.assertIsInstance(service, MultiService)
        children = list(cast(MultiService, service))
        self.assertEqual(sorted(cast(FileCostSink, s).path for s in children), ["a", "b"])


class RealThreadTests(TestCase):
    """
    With the real reactor and its thread pool.
    """

    @defer.inlineCallbacks
    def test_tenThousandRecordsOffTheReactorThread(self) -> Any:
        """
        Ten thousand records written around a flush in flight are all in the
        file, in order, after stopService; no append ran in the reactor
        thread.
        """
        from twisted.internet import reactor

        reactor_thread = threading.get_ident()
        append_threads: list[int] = []
        real_append = sinks.append_bytes

        def watched_append(path: str, data: bytes) -> None:
            append_threads.append(threading.get_ident())
            real_append(path, data)

        self.patch(sinks, "append_bytes", watched_append)
        path = os.path.join(self.mktemp(), "cost.jsonl")
        sink = FileCostSink.from_reactor(path, reactor, 3600.0, 100_000, Metrics())
        sink.startService()
        for i in range(5000):
            sink.write(record(i))
        flushing = sink.flush()
        for i in range(5000, 10_000):
            sink.write(record(i))
        yield flushing
        yield sink.stopService()
        self.assertEqual(read_ids(path), ids(*range(10_000)))
        self.assertEqual(len(append_threads), 2)
        self.assertNotIn(reactor_thread, append_threads)


_APPENDER = """
import sys
from llmproxy.sinks import append_bytes
path, writer = sys.argv[1], sys.argv[2]
for batch in range(40):
    lines = [
        b'{"writer": "%s", "batch": %d, "line": %d, "pad": "%s"}\\n'
        % (writer.encode(), batch, line, b"x" * ((batch * 131 + line * 17) % 3000))
        for line in range(100)
    ]
    append_bytes(path, b"".join(lines))
"""


class ConcurrentAppendTests(SynchronousTestCase):
    """
    The workers of a group append to one cost-record file, each in batches
    of whole lines written with C{O_APPEND}.
    """

    def test_processes_never_interleave_lines(self) -> None:
        """
        Four processes appending 40 batches of 100 records (up to 300 KB a
        batch) at once: every line of the file is one whole record, each
        written once, and each writer's records are in its own order.
        """
        import subprocess
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(sinks.__file__)))
        path = os.path.join(os.path.abspath(self.mktemp()), "costs.jsonl")
        env = {**os.environ, "PYTHONPATH": root}
        writers = [
            subprocess.Popen([sys.executable, "-c", _APPENDER, path, str(n)], env=env, cwd=root)
            for n in range(4)
        ]
        for writer in writers:
            self.assertEqual(writer.wait(timeout=60), 0)
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        self.assertEqual(lines.pop(), b"")
        records = [orjson.loads(line) for line in lines]
        self.assertEqual(len(records), 4 * 40 * 100)
        for n in range(4):
            mine = [(r["batch"], r["line"]) for r in records if r["writer"] == str(n)]
            self.assertEqual(mine, [(b, i) for b in range(40) for i in range(100)])
