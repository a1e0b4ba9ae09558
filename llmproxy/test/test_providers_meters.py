"""
Tests for L{llmproxy.providers.meters}.
"""

from __future__ import annotations

import orjson
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.providers.keyscan import SCAN_WINDOW
from llmproxy.providers.meters import JSONBodyMeter, Tally
from llmproxy.providers.openai import EXTRACTOR
from llmproxy.usage import Usage


class TallyTests(SynchronousTestCase):
    """
    L{Tally} falls back to the request's model and the body's id.
    """

    def test_fallbacks(self) -> None:
        tally = Tally(request_model="m", body_id="b")
        self.assertEqual(tally.usage(), Usage(model="m", upstream_request_id="b"))
        tally.header_request_id = "h"
        tally.model = "n"
        self.assertEqual(tally.usage(), Usage(model="n", upstream_request_id="h"))

    def test_copyIsIndependent(self) -> None:
        tally = Tally()
        copy = tally.copy()
        copy.set_tokens(1, 2)
        self.assertFalse(tally.reported)
        self.assertTrue(copy.reported)


class JSONBodyMeterTests(SynchronousTestCase):
    """
    L{JSONBodyMeter} parses small bodies whole and scans big ones.
    """

    def test_bigBodyBounded(self) -> None:
        """
        A body over the limit is scanned, never held: the buffers stay under
        the limit plus the scanner window, and the usage at its end is read.
        """
        vectors = [
            {"object": "embedding", "index": i, "embedding": [0.125] * 512} for i in range(128)
        ]
        body = orjson.dumps(
            {
                "object": "list",
                "data": vectors,
                "model": "text-embedding-3-small",
                "usage": {"prompt_tokens": 1280, "total_tokens": 1280},
            }
        )
        self.assertGreater(len(body), 300_000)
        meter = JSONBodyMeter(Tally(request_model="x"), EXTRACTOR, limit=100_000)
        for i in range(0, len(body), 4096):
            chunk = body[i : i + 4096]
            self.assertIs(meter.feed(chunk), chunk)
            held = len(meter._buf) + (len(meter._scanner._buf) if meter._scanner else 0)
            self.assertLessEqual(held, 100_000 + SCAN_WINDOW + 4096)
        self.assertEqual(meter.finish(), b"")
        self.assertEqual(
            meter.usage(),
            Usage(model="text-embedding-3-small", input_tokens=1280, reported=True),
        )

    def test_usageCached(self) -> None:
        """
        Asking twice without new bytes parses once.
        """
        meter = JSONBodyMeter(Tally(), EXTRACTOR)
        meter.feed(b'{"model": "m", "usage": {"prompt_tokens": 3}}')
        self.assertIs(meter.usage(), meter.usage())

    def test_partialBody(self) -> None:
        """
        A body cut short still gives what its text shows.
        """
        meter = JSONBodyMeter(Tally(request_model="r"), EXTRACTOR)
        meter.feed(b'{"id": "chatcmpl-1", "model": "gpt-4o", "choices": [{"mess')
        self.assertEqual(meter.usage(), Usage(model="gpt-4o", upstream_request_id="chatcmpl-1"))
