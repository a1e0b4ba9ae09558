"""
Tests for L{llmproxy.group.supervisor}: workers and the spare started,
replaced, promoted and stopped, on a fake reactor that records the
processes it is asked to spawn and lets the test end them.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.group.channel import GROUP, RemoteError
from llmproxy.group.listeners import Inherited
from llmproxy.group.spec import WorkerSpec
from llmproxy.group.supervisor import (
    BOOT_FAILURES,
    RESTART_INTERVAL,
    SPARE,
    Slot,
    Supervisor,
)


class FakeProcess:
    def __init__(self, protocol: Any, pid: int, argv: list[str], fds: dict[int, Any]) -> None:
        self.protocol = protocol
        self.pid = pid
        self.argv = argv
        self.fds = fds
        self.signals: list[str] = []

    def closeStdin(self) -> None:
        pass

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def end(self, reason: Failure | None = None) -> None:
        self.protocol.processEnded(reason or Failure(ProcessDone(0)))


class ProcessReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcess] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], **kw: Any) -> Any:
        process = FakeProcess(protocol, 1000 + len(self.spawned), args, kw["childFDs"])
        self.spawned.append(process)
        return process


class FakeChannel:
    def __init__(self) -> None:
        self.calls: list[tuple[int, Any, Deferred[Any]]] = []
        self.closed = False

    def call(self, kind: int, body: Any, timeout: float | None = None) -> Deferred[Any]:
        answer: Deferred[Any] = Deferred()
        self.calls.append((kind, body, answer))
        return answer

    def close(self) -> None:
        self.closed = True


KILLED = Failure(ProcessTerminated(signal=9))


class SupervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.ready: list[Slot] = []
        self.ended: list[int] = []
        self.gave_up: list[None] = []
        self.supervisor = Supervisor(
            self.reactor,
            2,
            self.spec_for,
            self.ready.append,
            lambda: self.gave_up.append(None),
            self.ended.append,
        )

    def spec_for(self, index: int) -> tuple[WorkerSpec, dict[int, int], dict[str, str]]:
        spec = WorkerSpec(
            index=index,
            configs=("c.yml",),
            listeners=(Inherited("tcp:0", 3, socket.AF_INET),),
            state="/s",
            metrics="/m",
        )
        return spec, {3: 40}, {"X": "1"}

    def boot(self, process: FakeProcess) -> FakeChannel:
        """
        The process says hello and that it is ready (or booted).
        """
        spec = WorkerSpec.from_json(process.argv[-1])
        channel = FakeChannel()
        slot = self.supervisor.hello(channel, spec.index, process.pid)  # type: ignore[arg-type]
        assert slot is not None
        self.supervisor.ready(slot)
        return channel

    def start_all(self) -> tuple[list[FakeChannel], FakeChannel]:
        """
        Start the group, boot both workers, then the spare they let start.
        """
        self.supervisor.start()
        channels = [self.boot(process) for process in self.reactor.spawned]
        self.reactor.advance(0)
        spare = self.reactor.spawned[2]
        self.assertEqual(WorkerSpec.from_json(spare.argv[-1]).index, SPARE)
        return channels, self.boot(spare)

    def test_start(self) -> None:
        """
        Each worker starts with its index, the listening sockets and the
        environment it is given; the spare waits until they all serve.
        """
        self.supervisor.start()
        spawned = self.reactor.spawned
        self.assertEqual(len(spawned), 2)
        self.assertEqual([WorkerSpec.from_json(p.argv[-1]).index for p in spawned], [0, 1])
        self.assertEqual(spawned[0].argv[1:3], ["-m", "llmproxy.group.worker"])
        self.assertEqual(spawned[0].fds, {0: "w", 1: 1, 2: 2, 3: 40})
        self.boot(spawned[0])
        self.reactor.advance(0)
        self.assertEqual(len(spawned), 2)
        self.boot(spawned[1])
        self.reactor.advance(0)
        self.assertEqual(len(spawned), 3)
        self.assertEqual([slot.index for slot in self.ready], [0, 1])

    def test_promotion(self) -> None:
        """
        A serving worker dies: the booted spare is told to take its slot and
        counts as serving once it says so; a new spare starts; the dead
        worker's metrics are let go.
        """
        _, spare_channel = self.start_all()
        dead = self.reactor.spawned[0]
        dead.end(KILLED)
        self.assertEqual(self.ended, [dead.pid])
        [(kind, body, answer)] = spare_channel.calls
        self.assertEqual((kind, body), (GROUP, ["serve", 0]))
        slot = self.supervisor.slots[0]
        self.assertEqual(slot.pid, self.reactor.spawned[2].pid)
        self.assertFalse(slot.ready)
        answer.callback(True)
        self.assertTrue(slot.ready)
        self.assertIs(self.ready[-1], slot)
        self.reactor.advance(RESTART_INTERVAL)
        self.assertEqual(len(self.reactor.spawned), 4)
        self.assertEqual(WorkerSpec.from_json(self.reactor.spawned[3].argv[-1]).index, SPARE)

    def test_failed_promotion(self) -> None:
        """
        A spare that cannot take over is killed, and replaced in turn.
        """
        _, spare_channel = self.start_all()
        self.reactor.spawned[1].end(KILLED)
        spare_channel.calls[0][2].errback(RemoteError("no"))
        spare = self.reactor.spawned[2]
        self.assertEqual(spare.signals, ["KILL"])
        spare.end(KILLED)
        self.reactor.advance(RESTART_INTERVAL)
        [index] = [
            WorkerSpec.from_json(p.argv[-1]).index
            for p in self.reactor.spawned[3:]
            if WorkerSpec.from_json(p.argv[-1]).index != SPARE
        ]
        self.assertEqual(index, 1)

    def test_no_spare(self) -> None:
        """
        Without a booted spare a dead worker's slot gets a new process, no
        sooner than L{RESTART_INTERVAL} after the previous start.
        """
        self.supervisor.start()
        first = self.reactor.spawned[0]
        self.boot(first)
        self.reactor.advance(0.1)
        first.end(KILLED)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(RESTART_INTERVAL - 0.1)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual(WorkerSpec.from_json(self.reactor.spawned[2].argv[-1]).index, 0)

    def test_boot_failures_give_up(self) -> None:
        """
        A slot whose processes keep exiting before they serve stops the
        group; one that served in between resets the count.
        """
        self.supervisor.start()
        for attempt in range(BOOT_FAILURES):
            self.assertEqual(self.gave_up, [])
            self.reactor.spawned[-2 if attempt == 0 else -1].end(Failure(ProcessTerminated(1)))
            self.reactor.advance(RESTART_INTERVAL)
        self.assertEqual(self.gave_up, [None])

    def test_strangers(self) -> None:
        """
        A hello from a process the supervisor did not start is refused.
        """
        self.supervisor.start()
        pid = self.reactor.spawned[0].pid
        self.assertIsNone(self.supervisor.hello(FakeChannel(), 0, pid + 100))  # type: ignore[arg-type]
        self.assertIsNone(self.supervisor.hello(FakeChannel(), 7, pid))  # type: ignore[arg-type]
        self.assertIsNone(self.supervisor.hello(FakeChannel(), SPARE, pid))  # type: ignore[arg-type]

    def test_stop(self) -> None:
        """
        Stopping sends SIGTERM to every process, the spare's included,
        restarts nothing, and fires once all have exited.
        """
        self.start_all()
        stopped = self.supervisor.stop(30.0)
        for process in self.reactor.spawned:
            self.assertEqual(process.signals, ["TERM"])
        self.reactor.spawned[0].end()
        self.reactor.spawned[2].end()
        self.assertNoResult(stopped)
        self.reactor.spawned[1].end()
        self.successResultOf(stopped)
        self.reactor.advance(10)
        self.assertEqual(len(self.reactor.spawned), 3)

    def test_stop_deadline(self) -> None:
        """
        A process still running at the deadline is killed.
        """
        self.start_all()
        stopped = self.supervisor.stop(30.0)
        for process in self.reactor.spawned[1:]:
            process.end()
        self.reactor.advance(30.0)
        self.assertEqual(self.reactor.spawned[0].signals, ["TERM", "KILL"])
        self.reactor.spawned[0].end(KILLED)
        self.successResultOf(stopped)
        self.flushLoggedErrors()

    def test_late_reload(self) -> None:
        """
        A process that read the files before the last reload is told to
        reload once it is ready.
        """
        self.supervisor.start()
        self.supervisor.generation += 1
        channel = self.boot(self.reactor.spawned[0])
        [(kind, body, _)] = channel.calls
        self.assertEqual((kind, body), (GROUP, ["reload"]))
