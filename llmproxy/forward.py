# -*- test-case-name: llmproxy.test.test_forward -*-
"""
Forwarding one request to its provider and relaying the answer.

The request's way: L{ForwardResource.render} checks the path, reads the
(already buffered) body, asks the provider module what the request is,
reserves rate-limit capacity, and starts a L{ProxyCall}. The call sends the
request with treq, copies status and headers back, and hands the body to a
L{Relay}: a protocol registered as the request's push producer, so a slow
client pauses the upstream socket and the proxy holds about one chunk per
stream. Whatever way the call ends (done, upstream failure, timeout, client
gone) it ends once, in L{ProxyCall._settle}, which meters, prices, records
and reconciles the rate limit.
"""

from __future__ import annotations

import uuid
from io import BytesIO
from typing import Any
from urllib.parse import unquote_to_bytes

from attrs import define, evolve, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IConsumer, IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from llmproxy import identity
from llmproxy.httperrors import send_error
from llmproxy.metering import make_record
from llmproxy.providers.base import Meter, RequestInfo
from llmproxy.ratelimit import BackendUnavailable, Decision, LimitRequest, estimate_tokens
from llmproxy.runtime import ProxyState, Runtime, Upstream
from llmproxy.sinks import NullCostSink
from llmproxy.usage import Usage

log = Logger(namespace="llmproxy.forward")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""RFC 9110 7.6.1, plus the legacy C{Proxy-Connection}."""

REQUEST_DROP = frozenset({b"host", b"content-length", b"accept-encoding", b"expect"})
"""
Request headers set by the client side of the proxy instead: C{Host} by the
agent from the URL, C{Content-Length} from the body producer,
C{Accept-Encoding} by treq (gzip, which it decodes; SPEC 4).
"""

RESPONSE_DROP = frozenset({b"content-length", b"content-encoding"})
"""
Response framing headers we compute ourselves. C{Content-Encoding} survives
only when the body is passed through undecoded (see L{_copy_response_headers}).
"""


def _connection_named(headers: Headers) -> frozenset[bytes]:
    return frozenset(
        token.strip().lower()
        for value in headers.getRawHeaders(b"connection", [])
        for token in value.split(b",")
        if token.strip()
    )


def forward_request_headers(
    incoming: Headers, client_ip: str | None, secure: bool, forwarded: bool
) -> Headers:
    """
    The headers to send upstream: everything the client sent except
    hop-by-hop headers (and those C{Connection} names), C{Host},
    C{Content-Length} and C{Accept-Encoding}; plus C{X-Forwarded-For} (appended) and
    C{X-Forwarded-Proto} when C{forwarded}.
    """
    skip = HOP_BY_HOP | REQUEST_DROP | _connection_named(incoming)
    outgoing = Headers()
    for name, values in incoming.getAllRawHeaders():
        if name.lower() not in skip:
            outgoing.setRawHeaders(name, list(values))
    if forwarded:
        chain = b", ".join(incoming.getRawHeaders(b"x-forwarded-for", []))
        if client_ip:
            ip = client_ip.encode("ascii")
            chain = chain + b", " + ip if chain else ip
        if chain:
            outgoing.setRawHeaders(b"x-forwarded-for", [chain])
        outgoing.setRawHeaders(b"x-forwarded-proto", [b"https" if secure else b"http"])
    return outgoing


def split_target(uri: bytes, mount_segments: int) -> tuple[bytes, bytes]:
    """
    Split a raw (still percent-encoded) request target into the path after
    the mount prefix and the query.

    C{/openai/v1/files/a%2Fb?x=1} with one mount segment gives
    C{(b"/v1/files/a%2Fb", b"x=1")}.
    """
    path, _, query = uri.partition(b"?")
    segments = path.split(b"/")
    rest = b"/".join(segments[1 + mount_segments :])
    return b"/" + rest, query


def has_dot_segment(path: bytes) -> bool:
    """
    Whether C{path} has a C{.} or C{..} segment once percent-decoded, with
    C{/}, C{%2F} and backslashes all counted as separators (some servers
    treat each as one).
    """
    decoded = unquote_to_bytes(path).replace(b"\\", b"/")
    return any(segment in (b".", b"..") for segment in decoded.split(b"/"))


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


class UpstreamTimeoutError(Exception):
    """No response headers within C{first_byte_seconds} (or the total budget)."""


def _failure_kind(failure: Failure) -> str:
    """
    Name an upstream failure for metrics and logs.
    """
    if failure.check(UpstreamTimeoutError):
        return "first_byte_timeout"
    if failure.check(ConnectTimeoutError, ConnectingCancelledError):
        return "connect_timeout"
    if failure.check(ConnectionRefusedError, DNSLookupError):
        return "connect"
    text = failure.getErrorMessage().lower()
    for reason in getattr(failure.value, "reasons", []) or []:
        text += " " + repr(reason.value).lower()
    if "ssl" in text or "tls" in text or "certificate" in text:
        return "tls"
    return "connect"


def _is_event_stream(content_type: bytes | None) -> bool:
    return content_type is not None and content_type.lower().startswith(b"text/event-stream")


@frozen
class Route:
    """
    Where one request goes: the provider (by its mount name), under the
    runtime that was current when it arrived, for which user.

    @ivar mount_segments: path segments of the mount prefix (1 for
        C{/openai/}, 3 for C{/meta/<user>/openai/}).
    """

    state: ProxyState
    runtime: Runtime
    upstream: Upstream
    name: str
    mount_segments: int
    meta_user: str | None


class ForwardResource(Resource):
    """
    Forwards one request along its L{Route}. Built per request by the gateway.
    """

    isLeaf = True

    def __init__(self, route: Route) -> None:
        super().__init__()
        self._route = route

    def render(self, request: Request) -> Any:
        ProxyCall(self._route, request).start()
        return NOT_DONE_YET


@define
class _Outcome:
    """
    How a call ended, for the record, health and the limiter.

    @ivar status: the status sent to the client; C{None} when none was
        (the client left first).
    @ivar upstream_ok: the upstream attempt's health verdict, C{None} when
        the call says nothing about the upstream (the client left).
    @ivar unsent: the upstream never received the request.
    """

    status: int | None = None
    complete: bool = False
    upstream_ok: bool | None = None
    unsent: bool = False


class ProxyCall:
    """
    One proxied request, from check to record. Owns the disconnect logic:
    the client going away cancels the upstream request (before headers) or
    stops the upstream transport (during the body).
    """

    __slots__ = (
        "clock",
        "decision",
        "endpoint",
        "gone",
        "info",
        "key_id",
        "meter",
        "name",
        "pending",
        "relay",
        "request",
        "request_id",
        "route",
        "runtime",
        "settled",
        "started",
        "state",
        "status",
        "stream_counted",
        "streaming",
        "strip_usage",
        "total_expired",
        "total_timer",
        "ttfb",
        "upstream",
        "user",
    )
    """Slots: a thousand concurrent streams hold a thousand of these."""

    def __init__(self, route: Route, request: Request) -> None:
        self.route = route
        self.state = route.state
        self.runtime = route.runtime
        self.upstream = route.upstream
        self.name = route.name
        self.request = request
        self.clock = route.state.clock
        self.started = self.clock.seconds()
        self.request_id = uuid.uuid4().hex
        self.gone = False
        self.settled = False
        self.relay: Relay | None = None
        self.pending: Deferred[IResponse] | None = None
        self.total_timer: IDelayedCall | None = None
        self.total_expired = False
        self.ttfb: float | None = None
        self.meter: Meter | None = None
        self.info: RequestInfo | None = None
        self.decision: Decision | None = None
        self.key_id: str | None = None
        self.user: str | None = None
        self.streaming = False
        self.stream_counted = False
        self.strip_usage = False
        self.status: int | None = None
        self.endpoint = ""

    # -- request side ---------------------------------------------------------

    def start(self) -> None:
        request = self.request
        fmt = self.upstream.format
        request.setHeader(b"X-LLM-Proxy-Request-ID", self.request_id.encode("ascii"))
        access = getattr(request, "access", None)
        if access is not None:
            access.request_id = self.request_id
            access.provider = self.name
        path, query = split_target(request.uri, self.route.mount_segments)
        self.endpoint = request.path.decode("latin-1")
        if has_dot_segment(path):
            send_error(request, fmt, 400, "Path contains a dot-segment.", "proxy")
            return
        body = request.content.read() if request.content is not None else b""
        # The body lives on in this call until it is sent, not in the
        # request for as long as the response streams.
        request.content = BytesIO()
        info = fmt.inspect_request(request.method, path, query, body)
        self.info = info
        self.streaming = info.streaming
        secret = identity.credential(request.requestHeaders, query)
        self.key_id = identity.key_id(secret)
        self.user = identity.user_id(self.route.meta_user, request.requestHeaders, info.user)
        if access is not None:
            access.model = info.model
            access.streaming = info.streaming
            access.user_id = self.user
            access.key_id = self.key_id
        request.notifyFinish().addErrback(self._client_gone)
        limiter = self.runtime.limiter
        if limiter is None:
            self._send(path, query, body)
            return
        estimation = self.runtime.config.features.rate_limiting.estimation
        sample = len(body) <= estimation.max_sample_bytes
        estimate = estimate_tokens(
            text_chars=fmt.prompt_text_chars(info) if sample else None,
            body_bytes=len(body),
            provider=self.name,
            estimation=estimation,
        )
        limit_request = LimitRequest(
            provider=self.name,
            model=info.model,
            key_id=self.key_id,
            user=self.user,
            estimated_tokens=estimate,
        )
        reserved = limiter.reserve(limit_request)
        reserved.addCallbacks(
            self._limited,
            self._limiter_failed,
            callbackArgs=(path, query, body),
            errbackArgs=(path, query, body),
        )

    def _limited(self, decision: Decision, path: bytes, query: bytes, body: bytes) -> None:
        self.decision = decision
        request = self.request
        if decision.allowed:
            if decision.limit is not None and decision.remaining is not None:
                request.setHeader(b"X-RateLimit-Limit", b"%d" % decision.limit)
                request.setHeader(b"X-RateLimit-Remaining", b"%d" % decision.remaining)
            if self.gone:
                self._settle(_Outcome(unsent=True))
                return
            self._send(path, query, body)
            return
        denial = decision.denial
        assert denial is not None
        self.state.metrics.rate_limited(denial.scope.split(":", 1)[0], denial.metric, denial.window)
        if self.gone:
            return
        request.setHeader(b"X-RateLimit-Limit", b"%d" % denial.limit)
        request.setHeader(b"X-RateLimit-Remaining", b"%d" % denial.remaining)
        request.setHeader(b"X-RateLimit-Reset", b"%d" % denial.reset)
        request.setHeader(b"X-RateLimit-Scope", denial.scope.encode("utf-8"))
        request.setHeader(b"X-RateLimit-Metric", denial.metric.encode("ascii"))
        request.setHeader(b"X-RateLimit-Window", denial.window.encode("ascii"))
        if denial.exceeds_limit or denial.retry_after is None:
            request.setHeader(b"X-RateLimit-Reason", b"request exceeds limit")
            message = (
                f"Rate limit: this request's estimated {denial.metric} alone exceed the "
                f"{denial.window} limit of {denial.limit} for {denial.scope}."
            )
        else:
            request.setHeader(b"Retry-After", b"%d" % denial.retry_after)
            message = (
                f"Rate limit exceeded: {denial.metric} per {denial.window} for "
                f"{denial.scope} (limit {denial.limit}). Retry after {denial.retry_after}s."
            )
        send_error(request, self.upstream.format, 429, message, "proxy")

    def _limiter_failed(self, failure: Failure, path: bytes, query: bytes, body: bytes) -> None:
        backend = self.runtime.config.features.rate_limiting.backend
        self.state.metrics.ratelimit_backend_error(backend)
        if failure.check(BackendUnavailable):
            if not self.gone:
                send_error(
                    self.request,
                    self.upstream.format,
                    503,
                    "Rate limiter unavailable; try again shortly.",
                    "proxy",
                )
            return
        log.failure("rate limiter failed; failing open", failure)
        if self.gone:
            return
        self._send(path, query, body)

    def _send(self, path: bytes, query: bytes, body: bytes) -> None:
        request = self.request
        provider = self.upstream.config
        info = self.info
        assert info is not None
        body, strip = self.upstream.format.rewrite_request(info, body, provider.inject_stream_usage)
        self.strip_usage = strip
        # The parsed body is not needed once the request is on its way.
        self.info = evolve(info, body_json=None)
        url = provider.base_url.encode("utf-8") + path
        if query:
            url += b"?" + query
        forwarded = self.runtime.config.server.forwarded_headers
        # Who the client is and over what only matter for X-Forwarded-*, and
        # asking the transport costs interface checks on every request.
        headers = forward_request_headers(
            request.requestHeaders,
            getattr(request.getClientAddress(), "host", None) if forwarded else None,
            request.isSecure() if forwarded else False,
            forwarded,
        )
        body_producer = (
            BytesProducer(body) if body or request.method not in (b"GET", b"HEAD") else None
        )
        pending: Deferred[Any] = self.upstream.client.request(
            request.method.decode("ascii"),
            url,
            headers=headers,
            data=body_producer,
            unbuffered=True,
            allow_redirects=False,
        )
        self.pending = pending
        timeouts = provider.timeouts
        if timeouts.total_seconds > 0:
            self.total_timer = self.clock.callLater(timeouts.total_seconds, self._total_timeout)
        if timeouts.first_byte_seconds > 0:
            pending.addTimeout(
                timeouts.first_byte_seconds, self.clock, onTimeoutCancel=_raise_upstream_timeout
            )
        pending.addCallbacks(self._got_response, self._upstream_failed)
        pending.addErrback(self._bug)

    # -- response side --------------------------------------------------------

    def _got_response(self, response: IResponse) -> None:
        self.pending = None
        if self.gone:
            response.deliverBody(_Discard())
            self._settle(_Outcome(status=None))
            return
        request = self.request
        request.setResponseCode(response.code, response.phrase)
        encoded = _copy_response_headers(response, request)
        content_type = response.headers.getRawHeaders(b"content-type", [None])[0]
        sse = _is_event_stream(content_type)
        self.streaming = self.streaming or sse
        if sse:
            request.setHeader(b"cache-control", b"no-cache")
            request.setHeader(b"x-accel-buffering", b"no")
        # treq removed Content-Encoding and made the length unknown when it
        # decoded gzip; a known length is the upstream's, true for our bytes
        # unless we strip the usage chunk.
        if isinstance(response.length, int) and (encoded or not self.strip_usage):
            request.setHeader(b"content-length", b"%d" % response.length)
        first_values = {
            name.decode("latin-1").lower(): values[0].decode("latin-1")
            for name, values in response.headers.getAllRawHeaders()
            if values
        }
        info = self.info
        assert info is not None
        if encoded:
            self.state.metrics.unmetered(self.name, "content-encoding")
            self.meter = None
        else:
            self.meter = self.upstream.format.new_meter(
                info, content_type, first_values, self.strip_usage
            )
        if self.streaming:
            self.state.health.provider(self.name).active_streams += 1
            self.state.metrics.stream_opened(self.name)
            self.stream_counted = True
        self.status = response.code
        # From here the relay's one timer watches both the idle gap and the
        # total budget.
        deadline = None
        if self.total_timer is not None:
            if self.total_timer.active():
                self.total_timer.cancel()
            self.total_timer = None
            deadline = self.started + self.upstream.config.timeouts.total_seconds
        self.relay = Relay(self, self.upstream.config.timeouts.idle_seconds, sse, deadline)
        response.deliverBody(self.relay)

    def _upstream_failed(self, failure: Failure) -> None:
        self.pending = None
        if self.gone:
            # Our own cancel after the client left; nothing to answer.
            self._settle(_Outcome(status=None))
            return
        kind = "total_timeout" if self.total_expired else _failure_kind(failure)
        self.state.metrics.upstream_error(self.name, kind)
        base = self.upstream.config.base_url
        if self.total_expired:
            status, message = 504, f"Upstream {self.name} exceeded the total time budget."
        elif failure.check(UpstreamTimeoutError):
            status, message = 504, f"Upstream {self.name} sent no response headers in time."
        else:
            status = 502
            message = f"Upstream {self.name} unreachable ({kind}) at {base}."
        log.warn(
            "upstream {provider} failed: {kind}: {error}",
            provider=self.name,
            kind=kind,
            error=failure.getErrorMessage(),
            request_id=self.request_id,
        )
        send_error(self.request, self.upstream.format, status, message, "upstream")
        self._settle(_Outcome(status=status, upstream_ok=False, unsent=status == 502))

    def _total_timeout(self) -> None:
        """
        The total budget ran out before the response headers came (after
        that, the relay's timer keeps the budget).
        """
        self.total_timer = None
        if self.pending is not None:
            self.total_expired = True
            pending, self.pending = self.pending, None
            pending.cancel()  # -> _upstream_failed, which answers 504

    def _client_gone(self, failure: Failure) -> None:
        self.gone = True
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.cancel()
        elif self.relay is not None:
            self.relay.client_gone()

    def _bug(self, failure: Failure) -> None:
        log.failure("bug while forwarding {request_id}", failure, request_id=self.request_id)
        if not self.gone and not self.settled:
            try:
                send_error(self.request, self.upstream.format, 502, "Proxy error.", "proxy")
            except Exception:
                log.failure("could not answer after a bug")
        self._settle(_Outcome(status=502))

    # -- the end --------------------------------------------------------------

    def _settle(self, outcome: _Outcome) -> None:
        """
        Account for the call exactly once: record, metrics, health, limiter.
        """
        if self.settled:
            return
        self.settled = True
        if self.total_timer is not None and self.total_timer.active():
            self.total_timer.cancel()
        state = self.state
        now = state.clock.seconds()
        usage = self.meter.usage() if self.meter is not None else Usage()
        info = self.info
        model = usage.model or (info.model if info is not None else None)
        status = outcome.status if outcome.status is not None else 499
        cost = self.runtime.prices.cost(self.name, model, usage)
        if usage.reported and not cost.priced:
            state.unpriced.warn_once(self.name, model)
        if self.stream_counted:
            state.health.provider(self.name).active_streams -= 1
            state.metrics.stream_closed(self.name)
        if outcome.upstream_ok is not None:
            state.health.attempt(self.name, ok=outcome.upstream_ok)
        duration = now - self.started
        ttfb = None if self.ttfb is None else self.ttfb - self.started
        state.metrics.request_finished(self.name, model, status, duration, ttfb, usage, cost)
        ttfb_ms = None if ttfb is None else round(ttfb * 1000.0, 3)
        if not isinstance(state.sink, NullCostSink):  # no record without cost tracking
            record = make_record(
                now=now,
                request_id=self.request_id,
                provider=self.name,
                model=model,
                endpoint=self.endpoint,
                user_id=self.user,
                key_id=self.key_id,
                is_streaming=self.streaming,
                status=status,
                complete=outcome.complete,
                usage=usage,
                cost=cost,
                duration_ms=duration * 1000.0,
                ttfb_ms=None if ttfb is None else ttfb * 1000.0,
            )
            state.sink.write(record)
        access = getattr(self.request, "access", None)
        if access is not None:
            access.model = model
            access.streaming = self.streaming
            access.ttfb_ms = ttfb_ms
            access.input_tokens = usage.input_tokens
            access.output_tokens = usage.output_tokens
            access.total_cost = cost.total_cost
        self._reconcile(outcome, usage)

    def _reconcile(self, outcome: _Outcome, usage: Usage) -> None:
        """
        Correct the rate-limit reservation to what the call really used.
        """
        limiter = self.runtime.limiter
        decision = self.decision
        if limiter is None or decision is None or decision.reservation is None:
            return
        reservation = decision.reservation
        if usage.reported:
            done = limiter.reconcile(reservation, usage.total_tokens)
        elif outcome.unsent:
            # The upstream never saw the request: give it all back.
            done = limiter.release(reservation)
        elif outcome.status is not None and outcome.status >= 400:
            # Error answers are not billed by the providers.
            done = limiter.reconcile(reservation, 0)
        else:
            # Unknown usage (cut before any usage arrived): keep the estimate.
            return
        done.addErrback(lambda f: log.failure("rate-limit reconcile failed", f))

    def first_byte(self) -> None:
        if self.ttfb is None:
            self.ttfb = self.clock.seconds()

    def body_done(self, complete: bool, upstream_ok: bool | None) -> None:
        self._settle(_Outcome(status=self.status, complete=complete, upstream_ok=upstream_ok))


def _raise_upstream_timeout(result: object, timeout: float) -> object:
    """
    C{onTimeoutCancel}: turn the cancellation our timeout caused into
    L{UpstreamTimeoutError} (the agent reports it as C{ResponseNeverReceived}).
    """
    if isinstance(result, Failure):
        raise UpstreamTimeoutError(timeout)
    return result


def _copy_response_headers(response: IResponse, request: Request) -> bool:
    """
    Copy the upstream's response headers to C{request}, less hop-by-hop,
    framing and CORS headers (the proxy owns CORS). Returns whether the body
    is still encoded: treq decodes gzip and removes C{Content-Encoding}
    itself, so one still present is an encoding we pass through untouched.
    """
    headers = response.headers
    skip = HOP_BY_HOP | RESPONSE_DROP | _connection_named(headers)
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in skip or lower.startswith(b"access-control-"):
            continue
        request.responseHeaders.setRawHeaders(name, list(values))
    encodings = [
        token.strip()
        for value in headers.getRawHeaders(b"content-encoding", [])
        for token in value.split(b",")
        if token.strip() and token.strip().lower() != b"identity"
    ]
    # Twisted's ContentDecoderAgent leaves an empty Content-Encoding on every
    # response that had none; only a real coding counts (and is passed on).
    if encodings:
        request.responseHeaders.setRawHeaders(b"content-encoding", [b", ".join(encodings)])
        return True
    return False


class _Discard(Protocol):
    """Reads and drops a body nobody wants (the client left)."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


class Relay(Protocol):
    """
    Writes the upstream body to the client as it arrives.

    Registered as the request's push producer: when the client's socket
    buffer fills, twisted.web pauses us, which pauses the upstream socket.
    """

    def __init__(
        self, call: ProxyCall, idle_seconds: float, sse: bool, deadline: float | None = None
    ) -> None:
        """
        @param idle_seconds: the longest silence allowed between chunks (0: none).
        @param deadline: when the call's total time budget ends (clock
            seconds), or L{None}.
        """
        self.call = call
        self.request = call.request
        self.idle_seconds = idle_seconds
        self.deadline = deadline
        self.sse = sse
        self.idle_timer: IDelayedCall | None = None
        self.aborted: tuple[str, str] | None = None

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)
        self._arm_idle()

    def _arm_idle(self) -> None:
        """
        (Re)arm the one timer for whichever comes first: the idle limit from
        now, or the total deadline. One timer per stream, reset per chunk,
        instead of two.
        """
        clock = self.call.clock
        now = clock.seconds()
        end = self.deadline
        if self.idle_seconds > 0:
            idle_end = now + self.idle_seconds
            end = idle_end if end is None else min(end, idle_end)
        if end is None:
            return
        delay = max(end - now, 0.0)
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.reset(delay)
        else:
            self.idle_timer = clock.callLater(delay, self._idle)

    def _idle(self) -> None:
        self.idle_timer = None
        if self.deadline is not None and self.call.clock.seconds() >= self.deadline:
            self.abort("total_timeout", "Upstream exceeded the total time budget.")
        else:
            self.abort("idle_timeout", "Upstream stream was silent for too long.")

    def dataReceived(self, data: bytes) -> None:
        call = self.call
        call.first_byte()
        self._arm_idle()
        meter = call.meter
        if meter is not None:
            data = meter.feed(data)
        if data and not call.gone:
            self.request.write(data)

    def abort(self, kind: str, message: str) -> None:
        """
        Give up on the upstream mid-body (idle or total timeout): close it;
        L{connectionLost} then ends the client's response with an error.
        """
        if self.aborted is not None:
            return
        self.aborted = (kind, message)
        self.call.state.metrics.upstream_error(self.call.name, kind)
        self.transport.stopProducing()  # type: ignore[union-attr]

    def client_gone(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        call = self.call
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.cancel()
        self.idle_timer = None
        meter = call.meter
        tail = meter.finish() if meter is not None else b""
        complete = self.aborted is None and bool(reason.check(ResponseDone, PotentialDataLoss))
        if call.gone:
            call.body_done(complete=False, upstream_ok=None)
            return
        request = self.request
        request.unregisterProducer()
        if tail:
            request.write(tail)
        if complete:
            request.finish()
            call.body_done(complete=True, upstream_ok=(call.status or 0) < 500)
            return
        kind, message = self.aborted or ("broken_stream", "Upstream stream ended unexpectedly.")
        if self.aborted is None:
            call.state.metrics.upstream_error(call.name, kind)
        log.warn(
            "upstream {provider} body failed: {kind}",
            provider=call.name,
            kind=kind,
            request_id=call.request_id,
            error=reason.getErrorMessage(),
        )
        if self.sse:
            status = 504 if kind in ("idle_timeout", "total_timeout") else 502
            # The blank line ends an event the upstream left half-written, so
            # the error event after it parses on its own.
            request.write(b"\n\n" + call.upstream.format.sse_error_event(status, message))
            request.finish()
        else:
            # Headers are gone already: cut the connection so the client sees
            # a truncated body rather than a complete-looking one.
            request.loseConnection()
        call.body_done(complete=False, upstream_ok=False)


__all__ = [
    "HOP_BY_HOP",
    "BytesProducer",
    "ForwardResource",
    "ProxyCall",
    "Relay",
    "Route",
    "forward_request_headers",
    "has_dot_segment",
    "split_target",
]
