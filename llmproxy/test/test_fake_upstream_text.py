"""
Tests for L{llmproxy.testing.fake_upstream.text}: the fake model's text.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.testing.fake_upstream import fake_text, text_pieces


class TextTests(SynchronousTestCase):
    def test_pieces(self) -> None:
        self.assertEqual(text_pieces(3), ["Hello", " from", " the"])
        self.assertEqual(fake_text(7), "Hello from the fake upstream.Hello")
        self.assertEqual(fake_text(0), "")
