"""
Tests for L{llmproxy.health}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.health import HealthBoard


class HealthBoardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.board = HealthBoard(self.clock)

    def test_degraded_after_five_failures_within_a_minute(self) -> None:
        for _ in range(4):
            self.board.attempt("openai", ok=False)
            self.clock.advance(10)
        self.assertEqual(self.board.status("openai"), "healthy")
        self.board.attempt("openai", ok=False)
        self.assertEqual(self.board.status("openai"), "degraded")
        counters = self.board.provider("openai")
        self.assertEqual((counters.requests, counters.errors), (5, 5))

    def test_one_success_heals(self) -> None:
        for _ in range(5):
            self.board.attempt("openai", ok=False)
        self.board.attempt("openai", ok=True)
        self.assertEqual(self.board.status("openai"), "healthy")

    def test_failures_spread_over_more_than_a_minute(self) -> None:
        for _ in range(5):
            self.board.attempt("gemini", ok=False)
            self.clock.advance(20)
        self.assertEqual(self.board.status("gemini"), "healthy")

    def test_degraded_expires(self) -> None:
        for _ in range(5):
            self.board.attempt("anthropic", ok=False)
        self.assertEqual(self.board.status("anthropic"), "degraded")
        self.clock.advance(61)
        self.assertEqual(self.board.status("anthropic"), "healthy")
