"""
Tests for L{llmproxy.headers}: what crosses the proxy, and how much of it.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Response
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from llmproxy.headers import MAX_RELAYED_HEADER_BYTES, MAX_RELAYED_HEADERS, copy_response_headers


def relayed(headers: Headers) -> Headers:
    response = Response._construct((b"HTTP", 1, 1), 200, b"OK", headers, None, None)
    request: Any = DummyRequest([b""])
    copy_response_headers(response, request)
    out: Headers = request.responseHeaders
    return out


class RelayedHeaderTests(SynchronousTestCase):
    def test_count_capped(self) -> None:
        """
        An upstream's flood of header lines is cut to the first
        L{MAX_RELAYED_HEADERS}, besides those a client needs to read the
        answer, which come through whatever precedes them.
        """
        headers = Headers()
        for n in range(500):
            headers.addRawHeader(b"x-flood-%d" % n, b"v")
        headers.addRawHeader(b"x-request-id", b"req-1")
        headers.addRawHeader(b"x-many", b"a")
        headers.addRawHeader(b"x-many", b"b")
        out = relayed(headers)
        lines = sum(len(values) for _, values in out.getAllRawHeaders())
        self.assertEqual(lines, MAX_RELAYED_HEADERS + 1)
        self.assertEqual(out.getRawHeaders(b"x-request-id"), [b"req-1"])
        self.assertIsNone(out.getRawHeaders(b"x-many"))

    def test_bytes_capped(self) -> None:
        headers = Headers()
        for n in range(10):
            headers.addRawHeader(b"x-big-%d" % n, b"v" * 8000)
        out = relayed(headers)
        size = sum(len(name) + len(v) for name, values in out.getAllRawHeaders() for v in values)
        self.assertLessEqual(size, MAX_RELAYED_HEADER_BYTES)
        self.assertEqual(len(list(out.getAllRawHeaders())), 4)

    def test_ordinary_untouched(self) -> None:
        headers = Headers(
            {
                b"content-type": [b"application/json"],
                b"x-request-id": [b"r"],
                b"set-cookie": [b"a=1", b"b=2"],
                b"connection": [b"close"],
            }
        )
        out = relayed(headers)
        self.assertEqual(out.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])
        self.assertIsNone(out.getRawHeaders(b"connection"))
