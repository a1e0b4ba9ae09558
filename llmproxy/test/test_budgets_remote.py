"""
Tests for L{llmproxy.budgets.remote}: the master's memory spend store seen
by workers through their channels, joined in memory to master-side
channels, so every decision crosses the real encoding both ways.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.budgets import (
    MemorySpendStore,
    RemoteSpendStore,
    SpendDecision,
    Spent,
    reconfigure_spend_store,
    spend_store_for,
)
from llmproxy.budgets.memory import Tallies
from llmproxy.budgets.policy import BudgetReservation, Hold, usd_to_nanos
from llmproxy.budgets.remote import (
    REBUILD_POLL,
    SpendServer,
    remote_spend_factory,
)
from llmproxy.config import RateLimitConfig, parse_config
from llmproxy.group.channel import BUDGETS, Channel, RemoteError
from llmproxy.ratelimit import BackendUnavailable
from llmproxy.test.test_budgets import NOON, USD, at_once, hold
from llmproxy.test.test_budgets_calls import CHAT_PATH, COST, RESERVED, budget_config, chat
from llmproxy.test.test_call import with_knobs
from llmproxy.test.test_keys import KEY, bearer, key_entry
from llmproxy.test.test_ratelimit_remote import _Deliver, join
from llmproxy.testing.memory import MemoryProxy, Received

OPEN = RateLimitConfig()
CLOSED = RateLimitConfig(fail_mode="closed")


class Master:
    """
    A master's end: one L{MemorySpendStore}, served on as many channels as
    workers connect.
    """

    def __init__(self) -> None:
        self.clock = Clock()
        self.store: MemorySpendStore | None = MemorySpendStore()
        self.server = SpendServer(lambda: self.store, self.clock)
        self.transports: list[_Deliver] = []
        self.served: list[Channel] = []

    def worker(
        self,
        config: RateLimitConfig = OPEN,
        immediate: bool = True,
    ) -> RemoteSpendStore:
        channel = Channel({}, self.clock)
        served = Channel({BUDGETS: self.server.handle}, self.clock, self.server.lost)
        self.served.append(served)
        self.transports += join(channel, served, immediate)
        return RemoteSpendStore(config, channel, self.clock)

    def pump(self) -> None:
        while any([transport.flush() for transport in self.transports]):
            pass


class RemoteStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.master = Master()

    def reserve(self, store: RemoteSpendStore, *holds: Hold, now: float = NOON) -> SpendDecision:
        return self.successResultOf(store.reserve(holds, now))

    def settle(
        self,
        store: RemoteSpendStore,
        reservation: BudgetReservation | None,
        usd: float,
        now: float = NOON,
    ) -> tuple[Spent, ...]:
        assert reservation is not None
        charges = [usd_to_nanos(usd)] * len(reservation.holds)
        return self.successResultOf(store.settle(reservation, charges, now))

    def test_exact_across_workers(self) -> None:
        """
        50 reservations sent at once by three workers, their frames queued
        and delivered in a burst, against a budget of 10 worst cases:
        exactly 10 are admitted, and the master holds their 10 amounts.
        """
        workers = [self.master.worker(immediate=False) for _ in range(3)]
        capped = hold(limit=1.0, amount=0.1)
        asked = [workers[n % 3].reserve([capped], NOON) for n in range(50)]
        self.master.pump()
        decisions = [self.successResultOf(d) for d in asked]
        self.assertEqual(sum(d.shortfall is None for d in decisions), 10)
        refused = next(d.shortfall for d in decisions if d.shortfall is not None)
        self.assertEqual(refused.hold, capped)
        self.assertEqual((refused.spent, refused.held, refused.remaining), (0, USD, 0))
        assert self.master.store is not None
        tally = self.master.store._tallies[("key:a", "day")]
        self.assertEqual(tally.held, USD)

    def test_shortfall_names_the_hold(self) -> None:
        """
        A refusal names the hold that did not fit, as the master's store
        does, whichever it is in the request's order.
        """
        worker = self.master.worker()
        roomy, tight = hold("key:a", limit=10.0), hold("user:bob", "month", limit=0.2)
        shortfall = self.reserve(worker, roomy, tight).shortfall
        assert shortfall is not None
        self.assertEqual(shortfall.hold, tight)
        self.assertEqual(self.reserve(worker, roomy).shortfall, None)

    def test_settle_counts_once_for_the_group(self) -> None:
        """
        A settlement gives back the reservation and counts the charge in
        the master; each alert fraction is crossed once for the whole
        group, by whichever worker's settlement crossed it.
        """
        one, two = self.master.worker(), self.master.worker()
        capped = hold(limit=1.0, amount=0.3, alert_at=(0.5, 1.0))
        first = self.settle(one, self.reserve(one, capped).reservation, 0.3)
        self.assertEqual([(f.spent, f.crossed) for f in first], [(usd_to_nanos(0.3), ())])
        second = self.settle(two, self.reserve(two, capped).reservation, 0.3)
        self.assertEqual([(f.spent, f.crossed) for f in second], [(usd_to_nanos(0.6), (0.5,))])
        self.assertEqual(second[0].hold, capped)
        third = self.settle(one, self.reserve(one, capped).reservation, 0.3)
        self.assertEqual(third[0].crossed, ())
        refused = self.reserve(two, capped).shortfall
        assert refused is not None
        self.assertTrue(refused.alert)
        again = self.reserve(one, capped).shortfall
        assert again is not None
        self.assertFalse(again.alert)
        assert self.master.store is not None
        self.assertEqual(self.master.store.spent("key:a", "day", NOON), usd_to_nanos(0.9))

    def test_straddling_and_unreserved(self) -> None:
        """
        A reservation travels whole: one admitted before midnight and
        settled after gives back its hold yesterday and is charged today;
        one admitted while the master was away (not reserved) gives nothing
        back and is still charged.
        """
        worker = self.master.worker()
        day = hold(limit=1.0, amount=0.5)
        late = NOON + 43199
        straddling = self.reserve(worker, day, now=late).reservation
        self.settle(worker, straddling, 0.25, now=late + 2)
        self.settle(worker, BudgetReservation(late, (day,), reserved=False), 0.25, late + 2)
        store = self.master.store
        assert store is not None
        self.assertEqual(store.spent("key:a", "day", late + 2), usd_to_nanos(0.5))
        self.assertEqual(store._tallies[("key:a", "day")].held, 0)

    def test_a_dead_worker_leaks_nothing(self) -> None:
        """
        A worker whose connection closes with requests in flight: what they
        held is given back, in the period each was held in, and nothing is
        charged; the other workers' holds stay.
        """
        dying, staying = self.master.worker(), self.master.worker()
        day, month = hold(limit=1.0, amount=0.25), hold(period="month", limit=10.0, amount=0.25)
        yesterday = NOON - 86400
        self.reserve(dying, day, month, now=yesterday)
        settled = self.reserve(dying, day, month).reservation
        for _ in range(2):
            self.reserve(dying, day, month)
        self.settle(dying, settled, 0.1)
        self.reserve(staying, day, month)
        store = self.master.store
        assert store is not None
        tallies = store._tallies
        self.assertEqual(tallies[("key:a", "day")].held, usd_to_nanos(0.75))
        self.assertEqual(tallies[("key:a", "month")].held, usd_to_nanos(1.0))
        self.master.served[0].connectionLost()
        self.assertEqual(tallies[("key:a", "day")].held, usd_to_nanos(0.25))
        self.assertEqual(tallies[("key:a", "month")].held, usd_to_nanos(0.25))
        self.assertEqual(store.spent("key:a", "day", NOON), usd_to_nanos(0.1))
        self.assertEqual(store.spent("key:a", "month", NOON), usd_to_nanos(0.1))
        self.master.served[1].connectionLost()
        self.assertEqual(tallies[("key:a", "day")].held, 0)
        self.assertEqual(tallies[("key:a", "month")].held, 0)

    def test_uncapped_holds_need_no_round_trip(self) -> None:
        """
        A request whose holds are only counted reserves nothing: it is
        admitted without asking the master, and counted when it settles.
        """
        worker = self.master.worker(immediate=False)
        counted = hold("key:free", limit=None)
        decision = self.reserve(worker, counted)
        self.assertEqual(self.master.transports[0].value(), b"")
        settled = worker.settle(decision.reservation, [2 * USD], NOON)  # type: ignore[arg-type]
        self.master.pump()
        self.assertEqual(self.successResultOf(settled)[0].spent, 2 * USD)
        self.assertEqual(
            self.successResultOf(worker.settle(BudgetReservation(NOON, ()), [], NOON)), ()
        )

    def test_waits_for_the_rebuild(self) -> None:
        """
        While the master reads the cost records, a reservation is answered
        "ask again"; the worker asks every L{REBUILD_POLL} seconds (each
        time within the call deadline) until the spend is known, then is
        decided against it. A settlement made meanwhile waits in order.
        """
        done: Deferred[Tallies] = Deferred()
        assert self.master.store is not None
        self.master.store.rebuilding(done)
        worker = self.master.worker()
        capped = hold(limit=1.0, amount=0.5)
        first = worker.reserve([capped], NOON)
        second = worker.reserve([capped], NOON)
        settled = worker.settle(BudgetReservation(NOON, (capped,), reserved=False), [0], NOON)
        for _ in range(100):
            self.master.clock.advance(REBUILD_POLL)
        self.assertNoResult(first)
        self.assertNoResult(settled)
        done.callback({("key:a", "day"): ("2026-12-31", usd_to_nanos(0.4))})
        self.assertEqual(self.successResultOf(settled)[0].spent, usd_to_nanos(0.4))
        self.master.clock.advance(REBUILD_POLL)
        self.assertIsNone(self.successResultOf(first).shortfall)
        shortfall = self.successResultOf(second).shortfall
        assert shortfall is not None
        self.assertEqual((shortfall.spent, shortfall.held), (usd_to_nanos(0.4), usd_to_nanos(0.5)))

    def test_master_gone(self) -> None:
        """
        No master: C{fail_mode: open} admits without a reservation,
        C{closed} refuses with L{BackendUnavailable}; a settlement answers
        with no figures. Each failure is counted, one warning logged per
        interval.
        """
        errors: list[None] = []
        clock = Clock()
        for config in (OPEN, CLOSED):
            channel = Channel({}, clock)
            channel.makeConnection(StringTransport())
            channel.connectionLost()
            store = RemoteSpendStore(config, channel, clock, lambda: errors.append(None))
            reserved = store.reserve([hold()], NOON)
            if config is OPEN:
                reservation = self.successResultOf(reserved).reservation
                assert reservation is not None
                self.assertFalse(reservation.reserved)
                self.assertEqual(reservation.holds, (hold(),))
            else:
                self.failureResultOf(reserved, BackendUnavailable)
            settled = store.settle(BudgetReservation(NOON, (hold(),)), [1], NOON)
            self.assertEqual(self.successResultOf(settled), ())
        self.assertEqual(len(errors), 4)

    def test_timeout(self) -> None:
        """
        A master that does not answer within the deadline: C{fail_mode}
        decides.
        """
        worker = self.master.worker(CLOSED, immediate=False)
        reserved = worker.reserve([hold()], NOON)
        self.master.clock.advance(5.0)
        self.failureResultOf(reserved, BackendUnavailable)

    def test_no_store_in_the_master(self) -> None:
        """
        A worker that counts spend in memory while the master has no store
        (a reload in between): the master refuses, C{fail_mode} decides.
        """
        self.master.store = None
        worker = self.master.worker(CLOSED)
        self.failureResultOf(worker.reserve([hold()], NOON), BackendUnavailable)

    def test_bad_requests(self) -> None:
        """
        An unknown request is refused; the master keeps serving.
        """
        handle = self.master.server.handle
        self.assertRaises(RemoteError, handle, None, ["?"])
        self.assertEqual(handle(None, ["r", NOON, [["key:a", "day", 10, 1, []]]]), [1])


class FactoryTests(SynchronousTestCase):
    """
    How a worker gets a L{RemoteSpendStore}: the C{memory} backend's
    builder, kept by a reload while the backend stays.
    """

    def test_memory_backend_builder(self) -> None:
        clock = Clock()
        memory = remote_spend_factory(Channel({}, clock), clock)
        users = parse_config({"auth": {"budgets": {"per_user": {"bob": {"daily_usd": 1}}}}}, "t")
        store: object = spend_store_for(users, clock, at_once, memory=memory)
        assert isinstance(store, RemoteSpendStore)
        closed = parse_config(
            {
                "auth": {"budgets": {"per_user": {"bob": {"daily_usd": 2}}}},
                "features": {"rate_limiting": {"fail_mode": "closed"}},
            },
            "t",
        )
        kept = reconfigure_spend_store(store, users, closed, clock, at_once, memory=memory)
        self.assertIs(kept, store)
        self.assertEqual(store._config.fail_mode, "closed")
        none = parse_config({}, "t")
        self.assertIsNone(
            reconfigure_spend_store(store, users, none, clock, at_once, memory=memory)
        )


class WorkersInMemoryTests(SynchronousTestCase):
    """
    The request path of workers in memory, each a whole proxy whose
    budgets are the master's.
    """

    def burst(self, workers: int, requests: int, fit: int) -> None:
        """
        C{requests} requests in flight together, spread evenly over
        C{workers} workers, against a budget for C{fit} worst cases:
        exactly C{fit} go upstream, spread over the workers, the rest get
        402, and the group's spend is C{fit} real costs, within the budget.
        """
        master = Master()
        config = budget_config(key_entry(budget={"daily_usd": fit * RESERVED}))
        proxies = [MemoryProxy(config, spend=master.worker()) for _ in range(workers)]
        answers: list[Received] = []
        for number in range(requests):
            proxy = proxies[number % workers]
            knobs = with_knobs(bearer(KEY), headers_delay_ms="1000")
            proxy.request(b"POST", CHAT_PATH, knobs, chat()).addCallback(answers.append)
        for proxy in proxies:
            proxy.flush()
        for proxy in proxies:
            proxy.advance(1.5)
        statuses = [received.status for received in answers]
        self.assertEqual((statuses.count(200), statuses.count(402)), (fit, requests - fit))
        admitted = [len(proxy.fake.received) for proxy in proxies]
        self.assertEqual(sum(admitted), fit)
        self.assertTrue(all(admitted), admitted)
        assert master.store is not None
        spent = master.store.spent("key:team-a", "day", proxies[0].clock.seconds())
        self.assertAlmostEqual(spent / USD, fit * COST)
        self.assertLessEqual(spent / USD, fit * RESERVED)

    def test_fifty_against_ten_over_two_workers(self) -> None:
        self.burst(2, 50, 10)

    def test_three_hundred_against_forty_over_three_workers(self) -> None:
        self.burst(3, 300, 40)
