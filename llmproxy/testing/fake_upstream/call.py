# -*- test-case-name: llmproxy.test.test_fake_upstream_openai -*-
"""
What a route handler takes and returns: a L{Call} (one request with its
knobs and parsed body) and a L{Reply} (the status, headers and body chunks
for the responder to write), and the JSON and SSE encoders replies are made
of.

A module of its own so that the dialects, the provider routes, the router
and the responder share these types without importing one another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson
from attrs import frozen

from llmproxy.testing.fake_upstream.knobs import Knobs
from llmproxy.testing.fake_upstream.records import ReceivedRequest


@frozen
class Call:
    """
    Everything a route handler needs about one request.
    """

    knobs: Knobs
    request: ReceivedRequest
    serial: int
    now: int
    query: dict[str, str]
    params: dict[str, str]
    body: Any = None
    require_auth: bool = True

    def ident(self, prefix: str) -> str:
        """
        A deterministic identifier unique per request within one fake.
        """
        return f"{prefix}fake{self.serial:016d}"


@frozen
class Reply:
    """
    A response about to be written.

    @ivar chunks: the body, one write per item.  A JSON reply is one chunk;
        a stream is one event per chunk.
    @ivar error_event: the provider's in-stream error event, for
        C{x-fake-error-after}.
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    chunks: Iterable[bytes]
    streaming: bool = False
    error_event: bytes | None = None


Handler = Callable[[Call], Reply]
"""A route: answers one call."""


def sse_data(value: Any, end: bytes = b"\n\n") -> bytes:
    """
    An SSE event of one C{data:} line (Gemini ends its events with
    C{\\r\\n\\r\\n}).
    """
    return b"data: " + orjson.dumps(value) + end


def sse_event(name: str, value: Any) -> bytes:
    """
    A named SSE event (C{event:} then C{data:}).
    """
    return b"event: " + name.encode("ascii") + b"\ndata: " + orjson.dumps(value) + b"\n\n"
