# -*- test-case-name: llmproxy.test.test_attempt -*-
"""
Phase three of a proxied request: attempt.

An L{Attempt} is one try at the upstream: send the request with treq,
copy the response's status and headers to the client, relay its body
(L{llmproxy.relay}), watch the first-byte, idle and total timeouts, and
stop when the client leaves. It ends with an L{AttemptResult}.

Until the upstream's response headers arrive, nothing has been written to
the client: a failure then is returned, not answered (the call answers
it, or a later attempt takes over). From the headers on, the attempt owns
the client's response and ends it itself, whatever happens.
"""

from __future__ import annotations

from typing import Any

from attrs import field, frozen
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IConsumer, IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import ParseError
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from llmproxy.headers import copy_response_headers, forward_request_headers
from llmproxy.inspection import CallFacts
from llmproxy.logs import describe_failure
from llmproxy.providers import Meter
from llmproxy.relay import Relay
from llmproxy.runtime import ProxyState
from llmproxy.upstream import ResponseHeadTooLarge, Upstream
from llmproxy.usage import Usage

log = Logger(namespace="llmproxy.attempt")


@frozen
class UpstreamFailure:
    """
    Why an attempt got no response, and what the client should hear if no
    other attempt follows.

    @ivar kind: C{connect}, C{tls}, C{connect_timeout}, C{bad_response},
        C{first_byte_timeout} or C{total_timeout}.
    @ivar status: 502 (unreachable, or an invalid response) or 504 (too slow).
    @ivar unsent: the upstream never received the request.
    """

    kind: str
    status: int
    message: str
    unsent: bool


@frozen
class AttemptResult:
    """
    How one attempt ended.

    @ivar status: the upstream's status, relayed to the client; L{None}
        when no response was relayed.
    @ivar failure: why there was no response to relay, if so.
    @ivar complete: the whole body reached the client.
    @ivar usage: what the response reported, as far as it got.
    @ivar first_byte: clock time of the upstream's first body byte.
    @ivar sse: the response was an event stream.
    @ivar unmetered: why the body was not metered (C{content-encoding}).
    @ivar client_gone: the client left before the attempt ended.
    """

    status: int | None = None
    failure: UpstreamFailure | None = None
    complete: bool = False
    usage: Usage = field(factory=Usage)
    first_byte: float | None = None
    sse: bool = False
    unmetered: str | None = None
    client_gone: bool = False


@implementer(IBodyProducer)
class BytesProducer:
    """
    The request body, already in memory, written in one go (no Cooperator,
    so it also completes under a memory reactor).
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        # Written once (the pool never replays a request), so the bytes are
        # not kept for the rest of a possibly long response.
        body, self._body = self._body, b""
        consumer.write(body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Attempt:
    """
    One try at the upstream for one client request.
    """

    __slots__ = (
        "_body",
        "_deadline",
        "_expired",
        "_facts",
        "_gone",
        "_meter",
        "_name",
        "_pending",
        "_relay",
        "_request",
        "_result",
        "_sse",
        "_state",
        "_status",
        "_streaming",
        "_timer",
        "_unmetered",
        "_upstream",
    )

    def __init__(
        self,
        upstream: Upstream,
        facts: CallFacts,
        body: bytes,
        request: Request,
        state: ProxyState,
        deadline: float | None,
    ) -> None:
        """
        @param body: the body to send (L{llmproxy.inspection.Inspected}).
        @param request: the client's request, whose response this attempt
            writes once the upstream answers.
        @param deadline: when the call's total time budget ends (clock
            seconds), or L{None}.
        """
        self._upstream = upstream
        self._facts = facts
        self._body = body
        self._request = request
        self._state = state
        self._deadline = deadline
        self._name = facts.provider
        self._pending: Deferred[IResponse] | None = None
        self._timer: IDelayedCall | None = None
        self._expired: str | None = None
        self._relay: Relay | None = None
        self._meter: Meter | None = None
        self._gone = False
        self._sse = False
        self._streaming = facts.request.streaming
        self._status: int | None = None
        self._unmetered: str | None = None
        self._result: Deferred[AttemptResult] = Deferred()

    def run(self, forwarded: bool) -> Deferred[AttemptResult]:
        """
        Send the request; the result fires once the attempt is over.

        @param forwarded: add C{X-Forwarded-For} and C{X-Forwarded-Proto}.
        """
        request = self._request
        config = self._upstream.config
        url = config.base_url.encode("utf-8") + self._facts.path
        if self._facts.query:
            url += b"?" + self._facts.query
        # Who the client is and over what only matter for X-Forwarded-*, and
        # asking the transport costs interface checks on every request.
        headers = forward_request_headers(
            request.requestHeaders,
            getattr(request.getClientAddress(), "host", None) if forwarded else None,
            request.isSecure() if forwarded else False,
            forwarded,
        )
        body, self._body = self._body, b""
        producer = BytesProducer(body) if body or request.method not in (b"GET", b"HEAD") else None
        pending: Deferred[Any] = self._upstream.client.request(
            request.method.decode("ascii"),
            url,
            headers=headers,
            data=producer,
            unbuffered=True,
            allow_redirects=False,
        )
        self._pending = pending
        self._arm_first_byte()
        pending.addCallbacks(self._got_response, self._failed)
        pending.addErrback(self._bug)
        return self._result

    def client_gone(self) -> None:
        """
        The client left: cancel the upstream request, or stop its body.
        """
        self._gone = True
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        elif self._relay is not None:
            self._relay.client_gone()

    # -- before the response ---------------------------------------------------

    def _arm_first_byte(self) -> None:
        """
        One timer until the response headers: the first-byte timeout or the
        total deadline, whichever ends first.
        """
        clock = self._state.clock
        first_byte = self._upstream.config.timeouts.first_byte_seconds
        delay = first_byte if first_byte > 0 else None
        kind = "first_byte_timeout"
        if self._deadline is not None:
            left = max(self._deadline - clock.seconds(), 0.0)
            if delay is None or left <= delay:
                delay, kind = left, "total_timeout"
        if delay is not None:
            self._timer = clock.callLater(delay, self._too_slow, kind)

    def _too_slow(self, kind: str) -> None:
        self._timer = None
        if self._pending is not None:
            self._expired = kind
            pending, self._pending = self._pending, None
            pending.cancel()  # -> _failed

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        self._stop_timer()
        if self._gone:
            # Our own cancel after the client left: nothing to answer.
            self._end(AttemptResult(client_gone=True), upstream_ok=None)
            return
        name, base = self._name, self._upstream.config.base_url
        kind = self._expired or failure_kind(failure)
        if kind == "total_timeout":
            error = UpstreamFailure(
                kind, 504, f"Upstream {name} exceeded the total time budget.", unsent=False
            )
        elif kind == "first_byte_timeout":
            error = UpstreamFailure(
                kind, 504, f"Upstream {name} sent no response headers in time.", unsent=False
            )
        elif kind == "bad_response":
            error = UpstreamFailure(
                kind, 502, f"Upstream {name} sent an invalid HTTP response.", unsent=False
            )
        else:
            message = f"Upstream {name} unreachable ({kind}) at {base}."
            error = UpstreamFailure(kind, 502, message, unsent=True)
        log.warn(
            "upstream {provider} failed: {kind}: {error}",
            provider=name,
            kind=kind,
            error=describe_failure(failure),
            request_id=self._facts.request_id,
        )
        self._state.upstream_attempted(name, ok=False, failure=kind)
        self._result.callback(AttemptResult(failure=error))

    # -- the response ------------------------------------------------------------

    def _got_response(self, response: IResponse) -> None:
        self._pending = None
        self._stop_timer()
        if self._gone:
            response.deliverBody(_Discard())
            self._end(AttemptResult(client_gone=True), upstream_ok=None)
            return
        request = self._request
        facts = self._facts
        request.setResponseCode(response.code, response.phrase)
        encoded = copy_response_headers(response, request)
        content_type = response.headers.getRawHeaders(b"content-type", [None])[0]
        self._sse = is_event_stream(content_type)
        self._streaming = self._streaming or self._sse
        if self._sse:
            request.setHeader(b"cache-control", b"no-cache")
            request.setHeader(b"x-accel-buffering", b"no")
        # treq removed Content-Encoding and made the length unknown when it
        # decoded gzip; a known length is the upstream's, true for our bytes
        # unless the meter strips the usage chunk.
        if isinstance(response.length, int) and (encoded or not facts.strip_usage_chunk):
            request.setHeader(b"content-length", b"%d" % response.length)
        if encoded:
            self._unmetered = "content-encoding"
        else:
            first_values = {
                name.decode("latin-1").lower(): values[0].decode("latin-1")
                for name, values in response.headers.getAllRawHeaders()
                if values
            }
            self._meter = self._upstream.format.new_meter(
                facts.request, content_type, first_values, facts.strip_usage_chunk
            )
        if self._streaming:
            self._state.stream_opened(self._name)
        self._status = response.code
        self._relay = Relay(
            request,
            self._meter,
            self._state.clock,
            self._upstream.config.timeouts.idle_seconds,
            self._deadline,
            self._upstream.format.sse_error_event if self._sse else None,
            self._body_ended,
            self._state.runtime.config.server.client_stall_timeout_seconds,
        )
        response.deliverBody(self._relay)

    def _body_ended(self, complete: bool, kind: str | None, detail: str) -> None:
        relay = self._relay
        assert relay is not None
        if self._streaming:
            self._state.stream_closed(self._name)
        if kind is not None:
            log.warn(
                "upstream {provider} body failed: {kind}: {error}",
                provider=self._name,
                kind=kind,
                error=detail,
                request_id=self._facts.request_id,
            )
        if self._gone:
            upstream_ok = None
        elif complete:
            upstream_ok = (self._status or 0) < 500
        else:
            upstream_ok = False
        self._end(
            AttemptResult(
                status=self._status,
                complete=complete,
                usage=self._meter.usage() if self._meter is not None else Usage(),
                first_byte=relay.first_byte,
                sse=self._sse,
                unmetered=self._unmetered,
                client_gone=self._gone,
            ),
            upstream_ok=upstream_ok,
            failure=kind,
        )

    def _end(
        self, result: AttemptResult, upstream_ok: bool | None, failure: str | None = None
    ) -> None:
        if upstream_ok is not None:
            self._state.upstream_attempted(self._name, ok=upstream_ok, failure=failure)
        self._result.callback(result)

    def _bug(self, failure: Failure) -> None:
        log.failure(
            "bug in an upstream attempt for {request_id}",
            failure,
            request_id=self._facts.request_id,
        )
        if not self._result.called:
            self._result.errback(failure)


class _Discard(Protocol):
    """Reads and drops a body nobody wants (the client left)."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


def failure_kind(failure: Failure) -> str:
    """
    Name a connection failure for metrics and logs.
    """
    if failure.check(ConnectTimeoutError, ConnectingCancelledError):
        return "connect_timeout"
    if failure.check(ConnectionRefusedError, DNSLookupError, CancelledError):
        return "connect"
    reasons = getattr(failure.value, "reasons", []) or []
    if failure.check(ParseError, ResponseHeadTooLarge) or any(
        reason.check(ParseError, ResponseHeadTooLarge) for reason in reasons
    ):
        return "bad_response"
    text = failure.getErrorMessage().lower()
    for reason in reasons:
        text += " " + repr(reason.value).lower()
    if "ssl" in text or "tls" in text or "certificate" in text:
        return "tls"
    return "connect"


def is_event_stream(content_type: bytes | None) -> bool:
    return content_type is not None and content_type.lower().startswith(b"text/event-stream")
