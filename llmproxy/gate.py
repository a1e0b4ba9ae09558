# -*- test-case-name: llmproxy.test.test_resilience -*-
"""
The stream gate: a stream's opening events are held back until its first
content event, so that a stream which fails before any content (an error
event, a cut connection, silence) can still be retried and the client sees
one clean stream.

What counts as content is each provider's business
(L{llmproxy.providers.format.ProviderFormat.stream_event}); the gate
parses the stream's events (on a copy: the bytes it releases are exactly
the bytes it held) and stops at the first content or error event, or when
its byte bound is crossed. Its time bound is the relay's to keep.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from llmproxy.providers import RequestFacts
from llmproxy.providers.format import StreamEvent
from llmproxy.sse import Event, SSEParser


class Gate(enum.Enum):
    HOLD = "hold"
    OPEN = "open"
    FAILED = "failed"


class StreamGate:
    """
    Holds a stream's bytes until it can tell whether content has begun.
    """

    def __init__(
        self,
        facts: RequestFacts,
        classify: Callable[[RequestFacts, Event], StreamEvent],
        max_bytes: int,
    ) -> None:
        self._facts = facts
        self._classify = classify
        self._max_bytes = max_bytes
        self._parser = SSEParser(max_event_bytes=max(max_bytes, 1024), tail_bytes=0)
        self._held: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> Gate:
        """
        Hold C{data}; say whether the gate must open (content began, or the
        byte bound was crossed), fail (an error event came first) or hold on.
        """
        self._held.append(data)
        self._size += len(data)
        for event in self._parser.feed(data):
            if event.truncated:
                return Gate.OPEN
            kind = self._classify(self._facts, event)
            if kind is StreamEvent.CONTENT:
                return Gate.OPEN
            if kind is StreamEvent.ERROR:
                return Gate.FAILED
        if self._size >= self._max_bytes:
            return Gate.OPEN
        return Gate.HOLD

    def release(self) -> bytes:
        """
        Everything held, once.
        """
        held = b"".join(self._held)
        self._held = []
        return held
