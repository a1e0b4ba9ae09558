"""
Tests for L{llmproxy.circuits}: the breakers' state machine, pauses, and
keeping in step with a fleet.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.circuits import ANY_MODEL, CircuitBoard, CircuitKey, State
from llmproxy.config import CircuitBreakerConfig
from llmproxy.outcomes import Breaker

CONFIG = CircuitBreakerConfig(failures=3, cooldown_seconds=10)


class FakeFleet:
    def __init__(self) -> None:
        self.failed_keys: list[CircuitKey] = []
        self.succeeded_keys: list[CircuitKey] = []
        self.claims: list[Deferred[bool]] = []

    def failed(self, key: CircuitKey, threshold: int, cooldown: float, half_open: bool) -> None:
        self.failed_keys.append(key)

    def succeeded(self, key: CircuitKey) -> None:
        self.succeeded_keys.append(key)

    def claim_probe(self, key: CircuitKey, cooldown: float) -> Deferred[bool]:
        claim: Deferred[bool] = Deferred()
        self.claims.append(claim)
        return claim


class BoardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.moves: list[tuple[str, str, str, State]] = []
        self.board = CircuitBoard(self.clock, lambda *move: self.moves.append(move))

    def attempt_fails(self, breaker: Breaker = Breaker.FAILURE, model: str | None = "m") -> None:
        self.board.started("p", "u")
        self.board.finished("p", "u", model, breaker, CONFIG)

    def test_consecutive_failures_open(self) -> None:
        self.attempt_fails()
        self.attempt_fails()
        self.board.started("p", "u")
        self.board.finished("p", "u", "m", Breaker.SUCCESS, CONFIG)
        self.attempt_fails()
        self.attempt_fails()
        self.assertTrue(self.board.availability("p", "u", "m").available)
        self.attempt_fails()
        state = self.board.availability("p", "u", "m")
        self.assertEqual((state.available, state.until), (False, 10.0))
        self.assertTrue(self.board.availability("p", "u", "other").available)
        self.assertEqual(self.moves, [("p", "u", "m", State.OPEN)])

    def test_one_probe_then_close_or_reopen(self) -> None:
        for _ in range(3):
            self.attempt_fails()
        self.clock.advance(10)
        state = self.board.availability("p", "u", "m")
        self.assertEqual((state.available, state.probe), (True, True))
        self.assertTrue(self.board.take_probe("p", "u", "m"))
        self.assertFalse(self.board.availability("p", "u", "m").available)
        self.attempt_fails()
        self.assertEqual(self.board.availability("p", "u", "m").until, 20.0)
        self.clock.advance(10)
        self.board.availability("p", "u", "m")
        self.board.take_probe("p", "u", "m")
        self.board.finished("p", "u", "m", Breaker.SUCCESS, CONFIG)
        self.assertEqual(self.board.availability("p", "u", "m").probe, False)
        self.assertEqual(self.moves[-1], ("p", "u", "m", State.CLOSED))

    def test_neutral_outcomes_release_the_probe(self) -> None:
        for _ in range(3):
            self.attempt_fails()
        self.clock.advance(10)
        self.board.availability("p", "u", "m")
        self.board.take_probe("p", "u", "m")
        self.board.finished("p", "u", "m", Breaker.NEUTRAL, CONFIG)
        self.assertTrue(self.board.availability("p", "u", "m").probe)

    def test_connection_failures_cover_every_model(self) -> None:
        for _ in range(3):
            self.attempt_fails(Breaker.UNREACHABLE)
        self.assertFalse(self.board.availability("p", "u", "any").available)
        self.assertEqual(self.board.describe("p", "u"), ("open", []))

    def test_pause(self) -> None:
        self.board.started("p", "u")
        self.board.finished("p", "u", "m", Breaker.NEUTRAL, CONFIG, pause_seconds=5)
        self.assertEqual(self.board.describe("p", "u"), ("rate_limited", []))
        self.assertEqual(self.board.availability("p", "u", "m").until, 5.0)
        self.clock.advance(5)
        self.assertTrue(self.board.availability("p", "u", "m").available)
        self.assertEqual(self.moves, [])

    def test_in_flight(self) -> None:
        self.board.started("p", "u")
        self.board.started("p", "u")
        self.assertEqual(self.board.in_flight("p", "u"), 2)
        self.board.finished("p", "u", None, Breaker.SUCCESS, CONFIG)
        self.assertEqual(self.board.in_flight("p", "u"), 1)


class FleetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.board = CircuitBoard(self.clock)
        self.fleet = FakeFleet()
        self.board.share(self.fleet)

    def test_failures_and_successes_told(self) -> None:
        """
        Every failure is told to the fleet; a success only for a circuit
        with a history (a clean one costs no round trip).
        """
        self.board.finished("p", "u", "m", Breaker.SUCCESS, CONFIG)
        self.assertEqual(self.fleet.succeeded_keys, [])
        self.board.finished("p", "u", "m", Breaker.FAILURE, CONFIG)
        self.board.finished("p", "u", "m", Breaker.SUCCESS, CONFIG)
        self.assertEqual(self.fleet.failed_keys, [("p", "u", "m")])
        self.assertEqual(self.fleet.succeeded_keys, [("p", "u", "m")])

    def test_adopt_all(self) -> None:
        """
        What the fleet opened is skipped here; what it closed since is
        closed here.
        """
        self.board.adopt_all({("p", "u", "m"): 30.0, ("p", "v", ANY_MODEL): 30.0})
        self.assertFalse(self.board.availability("p", "u", "m").available)
        self.assertFalse(self.board.availability("p", "v", "x").available)
        self.board.adopt_all({("p", "v", ANY_MODEL): 30.0})
        self.assertTrue(self.board.availability("p", "u", "m").available)
        self.assertFalse(self.board.availability("p", "v", "x").available)

    def test_fleet_probe(self) -> None:
        self.board.adopt(("p", "u", "m"), 5.0)
        self.assertIsNone(self.board.claim_fleet_probe("p", "u", "m"))
        self.clock.advance(5)
        self.assertTrue(self.board.availability("p", "u", "m").probe)
        claim = self.board.claim_fleet_probe("p", "u", "m")
        self.assertIs(claim, self.fleet.claims[0])
        self.board.probe_lost("p", "u", "m")
        self.assertFalse(self.board.availability("p", "u", "m").available)
