# -*- test-case-name: llmproxy.test.test_decoding -*-
"""
Gzip response bodies, decoded with bounded memory and bounded work.

treq asks upstreams for gzip and decodes it with Twisted's decoder, which
inflates each received chunk whole: one 1 MB chunk of a compression bomb
becomes a gigabyte at once, whatever the client reads. L{GunzipAgent} sits
below treq's own decoding agent and decodes gzip first (treq then finds
nothing left to decode):

  - each step inflates at most L{PIECE} bytes and hands them on;
  - it stops as soon as the body's consumer pauses it (a client whose
    socket is full), and pauses the upstream's socket while compressed
    input waits, so only one received chunk and one piece are ever held;
  - one received chunk yields at most L{PER_TURN} bytes before the rest is
    left for the next reactor turn, so a bomb never stalls the process.
"""

from __future__ import annotations

import zlib
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.components import proxyForInterface
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

PIECE = 64 << 10
"""Most bytes inflated in one step."""

PER_TURN = 1 << 20
"""Most bytes inflated for one received chunk before the reactor runs again."""

GZIP_CODINGS = frozenset({b"gzip", b"x-gzip"})


class GzipDecodingError(Exception):
    """
    The upstream's gzip body is corrupt.
    """


@implementer(IAgent)
class GunzipAgent:
    """
    Decodes C{Content-Encoding: gzip} response bodies of the agent it wraps
    (see the module docstring); other codings are left as they came.
    """

    def __init__(self, agent: IAgent, clock: IReactorTime) -> None:
        self._agent = agent
        self._clock = clock

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        answered: Deferred[IResponse] = self._agent.request(method, uri, headers, bodyProducer)
        return answered.addCallback(self._decoded)

    def _decoded(self, response: IResponse) -> IResponse:
        codings = [
            token.strip()
            for value in response.headers.getRawHeaders(b"content-encoding", [])
            for token in value.split(b",")
            if token.strip()
        ]
        if not codings or codings[-1].lower() not in GZIP_CODINGS:
            return response
        if codings[:-1]:
            response.headers.setRawHeaders(b"content-encoding", [b", ".join(codings[:-1])])
        else:
            response.headers.removeHeader(b"content-encoding")
        return _GunzippedResponse(response, self._clock)


class _GunzippedResponse(proxyForInterface(IResponse)):  # type: ignore[misc]
    """
    A response whose body is inflated on the way to its protocol.
    """

    def __init__(self, response: IResponse, clock: IReactorTime) -> None:
        self.original = response
        self.length = UNKNOWN_LENGTH
        self._clock = clock

    def deliverBody(self, protocol: Any) -> None:
        self.original.deliverBody(_Gunzip(protocol, self._clock))


@implementer(IPushProducer)
class _Gunzip(Protocol):
    """
    Receives the compressed body from the upstream and gives its consumer
    (C{inner}) the inflated one; to the consumer it is the transport to
    pause, resume or stop.
    """

    def __init__(self, inner: Protocol, clock: IReactorTime) -> None:
        self._inner = inner
        self._clock = clock
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._input = b""
        self._more = False
        self._paused = False
        self._upstream_paused = False
        self._later: IDelayedCall | None = None
        self._ended: Failure | None = None
        self._broken: GzipDecodingError | None = None
        self._done = False

    def connectionMade(self) -> None:
        self._inner.makeConnection(self)

    # -- from the upstream -------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._broken is not None or self._done:
            return
        self._input = self._input + data if self._input else data
        self._pump()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self._ended = reason
        self._pump()

    # -- from the consumer ------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        self._follow()

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._input = b""
        self._more = False
        self._cancel_later()
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    # -- inflating ---------------------------------------------------------------

    def _backlog(self) -> bool:
        return bool(self._input) or self._more

    def _pump(self) -> None:
        """
        Inflate what is waiting, a piece at a time, until the consumer
        pauses, the input runs out, or this turn's share is used.
        """
        self._cancel_later()
        produced = 0
        while not self._paused and self._backlog() and self._broken is None:
            if produced >= PER_TURN:
                self._later = self._clock.callLater(0, self._next_turn)
                break
            try:
                out = self._inflate.decompress(self._input, PIECE)
            except zlib.error as error:
                self._fail(GzipDecodingError(f"corrupt gzip body: {error}"))
                break
            self._input = self._inflate.unconsumed_tail
            # A full piece may leave output inside zlib for input it took.
            self._more = len(out) == PIECE
            if self._inflate.eof:
                # Anything after the gzip member is not part of the body.
                self._input, self._more = b"", False
            if out:
                produced += len(out)
                self._inner.dataReceived(out)
        self._follow()
        if not self._backlog() and self._ended is not None and not self._done:
            self._finish()

    def _next_turn(self) -> None:
        self._later = None
        self._pump()

    def _follow(self) -> None:
        """
        Keep the upstream paused while the consumer is, or while input waits.
        """
        want = self._paused or self._backlog()
        if want != self._upstream_paused and self.transport is not None and not self._done:
            self._upstream_paused = want
            if want:
                self.transport.pauseProducing()  # type: ignore[attr-defined]
            else:
                self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _fail(self, error: GzipDecodingError) -> None:
        self._broken = error
        self._input, self._more = b"", False
        if self._ended is None and self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _finish(self) -> None:
        self._done = True
        reason = self._ended
        assert reason is not None
        if self._broken is not None:
            reason = Failure(self._broken)
        inner, self._inner = self._inner, Protocol()
        self.transport = None
        inner.connectionLost(reason)

    def _cancel_later(self) -> None:
        if self._later is not None and self._later.active():
            self._later.cancel()
        self._later = None
