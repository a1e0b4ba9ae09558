"""
Tests for L{llmproxy.systemd} and for what L{llmproxy.service.ProxyService}
tells systemd: datagrams are read from a real Unix datagram socket the test
binds, time is a L{Clock}.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool

from llmproxy import buildinfo
from llmproxy.config import Config, ConfigError
from llmproxy.health import HealthBoard
from llmproxy.metrics import Metrics
from llmproxy.runtime import ProxyState, Runtime, build_runtime
from llmproxy.service import IDLE_CLOSE_DELAY, ProxyService
from llmproxy.sinks import NullCostSink
from llmproxy.systemd import (
    Notifier,
    monotonic_usec,
    notify_address,
    sd_notify,
    watchdog_interval,
)
from llmproxy.upstream import pooled_agents
from llmproxy.web import gateway_site


class Receiver:
    """
    A bound C{AF_UNIX} datagram socket standing in for systemd.
    """

    def __init__(self, test: SynchronousTestCase, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        test.addCleanup(self.sock.close)
        self.sock.setblocking(False)
        if abstract:
            name = f"llmproxy-test-{os.getpid()}-{id(self)}"
            self.sock.bind(b"\0" + name.encode())
            self.value = "@" + name
        else:
            # A short directory: socket paths are limited to 107 bytes.
            directory = tempfile.mkdtemp(prefix="llmproxy-sd-")
            test.addCleanup(shutil.rmtree, directory, True)
            self.value = os.path.join(directory, "notify")
            self.sock.bind(self.value)

    def environ(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.value, **extra}

    def notifier(self) -> Notifier:
        return Notifier.from_environment(self.environ(), os.getpid())

    def received(self) -> list[bytes]:
        """
        Every datagram waiting on the socket.
        """
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096))
            except BlockingIOError:
                return out


class AddressTests(SynchronousTestCase):
    def test_path(self) -> None:
        self.assertEqual(notify_address("/run/systemd/notify"), b"/run/systemd/notify")

    def test_abstract(self) -> None:
        """
        A leading C{@} means the abstract namespace: a NUL byte on the wire.
        """
        self.assertEqual(notify_address("@sd-notify/1"), b"\0sd-notify/1")

    def test_unusable(self) -> None:
        for value in (None, "", "relative/path", "vsock:2:1234"):
            self.assertIsNone(notify_address(value), value)


class SdNotifyTests(SynchronousTestCase):
    def test_path_socket(self) -> None:
        receiver = Receiver(self)
        self.assertTrue(sd_notify(b"READY=1", receiver.environ()))
        self.assertEqual(receiver.received(), [b"READY=1"])

    def test_abstract_socket(self) -> None:
        receiver = Receiver(self, abstract=True)
        self.assertTrue(sd_notify(b"STOPPING=1", receiver.environ()))
        self.assertEqual(receiver.received(), [b"STOPPING=1"])

    def test_unset_is_noop(self) -> None:
        self.assertFalse(sd_notify(b"READY=1", {}))
        self.assertFalse(sd_notify(b"READY=1", {"NOTIFY_SOCKET": ""}))
        notifier = Notifier.from_environment({}, 1)
        self.assertEqual(notifier, Notifier(None, None))
        self.assertFalse(notifier.ready("up"))
        self.assertFalse(notifier.watchdog())

    def test_no_listener_does_not_raise(self) -> None:
        """
        A socket nobody listens on (systemd went away) is logged, not raised.
        """
        directory = tempfile.mkdtemp(prefix="llmproxy-sd-")
        self.addCleanup(shutil.rmtree, directory, True)
        missing = os.path.join(directory, "gone")
        self.assertFalse(sd_notify(b"READY=1", {"NOTIFY_SOCKET": missing}))
        self.assertFalse(Notifier(missing.encode()).stopping("bye"))

    def test_process_environment_by_default(self) -> None:
        receiver = Receiver(self)
        saved = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = receiver.value

        def restore() -> None:
            if saved is None:
                os.environ.pop("NOTIFY_SOCKET", None)
            else:
                os.environ["NOTIFY_SOCKET"] = saved

        self.addCleanup(restore)
        self.assertTrue(sd_notify(b"WATCHDOG=1"))
        self.assertEqual(receiver.received(), [b"WATCHDOG=1"])


class NotifierTests(SynchronousTestCase):
    def test_states(self) -> None:
        """
        Each state goes in one datagram with its C{STATUS=} line; a status
        is flattened to one line (a newline would start a new assignment).
        """
        receiver = Receiver(self)
        notifier = receiver.notifier()
        notifier.ready("serving on\ntcp 9002")
        notifier.reloading(123456789)
        notifier.stopping("draining 3 requests")
        notifier.watchdog()
        self.assertEqual(
            receiver.received(),
            [
                b"READY=1\nSTATUS=serving on tcp 9002",
                b"RELOADING=1\nMONOTONIC_USEC=123456789\nSTATUS=reloading the configuration",
                b"STOPPING=1\nSTATUS=draining 3 requests",
                b"WATCHDOG=1",
            ],
        )

    def test_monotonic_usec(self) -> None:
        """
        Microseconds of C{CLOCK_MONOTONIC}, the clock systemd compares with.
        """
        before = monotonic_usec()
        now = time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000
        after = monotonic_usec()
        self.assertLessEqual(before, after)
        self.assertLess(abs(now - after), 1_000_000)


class WatchdogTests(SynchronousTestCase):
    def test_interval_is_half(self) -> None:
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7), 15.0)

    def test_pid(self) -> None:
        """
        C{WATCHDOG_PID} names the process the watchdog is for.
        """
        self.assertEqual(
            watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"}, 7), 1.0
        )
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "8"}, 7))

    def test_off(self) -> None:
        for value in ({}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "soon"}):
            self.assertIsNone(watchdog_interval(value, 7), value)

    def test_needs_a_socket(self) -> None:
        self.assertIsNone(
            Notifier.from_environment({"WATCHDOG_USEC": "2000000"}, 7).watchdog_seconds
        )
        self.assertIsNone(Notifier(None).watchdog_service(Clock()))

    def test_service_pings(self) -> None:
        """
        The watchdog service pings at once, then every half C{WatchdogSec},
        on the clock it is given, and stops with the service.
        """
        receiver = Receiver(self)
        notifier = Notifier.from_environment(receiver.environ(WATCHDOG_USEC="4000000"), os.getpid())
        clock = Clock()
        service = notifier.watchdog_service(clock)
        assert service is not None
        service.startService()
        self.assertEqual(receiver.received(), [b"WATCHDOG=1"])
        clock.advance(1.9)
        self.assertEqual(receiver.received(), [])
        clock.advance(0.1)
        self.assertEqual(receiver.received(), [b"WATCHDOG=1"])
        clock.pump([2, 2])
        self.assertEqual(receiver.received(), [b"WATCHDOG=1", b"WATCHDOG=1"])
        service.stopService()
        clock.advance(10)
        self.assertEqual(receiver.received(), [])


class _ServiceFixture(SynchronousTestCase):
    """
    A L{ProxyService} on a memory reactor, its notify socket read by the
    test, its reloads answered by the test through C{self.reloads}.
    """

    def setUp(self) -> None:
        self.receiver = Receiver(self)
        self.reactor = MemoryReactorClock()
        self.config = Config()
        agent_for = pooled_agents(self.reactor, HTTPConnectionPool(self.reactor))
        self.runtime = build_runtime(self.config, agent_for, None)
        self.state = ProxyState(
            clock=self.reactor,
            runtime=self.runtime,
            metrics=Metrics(),
            health=HealthBoard(self.reactor),
            sink=NullCostSink(),
            build=buildinfo.load(),
            started_at=0.0,
        )
        self.reloads: list[Deferred[Runtime]] = []

    def reloader(self) -> Deferred[Runtime]:
        d: Deferred[Runtime] = Deferred()
        self.reloads.append(d)
        return d

    def service(self, **environ: str) -> ProxyService:
        notifier = Notifier.from_environment(self.receiver.environ(**environ), os.getpid())
        service = ProxyService(
            self.reactor,
            [],
            gateway_site(self.state),
            self.state,
            HTTPConnectionPool(self.reactor),
            self.reloader,
            notifier=notifier,
            monotonic=lambda: 42,
        )
        service.privilegedStartService()
        service.startService()
        self.addCleanup(self.stop, service)
        return service

    def stop(self, service: ProxyService) -> None:
        if service.running:
            service.stopService()
            self.reactor.advance(10)


class ServiceNotificationTests(_ServiceFixture):
    """
    What L{ProxyService} sends over its life: READY once the reactor runs,
    RELOADING then READY around each reload, STOPPING when the drain begins.
    """

    def test_ready_once_running(self) -> None:
        """
        READY=1 waits for the reactor to run: twistd starts services first.
        """
        self.service()
        self.assertEqual(self.receiver.received(), [])
        self.reactor.run()
        [ready] = self.receiver.received()
        self.assertTrue(ready.startswith(b"READY=1\nSTATUS=serving on"), ready)

    def test_reload_success(self) -> None:
        service = self.service()
        self.reactor.run()
        self.receiver.received()
        new = build_runtime(
            self.config, pooled_agents(self.reactor, HTTPConnectionPool(self.reactor)), None
        )
        result = service.reload()
        assert result is not None
        self.assertEqual(
            self.receiver.received(),
            [b"RELOADING=1\nMONOTONIC_USEC=42\nSTATUS=reloading the configuration"],
        )
        self.reloads[0].callback(new)
        self.assertIs(self.successResultOf(result), new)
        self.assertIs(self.state.runtime, new)
        self.assertEqual(self.receiver.received(), [b"READY=1\nSTATUS=configuration reloaded"])

    def test_reload_failure(self) -> None:
        """
        A rejected file keeps the runtime, and systemd still hears READY=1
        (the reload is over), with a status saying it failed.
        """
        service = self.service()
        self.reactor.run()
        self.receiver.received()
        result = service.reload()
        assert result is not None
        self.reloads[0].errback(ConfigError("x.yml: server.listen: expected a list"))
        self.assertIsNone(self.successResultOf(result))
        self.assertIs(self.state.runtime, self.runtime)
        self.flushLoggedErrors()
        received = self.receiver.received()
        self.assertEqual(received[0].split(b"\n")[0], b"RELOADING=1")
        self.assertEqual(
            received[1:],
            [b"READY=1\nSTATUS=configuration reload failed; running the previous configuration"],
        )

    def test_reloads_one_at_a_time(self) -> None:
        """
        A second SIGHUP during a reload starts another reload once the first
        ends, so an older file never replaces a newer one.
        """
        service = self.service()
        first = service.reload()
        second = service.reload()
        assert first is not None and second is not None
        self.assertEqual(len(self.reloads), 1)
        one = build_runtime(
            self.config, pooled_agents(self.reactor, HTTPConnectionPool(self.reactor)), None
        )
        two = build_runtime(
            self.config, pooled_agents(self.reactor, HTTPConnectionPool(self.reactor)), None
        )
        self.reloads[0].callback(one)
        self.assertEqual(len(self.reloads), 2)
        self.assertNoResult(second)
        self.reloads[1].callback(two)
        self.assertIs(self.successResultOf(second), two)
        self.assertIs(self.state.runtime, two)

    def test_stopping(self) -> None:
        """
        STOPPING=1 is sent when the drain begins, before the grace period.
        """
        service = self.service()
        self.reactor.run()
        self.receiver.received()
        self.state.request_started()
        stopped = service.stopService()
        self.assertEqual(
            self.receiver.received(), [b"STOPPING=1\nSTATUS=draining 1 requests in flight"]
        )
        self.state.request_finished()
        self.reactor.advance(1)
        self.successResultOf(stopped)

    def test_no_ready_while_draining(self) -> None:
        """
        A reload that ends during the drain does not tell systemd the
        process is ready again.
        """
        service = self.service()
        self.reactor.run()
        result = service.reload()
        assert result is not None
        service.stopService()
        self.receiver.received()
        self.reloads[0].errback(ConfigError("bad"))
        self.successResultOf(result)
        self.flushLoggedErrors()
        self.assertEqual(self.receiver.received(), [])

    def test_watchdog_child(self) -> None:
        """
        With C{WATCHDOG_USEC} the service runs a watchdog child that keeps
        pinging during the drain, and stops after it.
        """
        service = self.service(WATCHDOG_USEC="1000000")
        self.assertEqual(self.receiver.received(), [b"WATCHDOG=1"])
        self.state.request_started()
        service.stopService()
        self.receiver.received()
        self.reactor.advance(0.5)
        self.assertEqual(self.receiver.received(), [b"WATCHDOG=1"])
        self.state.request_finished()
        self.reactor.advance(0.1)
        self.reactor.advance(0.5)
        self.assertEqual(self.receiver.received(), [])

    def test_default_notifier_from_environment(self) -> None:
        """
        Without a notifier argument the service reads the process
        environment.
        """
        saved = os.environ.pop("NOTIFY_SOCKET", None)
        if saved is not None:
            self.addCleanup(os.environ.__setitem__, "NOTIFY_SOCKET", saved)
        service = ProxyService(
            self.reactor, [], gateway_site(self.state), self.state, HTTPConnectionPool(self.reactor)
        )
        self.assertEqual(service.notifier, Notifier(None, None))


class _Transport:
    def __init__(self) -> None:
        self.connected = True

    def loseConnection(self) -> None:
        self.connected = False


class _Channel:
    def __init__(self, busy: bool) -> None:
        self.requests: list[object] = [object()] if busy else []
        self.persistent = True
        self.transport = _Transport()


class DrainIdleDelayTests(_ServiceFixture):
    """
    The drain closes connections without a request only after
    L{IDLE_CLOSE_DELAY}: one accepted just before the listener closed may
    not have been read yet (found by the restart-under-load test).
    """

    def test_requestless_connection_gets_a_moment(self) -> None:
        service = self.service()
        site = service._site
        fresh, busy = _Channel(busy=False), _Channel(busy=True)
        site.channels.add(fresh)  # type: ignore[arg-type]
        site.channels.add(busy)  # type: ignore[arg-type]
        self.state.request_started()
        service.stopService()
        self.assertTrue(fresh.transport.connected)
        self.reactor.advance(IDLE_CLOSE_DELAY - 0.01)
        self.assertTrue(fresh.transport.connected)
        self.reactor.advance(0.01)
        self.assertFalse(fresh.transport.connected)
        self.assertTrue(busy.transport.connected)
        self.assertFalse(busy.persistent)
        self.state.request_finished()
        self.reactor.advance(0)
        self.assertFalse(busy.transport.connected)
