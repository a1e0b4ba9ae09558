# -*- test-case-name: llmproxy.test.test_fake_upstream -*-
"""
What the fake records for a test to look at: every request as it arrived
(L{ReceivedRequest}) and every response its client cut short
(L{ClientDisconnect}).

Plain frozen values, apart from the server that fills them in, so that the
routes can read a request and a test can compare records without either
importing twisted.web.
"""

from __future__ import annotations

from typing import Any

import orjson
from attrs import frozen


@frozen
class ReceivedRequest:
    """
    One request as it reached the fake.

    @ivar method: the request method.
    @ivar uri: the request target exactly as sent (still percent-encoded).
    @ivar path: C{uri} up to the C{?}.
    @ivar query: C{uri} after the C{?} (empty without one), raw.
    @ivar headers: every header line in arrival order with its name as sent
        and duplicates kept, when served through L{FakeUpstream.site} (or
        L{listen}); mounted as a bare L{FakeUpstream.resource}, names come
        from Twisted's L{Headers} (canonical case, grouped by name).
    @ivar body: the request body.
    """

    method: bytes
    uri: bytes
    path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header_values(self, name: bytes | str) -> list[bytes]:
        """
        Every value of header C{name} (case-insensitive), in order.
        """
        wanted = (name.encode("latin-1") if isinstance(name, str) else name).lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def header(self, name: bytes | str) -> bytes | None:
        """
        The first value of header C{name} (case-insensitive), or C{None}.
        """
        values = self.header_values(name)
        return values[0] if values else None

    def json(self) -> Any:
        """
        The body parsed as JSON.
        """
        return orjson.loads(self.body)


@frozen
class ClientDisconnect:
    """
    A client connection that went away before its response was complete.

    @ivar time: the clock's time when the fake noticed.
    @ivar request: the request whose response was cut short.
    @ivar headers_sent: whether the status line had been sent.
    @ivar chunks_sent: body chunks written before the loss.
    @ivar bytes_sent: body bytes written before the loss (after gzip).
    """

    time: float
    request: ReceivedRequest
    headers_sent: bool
    chunks_sent: int
    bytes_sent: int
