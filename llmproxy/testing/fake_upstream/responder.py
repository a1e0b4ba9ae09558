# -*- test-case-name: llmproxy.test.test_fake_upstream_responder -*-
"""
Writing a reply: a L{Responder} puts one L{Reply} on the wire, applying the
timing and failure knobs (delays, hangs, stalls, deaths, in-stream errors,
gzip) and following the transport's flow control.

Everything the fake does after C{render} returns happens here, so this is
where the clock matters: every timer is set on the clock the fake was
given, never on the global reactor, and a test drives a whole stream by
advancing a L{Clock <twisted.internet.task.Clock>}.
"""

from __future__ import annotations

import gzip as _gzip
import zlib
from collections.abc import Iterator
from typing import IO, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from llmproxy.testing.fake_upstream.call import Reply
from llmproxy.testing.fake_upstream.knobs import Knobs
from llmproxy.testing.fake_upstream.records import ClientDisconnect, ReceivedRequest


class WebRequest(Protocol):
    """
    The parts of L{twisted.web.server.Request} the fake uses, typed (the
    class itself is not annotated).
    """

    method: bytes
    uri: bytes
    content: IO[bytes] | None
    requestHeaders: Headers
    responseHeaders: Headers

    def setResponseCode(self, code: int) -> None: ...

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def notifyFinish(self) -> Deferred[None]: ...

    def loseConnection(self) -> None: ...


class Owner(Protocol):
    """
    The fake as its responders see it: the clock they run on and the
    counters and records they keep (L{FakeUpstream
    <llmproxy.testing.fake_upstream.FakeUpstream>} is one).
    """

    clock: IReactorTime
    record_bodies: bool
    paused_count: int
    resumed_count: int
    bytes_sent: int
    active_responses: int

    def _headers_written(self, responder: Responder) -> None: ...

    def _connection_lost(self, event: ClientDisconnect) -> None: ...


@implementer(IPushProducer)
class Responder:
    """
    Writes one L{Reply} on the injected clock, honouring the timing and
    failure knobs and the transport's flow control.

    It is the request's push producer: when the client reads slowly the
    transport pauses it (counted in L{Owner.paused_count}) and no
    chunk is written until it is resumed.
    """

    def __init__(
        self,
        fake: Owner,
        request: WebRequest,
        received: ReceivedRequest,
        knobs: Knobs,
        reply: Reply,
        gzip: bool,
    ) -> None:
        self._fake = fake
        self._request = request
        self._received = received
        self._knobs = knobs
        self._reply = reply
        self._gzip = gzip
        self._chunks: Iterator[bytes] = iter(reply.chunks)
        self._lookahead: bytes | None = None
        self._compressor = zlib.compressobj(wbits=31) if gzip and reply.streaming else None
        self._timer: IDelayedCall | None = None
        self._paused = False
        self._stalled = False
        self._done = False
        self._dying = False
        self._ended = False
        self._registered = False
        self._headers_sent = False
        self._chunks_sent = 0
        self._bytes_sent = 0
        self.sent: list[bytes] | None = [] if fake.record_bodies else None

    def start(self) -> None:
        self._fake.active_responses += 1
        self._request.notifyFinish().addCallbacks(self._finished, self._lost)
        if self._knobs.hang == "headers":
            return
        if self._knobs.headers_delay > 0:
            self._timer = self._fake.clock.callLater(self._knobs.headers_delay, self._send_headers)
        else:
            self._send_headers()

    def _send_headers(self) -> None:
        self._timer = None
        request = self._request
        reply = self._reply
        request.setResponseCode(reply.status)
        headers = request.responseHeaders
        for name, value in reply.headers:
            headers.setRawHeaders(name, [value])
        for cookie in self._knobs.set_cookies:
            headers.addRawHeader(b"Set-Cookie", cookie.encode("latin-1"))
        # An extra header replaces one of the same name the reply has (the
        # fake's own rate-limit headers, say); repeated ones add up.
        for name_text, _ in self._knobs.extra_headers:
            headers.removeHeader(name_text.encode("latin-1"))
        for name_text, value_text in self._knobs.extra_headers:
            headers.addRawHeader(name_text.encode("latin-1"), value_text.encode("latin-1"))
        if self._knobs.retry_after is not None:
            headers.addRawHeader(b"retry-after", self._knobs.retry_after.encode("latin-1"))
        if self._gzip:
            headers.addRawHeader(b"Content-Encoding", b"gzip")
            headers.addRawHeader(b"Vary", b"Accept-Encoding")
        if not reply.streaming:
            body = b"".join(reply.chunks)
            if self._gzip:
                body = _gzip.compress(body, mtime=0)
            self._chunks = iter([body])
            headers.setRawHeaders(b"Content-Length", [str(len(body)).encode()])
        request.write(b"")
        self._headers_sent = True
        self._fake._headers_written(self)
        if self._done:
            return
        if self._knobs.hang == "body":
            self._stalled = True
            return
        request.registerProducer(self, True)
        self._registered = True
        self._pump()

    def _take(self) -> bytes | None:
        if self._lookahead is not None:
            chunk, self._lookahead = self._lookahead, None
            return chunk
        return next(self._chunks, None)

    def _has_more(self) -> bool:
        if self._lookahead is None:
            self._lookahead = next(self._chunks, None)
        return self._lookahead is not None

    def _pump(self) -> None:
        self._timer = None
        knobs = self._knobs
        while not (self._paused or self._done or self._stalled):
            sent = self._chunks_sent
            if knobs.die_after is not None and sent >= knobs.die_after:
                self._die()
                return
            error_event = self._reply.error_event
            error_due = knobs.error_after is not None and sent >= knobs.error_after
            if error_event is not None and error_due:
                self._write(error_event)
                self._complete()
                return
            if knobs.stall_after is not None and sent >= knobs.stall_after:
                self._stalled = True
                return
            chunk = self._take()
            if chunk is None:
                if knobs.die_after is not None:
                    self._die()
                else:
                    self._complete()
                return
            self._write(chunk)
            self._chunks_sent += 1
            if knobs.delay <= 0 or self._done:
                continue
            if knobs.die_after is not None or self._has_more():
                self._timer = self._fake.clock.callLater(knobs.delay, self._pump)
                return

    def _write(self, data: bytes) -> None:
        if self._compressor is not None:
            data = self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        self._count(data)
        self._request.write(data)

    def _count(self, data: bytes) -> None:
        self._bytes_sent += len(data)
        self._fake.bytes_sent += len(data)
        if self.sent is not None:
            self.sent.append(data)

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self._request.unregisterProducer()

    def _complete(self) -> None:
        if self._compressor is not None:
            tail = self._compressor.flush()
            self._count(tail)
            self._request.write(tail)
        self._done = True
        self._unregister()
        self._request.finish()

    def _die(self) -> None:
        self._dying = True
        self._done = True
        self._cancel_timer()
        self._unregister()
        self._request.loseConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._fake.active_responses -= 1

    def _finished(self, ignored: object) -> None:
        self._end()

    def _lost(self, reason: Failure) -> None:
        self._done = True
        self._cancel_timer()
        self._end()
        if not self._dying:
            self._fake._connection_lost(
                ClientDisconnect(
                    time=self._fake.clock.seconds(),
                    request=self._received,
                    headers_sent=self._headers_sent,
                    chunks_sent=self._chunks_sent,
                    bytes_sent=self._bytes_sent,
                )
            )

    # IPushProducer

    def pauseProducing(self) -> None:
        if not self._paused:
            self._paused = True
            self._fake.paused_count += 1

    def resumeProducing(self) -> None:
        if self._paused:
            self._paused = False
            self._fake.resumed_count += 1
            if self._timer is None and not (self._done or self._stalled):
                self._pump()

    def stopProducing(self) -> None:
        self._done = True
        self._cancel_timer()
