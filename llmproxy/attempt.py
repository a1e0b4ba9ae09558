# -*- test-case-name: llmproxy.test.test_call -*-
"""
Phase three of a proxied request: attempt.

An L{Attempt} is one try at one upstream: send the request with treq
(with that upstream's headers and model name), copy the response's status
and headers to the client, relay its body (L{llmproxy.relay}), watch the
first-byte, idle and total timeouts, and stop when the client leaves. It
ends with an L{AttemptResult} whose verdict says what the outcome means
for retries and circuits (L{llmproxy.outcomes}).

Until the attempt commits to the upstream's answer, nothing has been
written to the client. A failure before the response headers is returned,
not answered; a retryable status, or a stream that fails before its first
content event (held back by the stream gate, L{llmproxy.gate}), is given
up when the call has another attempt to make. Once committed, the attempt
owns the client's response and ends it itself, whatever happens.
"""

from __future__ import annotations

from collections.abc import Callable
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

from llmproxy.choice import Choice
from llmproxy.cloudauth import NoCredentialsError
from llmproxy.gate import StreamGate
from llmproxy.headers import content_codings, copy_response_headers, forward_request_headers
from llmproxy.inspection import CallFacts
from llmproxy.logs import describe_failure
from llmproxy.outcomes import (
    CLIENT_GONE,
    FAILED_AFTER_CONTENT,
    STREAM_FAILED,
    Verdict,
    judge_failure,
    judge_response,
)
from llmproxy.providers import Meter
from llmproxy.relay import Relay
from llmproxy.runtime import ProxyState
from llmproxy.senturl import for_treq
from llmproxy.tracing import NO_TRACE, IRequestTrace
from llmproxy.upstream import ResponseHeadTooLarge
from llmproxy.usage import Usage

log = Logger(namespace="llmproxy.attempt")

ATTEMPTS_HEADER = b"X-LLM-Proxy-Attempts"
UPSTREAM_HEADER = b"X-LLM-Proxy-Upstream"


@frozen
class UpstreamFailure:
    """
    Why an attempt got no response, and what the client should hear if no
    other attempt follows.

    @ivar kind: C{connect}, C{tls}, C{connect_timeout}, C{bad_response},
        C{credentials} (the proxy's own cloud credentials could not be found),
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

    @ivar status: the upstream's status; relayed to the client unless the
        attempt was C{abandoned}; L{None} when there was no response.
    @ivar failure: why there was no response, if so.
    @ivar verdict: what the outcome means for retries and the circuit.
    @ivar abandoned: the attempt gave its response up for another attempt
        before anything reached the client (the call agreed).
    @ivar complete: the whole body reached the client.
    @ivar usage: what the response reported, as far as it got.
    @ivar first_byte: clock time of the upstream's first body byte.
    @ivar sse: the response was an event stream.
    @ivar unmetered: why the body was not metered (C{content-encoding}).
    @ivar client_gone: the client left before the attempt ended.
    """

    verdict: Verdict
    status: int | None = None
    failure: UpstreamFailure | None = None
    abandoned: bool = False
    complete: bool = False
    usage: Usage = field(factory=Usage)
    first_byte: float | None = None
    sse: bool = False
    unmetered: str | None = None
    client_gone: bool = False


RetryInstead = Callable[[Verdict], bool]
"""
Asked, before anything of a response reached the client, whether to give
it up for another attempt (C{True}: the attempt abandons it).
"""


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
    One try at one upstream for one client request.
    """

    __slots__ = (
        "_body",
        "_choice",
        "_committed",
        "_deadline",
        "_expired",
        "_facts",
        "_gone",
        "_headers",
        "_meter",
        "_name",
        "_number",
        "_pending",
        "_relay",
        "_request",
        "_response",
        "_result",
        "_retry_instead",
        "_sse",
        "_state",
        "_status",
        "_streaming",
        "_tell_committed",
        "_timer",
        "_trace",
        "_unmetered",
        "_verdict",
    )

    def __init__(
        self,
        choice: Choice,
        facts: CallFacts,
        body: bytes,
        request: Request,
        state: ProxyState,
        deadline: float | None,
        number: int = 1,
        retry_instead: RetryInstead | None = None,
        trace: IRequestTrace = NO_TRACE,
        committed: Callable[[], object] | None = None,
    ) -> None:
        """
        @param choice: the upstream to try.
        @param body: the body to send (L{llmproxy.inspection.Inspected}).
        @param request: the client's request, whose response this attempt
            writes once it commits to the upstream's answer.
        @param deadline: when the call's total time budget ends (clock
            seconds), or L{None}.
        @param number: which attempt of the call this is (for
            C{X-LLM-Proxy-Attempts}).
        @param retry_instead: asked before the attempt commits to a
            retryable answer; L{None} when no other attempt can follow (the
            answer is relayed as it is, and streams are not held back).
        @param trace: the request's trace, of which this attempt is a part.
        @param committed: told when the upstream's answer becomes the
            client's: no other attempt can follow it.
        """
        self._choice = choice
        self._trace = trace
        self._facts = facts
        self._body = body
        self._request = request
        self._state = state
        self._deadline = deadline
        self._number = number
        self._retry_instead = retry_instead
        self._tell_committed = committed
        self._name = facts.provider
        self._pending: Deferred[IResponse] | None = None
        self._timer: IDelayedCall | None = None
        self._expired: str | None = None
        self._relay: Relay | None = None
        self._meter: Meter | None = None
        self._response: IResponse | None = None
        self._headers: dict[str, str] = {}
        self._committed = False
        self._gone = False
        self._sse = False
        self._streaming = facts.request.streaming
        self._status: int | None = None
        self._unmetered: str | None = None
        self._verdict = CLIENT_GONE
        self._result: Deferred[AttemptResult] = Deferred()

    def run(self, forwarded: bool) -> Deferred[AttemptResult]:
        """
        Send the request; the result fires once the attempt is over.

        @param forwarded: add C{X-Forwarded-For} and C{X-Forwarded-Proto}.
        """
        request, facts, endpoint = self._request, self._facts, self._choice.endpoint
        path, body = facts.path, self._body
        self._body = b""
        renamed = endpoint.models.get(facts.request.model or "")
        if renamed is not None:
            path, body = self._choice.upstream.format.rename_model(
                facts.request, path, body, renamed
            )
        url = endpoint.base_url.encode("utf-8") + path
        if facts.query:
            url += b"?" + facts.query
        # Who the client is and over what only matter for X-Forwarded-*, and
        # asking the transport costs interface checks on every request.
        headers = forward_request_headers(
            request.requestHeaders,
            getattr(request.getClientAddress(), "host", None) if forwarded else None,
            request.isSecure() if forwarded else False,
            forwarded,
        )
        if facts.credential_swap is not None:
            facts.credential_swap.apply(headers, self._choice.upstream.config.name)
        for name, value in endpoint.headers.items():
            headers.setRawHeaders(name, [value.encode("latin-1")])
        attempt_trace = self._trace.attempt(self._choice.upstream, endpoint.base_url, headers)
        self._result.addCallback(attempt_trace.ended)
        producer = BytesProducer(body) if body or request.method not in (b"GET", b"HEAD") else None
        pending: Deferred[Any] = self._choice.upstream.client.request(
            request.method.decode("ascii"),
            for_treq(url),
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
        first_byte = self._choice.upstream.config.timeouts.first_byte_seconds
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
            self._end(AttemptResult(CLIENT_GONE, client_gone=True), upstream_ok=None)
            return
        name = self._choice.label
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
            base = self._choice.endpoint.base_url
            message = f"Upstream {name} unreachable ({kind}) at {base}."
            error = UpstreamFailure(kind, 502, message, unsent=True)
        log.warn(
            "upstream {upstream} failed: {kind}: {error}",
            upstream=name,
            kind=kind,
            error=describe_failure(failure),
            request_id=self._facts.request_id,
        )
        self._state.upstream_attempted(self._name, ok=False, failure=kind)
        self._result.callback(AttemptResult(judge_failure(kind), failure=error))

    # -- the response ------------------------------------------------------------

    def _got_response(self, response: IResponse) -> None:
        self._pending = None
        self._stop_timer()
        if self._gone:
            response.deliverBody(_Discard())
            self._end(AttemptResult(CLIENT_GONE, client_gone=True), upstream_ok=None)
            return
        self._response = response
        self._status = response.code
        self._headers = {
            name.decode("latin-1").lower(): values[0].decode("latin-1")
            for name, values in response.headers.getAllRawHeaders()
            if values
        }
        verdict = self._verdict = judge_response(
            response.code, self._headers, self._state.clock.seconds()
        )
        if verdict.retryable and self._retry_instead is not None and self._retry_instead(verdict):
            response.deliverBody(_Discard())
            self._state.upstream_attempted(self._name, ok=response.code < 500, failure=None)
            self._result.callback(AttemptResult(verdict, status=response.code, abandoned=True))
            return
        content_type = response.headers.getRawHeaders(b"content-type", [None])[0]
        self._sse = is_event_stream(content_type)
        self._streaming = self._streaming or self._sse
        if not content_codings(response.headers):
            self._meter = self._choice.upstream.format.new_meter(
                self._facts.request, content_type, self._headers, self._facts.strip_usage_chunk
            )
        gate: StreamGate | None = None
        gate_config = self._choice.upstream.config.stream_gate
        if (
            self._sse
            and response.code < 300
            and self._retry_instead is not None
            and gate_config.max_bytes > 0
            and gate_config.max_seconds > 0
        ):
            gate = StreamGate(
                self._facts.request,
                self._choice.upstream.format.stream_event,
                gate_config.max_bytes,
            )
        else:
            self._commit()
        config = self._choice.upstream.config
        self._relay = Relay(
            self._request,
            self._meter,
            self._state.clock,
            config.timeouts.idle_seconds,
            self._deadline,
            self._choice.upstream.format.stream_error(
                self._facts.request, content_type, self._meter
            ),
            self._body_ended,
            gate=gate,
            gate_seconds=gate_config.max_seconds,
            opened=self._commit,
            failed_early=self._retry_stream,
            stall_seconds=self._state.runtime.config.server.client_stall_timeout_seconds,
        )
        response.deliverBody(self._relay)

    def _commit(self) -> None:
        """
        Make the upstream's answer the client's: status, headers, and from
        now on the body as it comes.
        """
        response = self._response
        assert response is not None and not self._committed
        self._committed = True
        if self._tell_committed is not None:
            self._tell_committed()
        request = self._request
        request.setResponseCode(response.code, response.phrase)
        encoded = copy_response_headers(response, request)
        request.setHeader(ATTEMPTS_HEADER, b"%d" % self._number)
        request.setHeader(UPSTREAM_HEADER, self._choice.label.encode("utf-8"))
        if self._streaming:
            # Any stream (SSE, Bedrock's event stream, Gemini's JSON array):
            # nothing between here and the client may hold it back.
            request.setHeader(b"cache-control", b"no-cache")
            request.setHeader(b"x-accel-buffering", b"no")
        # treq removed Content-Encoding and made the length unknown when it
        # decoded gzip; a known length is the upstream's, true for our bytes
        # unless the meter strips the usage chunk.
        if isinstance(response.length, int) and (encoded or not self._facts.strip_usage_chunk):
            request.setHeader(b"content-length", b"%d" % response.length)
        if encoded:
            self._unmetered = "content-encoding"
        if self._streaming:
            self._state.stream_opened(self._name)

    def _retry_stream(self) -> bool:
        """
        The stream failed before its first content event: give it up for
        another attempt, if the call has one.
        """
        return self._retry_instead is not None and self._retry_instead(STREAM_FAILED)

    def _body_ended(self, complete: bool, kind: str | None, detail: str) -> None:
        relay = self._relay
        assert relay is not None
        if self._committed and self._streaming:
            self._state.stream_closed(self._name)
        if kind is not None:
            log.warn(
                "upstream {upstream} body failed: {kind}: {error}",
                upstream=self._choice.label,
                kind=kind,
                error=detail,
                request_id=self._facts.request_id,
            )
        if relay.abandoned:
            self._state.upstream_attempted(self._name, ok=False, failure=kind)
            self._result.callback(AttemptResult(STREAM_FAILED, status=self._status, abandoned=True))
            return
        if self._gone:
            verdict, upstream_ok = CLIENT_GONE, None
        elif complete:
            verdict = self._verdict
            upstream_ok = (self._status or 0) < 500
        else:
            verdict = FAILED_AFTER_CONTENT if relay.written else STREAM_FAILED
            upstream_ok = False
        self._end(
            AttemptResult(
                verdict,
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
    if failure.check(NoCredentialsError):
        return "credentials"
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
