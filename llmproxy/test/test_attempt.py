"""
Tests for L{llmproxy.attempt}: naming how an upstream attempt failed.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import BadResponseVersion, ParseError, ResponseNeverReceived
from twisted.web.client import ResponseFailed

from llmproxy.attempt import failure_kind
from llmproxy.upstream import ResponseHeadTooLarge


class FailureKindTests(SynchronousTestCase):
    def test_kinds(self) -> None:
        """
        An invalid status line or an oversized head is a bad response, not
        an unreachable upstream.
        """
        cases = [
            (ConnectionRefusedError(), "connect"),
            (CancelledError(), "connect"),
            (TimeoutError(), "connect_timeout"),
            (
                ResponseNeverReceived([Failure(ParseError("wrong number of parts", b"junk"))]),
                "bad_response",
            ),
            (ResponseNeverReceived([Failure(BadResponseVersion("x", b"HTTP/x"))]), "bad_response"),
            (ResponseFailed([Failure(ResponseHeadTooLarge("too big"))]), "bad_response"),
            (
                ResponseNeverReceived([Failure(ValueError("SSL routines: certificate verify"))]),
                "tls",
            ),
        ]
        for error, kind in cases:
            self.assertEqual(failure_kind(Failure(error)), kind, error)
