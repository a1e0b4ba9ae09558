"""
Tests for L{llmproxy.ratelimit.remote}: the master's memory limiter seen by
workers through their channels.

The whole backend contract (L{LimiterContractMixin}) runs against a
L{RemoteRateLimiter} whose channel is joined in memory to a master-side
channel serving a L{MemoryRateLimiter}, so every decision crosses the real
encoding both ways.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llmproxy.config import Limits, RateLimitConfig
from llmproxy.group.channel import RATE_LIMIT, Channel, RemoteError
from llmproxy.ratelimit import (
    BackendUnavailable,
    IRateLimiter,
    MemoryRateLimiter,
    RemoteRateLimiter,
    limiter_for,
    reconfigure_limiter,
    services_for,
)
from llmproxy.ratelimit.remote import remote_limiter_factory, serve_limiter
from llmproxy.test.test_ratelimit import T0, LimiterContractMixin, config, request


class _Deliver(StringTransport):
    """
    A transport that hands what is written straight to the peer channel
    (C{immediate}), or keeps it until L{flush}.
    """

    def __init__(self, immediate: bool) -> None:
        super().__init__()
        self.peer: Channel | None = None
        self.immediate = immediate

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.immediate:
            self.flush()

    def flush(self) -> bool:
        data = self.value()
        if not data:
            return False
        self.clear()
        assert self.peer is not None
        self.peer.dataReceived(data)
        return True


def join(worker: Channel, master: Channel, immediate: bool = True) -> list[_Deliver]:
    """
    Connect two channels in memory; the two transports.
    """
    to_master, to_worker = _Deliver(immediate), _Deliver(immediate)
    to_master.peer, to_worker.peer = master, worker
    worker.makeConnection(to_master)
    master.makeConnection(to_worker)
    return [to_master, to_worker]


class Master:
    """
    A master's end: one L{MemoryRateLimiter}, served on as many channels as
    workers connect.
    """

    def __init__(self, clock: Clock, limits: RateLimitConfig) -> None:
        self.clock = clock
        self.limiter: MemoryRateLimiter | None = MemoryRateLimiter(limits, clock)
        self.transports: list[_Deliver] = []

    def worker(self, limits: RateLimitConfig, immediate: bool = True) -> RemoteRateLimiter:
        channel = Channel({}, self.clock)
        served = Channel({RATE_LIMIT: serve_limiter(lambda: self.limiter)}, self.clock)
        self.transports += join(channel, served, immediate)
        return RemoteRateLimiter(limits, channel, self.clock)

    def pump(self) -> None:
        while any([transport.flush() for transport in self.transports]):
            pass


class RemoteLimiterContractTests(LimiterContractMixin, TestCase):
    """
    The contract, for L{RemoteRateLimiter}.
    """

    def make_limiter(self, config: RateLimitConfig) -> IRateLimiter:
        self.config = config
        self.master = Master(self.clock, config)
        return self.master.worker(config)

    def make_limiter_sharing(self, limiter: IRateLimiter) -> IRateLimiter:
        # The master's clock decides (the contract may have replaced it).
        assert self.master.limiter is not None
        self.master.limiter._clock = self.clock
        return self.master.worker(self.config)


class RemoteLimiterTests(SynchronousTestCase):
    """
    What only the shared memory backend does.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.limits = config(Limits(requests_per_minute=100))

    def test_exact_across_workers(self) -> None:
        """
        300 reservations sent at once by three workers, their frames queued
        and delivered in a burst: exactly 100 are admitted, and the
        master's counters hold 100.
        """
        master = Master(self.clock, self.limits)
        workers = [master.worker(self.limits, immediate=False) for _ in range(3)]
        asked = [workers[n % 3].reserve(request(5)) for n in range(300)]
        master.pump()
        decisions = [self.successResultOf(d) for d in asked]
        self.assertEqual(sum(decision.allowed for decision in decisions), 100)
        denial = next(d.denial for d in decisions if d.denial is not None)
        self.assertEqual((denial.scope, denial.metric, denial.limit), ("global", "requests", 100))
        assert master.limiter is not None
        self.assertEqual(master.limiter._counters["minute"]["global"].requests, 100)

    def test_reconcile_and_release_reach_the_master(self) -> None:
        """
        Corrections are one-way messages; the master applies them before
        the worker's next reservation.
        """
        limits = config(Limits(tokens_per_minute=1000))
        master = Master(self.clock, limits)
        worker = master.worker(limits)
        first = self.successResultOf(worker.reserve(request(100))).reservation
        assert first is not None and master.limiter is not None
        self.successResultOf(worker.reconcile(first, 700))
        counter = master.limiter._counters["minute"]["global"]
        self.assertEqual((counter.requests, counter.tokens), (1, 700))
        second = self.successResultOf(worker.reserve(request(300))).reservation
        assert second is not None
        self.assertFalse(self.successResultOf(worker.reserve(request(1))).allowed)
        self.successResultOf(worker.release(second))
        self.assertEqual((counter.requests, counter.tokens), (1, 700))

    def test_master_gone(self) -> None:
        """
        No master: C{fail_mode: open} admits without a reservation,
        C{closed} refuses with L{BackendUnavailable}; each failure is
        counted, and one warning is logged per interval.
        """
        errors: list[None] = []
        for mode in ("open", "closed"):
            limits = RateLimitConfig(enabled=True, fail_mode=mode)
            channel = Channel({}, self.clock)
            channel.makeConnection(StringTransport())
            channel.connectionLost()
            limiter = RemoteRateLimiter(limits, channel, self.clock, lambda: errors.append(None))
            for _ in range(3):
                reserved = limiter.reserve(request())
                if mode == "open":
                    decision = self.successResultOf(reserved)
                    self.assertTrue(decision.allowed)
                    self.assertIsNone(decision.reservation)
                else:
                    self.failureResultOf(reserved, BackendUnavailable)
        self.assertEqual(len(errors), 6)

    def test_no_limiter_in_the_master(self) -> None:
        """
        A worker whose configuration asks for the memory backend while the
        master has none (a reload in between) gets the master's refusal,
        and C{fail_mode} decides.
        """
        master = Master(self.clock, self.limits)
        master.limiter = None
        worker = master.worker(RateLimitConfig(enabled=True, fail_mode="closed"))
        self.failureResultOf(worker.reserve(request()), BackendUnavailable)

    def test_timeout(self) -> None:
        """
        A master that does not answer within L{CALL_TIMEOUT}: C{fail_mode}
        decides.
        """
        master = Master(self.clock, self.limits)
        worker = master.worker(self.limits, immediate=False)
        reserved = worker.reserve(request())
        self.clock.advance(5.0)
        decision = self.successResultOf(reserved)
        self.assertTrue(decision.allowed)
        self.assertIsNone(decision.reservation)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_bad_requests(self) -> None:
        """
        An unknown request is refused; the master keeps serving.
        """
        master = Master(self.clock, self.limits)
        handle = serve_limiter(lambda: master.limiter)
        self.assertRaises(RemoteError, handle, None, ["?", 1, 2, []])
        self.assertEqual(handle(None, ["r", "openai", None, None, None, 0])[0], 1)


class FactoryTests(SynchronousTestCase):
    """
    How a worker gets a L{RemoteRateLimiter}: the C{memory} backend's
    builder.
    """

    def test_memory_backend_builder(self) -> None:
        clock = Clock()
        channel = Channel({}, clock)
        memory = remote_limiter_factory(channel, clock)
        on = RateLimitConfig(enabled=True)
        limiter: Any = limiter_for(on, clock, memory=memory)
        self.assertIsInstance(limiter, RemoteRateLimiter)
        self.assertEqual(services_for(limiter, on, clock), [])
        closed = RateLimitConfig(enabled=True, fail_mode="closed")
        self.assertIs(reconfigure_limiter(limiter, on, closed, clock, memory=memory), limiter)
        self.assertIs(limiter._config, closed)
        redis = RateLimitConfig(enabled=True, backend="redis")
        self.assertNotIsInstance(
            reconfigure_limiter(limiter, on, redis, clock, memory=memory), RemoteRateLimiter
        )
