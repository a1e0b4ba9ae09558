# -*- test-case-name: llmproxy.test.test_fake_upstream,llmproxy.test.test_fake_upstream_memory -*-
"""
The fake as a twisted.web server: L{FakeUpstream} (its resource, what it
records and the waits a test uses), the L{Site} and channel that keep raw
header order and track connections, and L{listen} for loopback TCP.
"""

from __future__ import annotations

import itertools
from typing import Any, cast

from twisted.internet.defer import Deferred, DeferredQueue, gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTCP, IReactorTime
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http import Request as HTTPRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from llmproxy.testing.fake_upstream.knobs import accepts_gzip
from llmproxy.testing.fake_upstream.records import ClientDisconnect, ReceivedRequest
from llmproxy.testing.fake_upstream.responder import Responder, WebRequest
from llmproxy.testing.fake_upstream.routes import answer


class _RecordingRequest(Request):
    """
    A request that keeps its header lines as they arrived (filled in by
    L{_FakeChannel}).
    """

    raw_headers: list[tuple[bytes, bytes]] | None = None


class _FakeChannel(HTTPChannel):
    """
    An HTTP channel that records raw header lines and tells its fake when
    it connects and disconnects.
    """

    def headerReceived(self, line: bytes) -> bool:
        accepted: bool = super().headerReceived(line)
        if accepted and self.requests:
            request = self.requests[-1]
            if isinstance(request, _RecordingRequest):
                if request.raw_headers is None:
                    request.raw_headers = []
                name, _, value = line.partition(b":")
                request.raw_headers.append((name, value.strip(b" \t")))
        return accepted

    def _owner(self) -> FakeUpstream | None:
        factory = self.factory
        return factory.fake if isinstance(factory, _FakeSite) else None

    def connectionMade(self) -> None:
        super().connectionMade()
        owner = self._owner()
        if owner is not None:
            owner._channels.add(self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        owner = self._owner()
        if owner is not None:
            owner._channel_gone(self)


class _FakeSite(Site):
    """
    A quiet L{Site} (no access log: the fake runs under benchmarks) for one
    L{FakeUpstream}.
    """

    protocol = _FakeChannel  # type: ignore[assignment]

    def __init__(self, fake: FakeUpstream) -> None:
        super().__init__(fake.resource(), requestFactory=_RecordingRequest, reactor=fake.clock)
        self.fake = fake

    def log(self, request: HTTPRequest) -> None:
        pass


class _FakeResource(Resource):
    """
    Every path, every method: the fake routes on the raw request path.
    """

    isLeaf = True

    def __init__(self, fake: FakeUpstream) -> None:
        super().__init__()
        self._fake = fake

    def render(self, request: Request) -> object:
        self._fake._handle(request)
        return NOT_DONE_YET


class FakeUpstream:
    """
    A fake OpenAI + Anthropic + Gemini upstream (see the package
    docstring for routes and knobs).

    Usage fields, per provider, from the knobs (I{in}: input, I{cr}:
    cached, I{cw}: cache-write, I{out}: output, I{r}: reasoning):
      - OpenAI: C{prompt_tokens}=in, C{prompt_tokens_details.cached_tokens}=cr
        (and C{cache_write_tokens}=cw when non-zero), C{completion_tokens}=
        out+r, C{completion_tokens_details.reasoning_tokens}=r; Responses:
        C{input_tokens}=in, C{input_tokens_details.{cached_tokens,
        cache_write_tokens}}, C{output_tokens}=out+r,
        C{output_tokens_details.reasoning_tokens}=r.
      - Anthropic: C{input_tokens}=in, C{cache_read_input_tokens}=cr,
        C{cache_creation_input_tokens}=cw, C{output_tokens}=out+r (and
        C{output_tokens_details.thinking_tokens}=r when non-zero);
        C{message_start} says C{output_tokens: 1}, C{message_delta} carries
        the cumulative totals.
      - Gemini: C{promptTokenCount}=in, C{cachedContentTokenCount}=cr (when
        non-zero), C{candidatesTokenCount}=out, C{thoughtsTokenCount}=r (when
        non-zero), C{totalTokenCount}=in+out+r; stream chunks before the
        last carry the prompt-only form.

    @ivar clock: the clock every delay runs on.
    @ivar defaults: knob values used when a request does not set them
        (keys: knob header names, lower case).
    @ivar require_auth: check credentials like the real APIs do.
    @ivar received: every request, in arrival order.
    @ivar connection_lost_events: every response cut short by its client.
    @ivar paused_count: times the transport paused a response's writes.
    @ivar resumed_count: times it resumed one.
    @ivar bytes_sent: body bytes written over all responses (after gzip,
        before chunked framing).
    @ivar active_responses: responses started and not yet finished or lost.
    @ivar record_bodies: keep each response's body for L{last_body_sent}
        (on by default; the standalone server turns it off).
    @ivar failed_on_purpose: requests failed for C{x-fake-fail-first} so far.
    @ivar record_requests: append to L{received} and feed
        L{wait_for_request} (on by default; off in the standalone server,
        where nobody reads them and a long benchmark would grow them forever).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.defaults: dict[str, str] = {}
        self.require_auth = True
        self.received: list[ReceivedRequest] = []
        self.connection_lost_events: list[ClientDisconnect] = []
        self.paused_count = 0
        self.resumed_count = 0
        self.bytes_sent = 0
        self.active_responses = 0
        self.record_bodies = True
        self.record_requests = True
        self.failed_on_purpose = 0
        self._last_responder: Responder | None = None
        self._serial = itertools.count(1)
        self._requests: DeferredQueue[ReceivedRequest] = DeferredQueue()
        self._losses: DeferredQueue[float] = DeferredQueue()
        self._channels: set[_FakeChannel] = set()
        self._idle: list[Deferred[None]] = []
        self._resource = _FakeResource(self)

    def resource(self) -> IResource:
        """
        The fake as a leaf resource: mount it anywhere, for instance behind
        treq's C{RequestTraversalAgent} for tests in memory.  Its timers run
        on C{clock}; request headers are recorded from Twisted's L{Headers}
        (canonical names, grouped), and L{disconnect_all} does not see the
        connections.
        """
        return self._resource

    def site(self) -> Site:
        """
        A L{Site} serving the fake that also records raw header order and
        lets L{disconnect_all} drop its connections.  Its timers run on
        C{clock}.
        """
        return _FakeSite(self)

    @property
    def last_body_sent(self) -> bytes:
        """
        The body bytes (after gzip, without chunked framing) of the response
        whose headers went out last, so far if it is still streaming.  Empty
        when C{record_bodies} is off or nothing was sent.
        """
        responder = self._last_responder
        if responder is None or responder.sent is None:
            return b""
        return b"".join(responder.sent)

    def wait_for_request(self) -> Deferred[ReceivedRequest]:
        """
        The next request not yet handed out: every request is delivered to
        exactly one call, in arrival order (the first call gets the first
        request ever received, immediately if it has already arrived).
        """
        return self._requests.get()

    def wait_for_disconnect(self) -> Deferred[float]:
        """
        Like L{wait_for_request}, for L{connection_lost_events}: fires with
        the clock time at which the next not yet handed out client
        connection was lost mid-response.
        """
        return self._losses.get()

    def disconnect_all(self) -> Deferred[None]:
        """
        Abort every open connection made through L{site}; fires once all of
        them are closed (so trial sees a clean reactor).
        """
        done: Deferred[None] = Deferred()
        if not self._channels:
            done.callback(None)
            return done
        self._idle.append(done)
        for channel in list(self._channels):
            transport = channel.transport
            if transport is not None:
                transport.abortConnection()  # type: ignore[attr-defined]
        return done

    def _channel_gone(self, channel: _FakeChannel) -> None:
        self._channels.discard(channel)
        if not self._channels:
            waiting, self._idle = self._idle, []
            for waiter in waiting:
                waiter.callback(None)

    def _headers_written(self, responder: Responder) -> None:
        self._last_responder = responder

    def _connection_lost(self, event: ClientDisconnect) -> None:
        self.connection_lost_events.append(event)
        self._losses.put(event.time)

    def _record(self, request: Request) -> ReceivedRequest:
        uri: bytes = request.uri
        if isinstance(request, _RecordingRequest) and request.raw_headers is not None:
            headers = list(request.raw_headers)
        else:
            headers = [
                (name, value)
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ]
        content = request.content
        body = b""
        if content is not None:
            content.seek(0)
            body = content.read()
        received = ReceivedRequest(
            method=request.method,
            uri=uri,
            path=uri.partition(b"?")[0],
            query=uri.partition(b"?")[2],
            headers=headers,
            body=body,
        )
        if self.record_requests:
            self.received.append(received)
        return received

    def _handle(self, request: Request) -> None:
        received = self._record(request)
        knobs, reply = answer(
            received,
            self.defaults,
            self.require_auth,
            serial=next(self._serial),
            now=int(self.clock.seconds()),
            failed_so_far=self.failed_on_purpose,
        )
        if knobs.fail_first is not None and self.failed_on_purpose < knobs.fail_first:
            self.failed_on_purpose += 1
        if knobs.reset:
            # No status line at all: the connection just drops.
            transport: Any = request.channel.transport
            transport.abortConnection()
            if self.record_requests:
                self._requests.put(received)
            return
        Responder(
            self,
            cast(WebRequest, request),
            received,
            knobs,
            reply,
            gzip=knobs.gzip and accepts_gzip(received.headers),
        ).start()
        # Last, so a waiter resuming synchronously sees the response under way.
        if self.record_requests:
            self._requests.put(received)


@implementer(IListeningPort)
class _FakePort:
    """
    A listening port whose C{stopListening} also drops the fake's open
    connections and waits until they are gone.
    """

    def __init__(self, port: IListeningPort, fake: FakeUpstream) -> None:
        self._port = port
        self._fake = fake

    def startListening(self) -> None:
        self._port.startListening()

    def stopListening(self) -> Deferred[None]:
        stopped = self._port.stopListening()
        waits: list[Deferred[Any]] = [self._fake.disconnect_all()]
        if isinstance(stopped, Deferred):
            waits.append(stopped)
        gathered = gatherResults(waits, consumeErrors=True)
        result: Deferred[None] = gathered.addCallback(lambda ignored: None)
        return result

    def getHost(self) -> IAddress:
        return self._port.getHost()


def listen(
    fake: FakeUpstream, reactor: IReactorTCP, port: int = 0, interface: str = "127.0.0.1"
) -> Deferred[IListeningPort]:
    """
    Serve C{fake} over TCP.  The port's C{stopListening} also closes every
    open connection of the fake, so C{addCleanup(port.stopListening)} leaves
    a clean reactor.
    """
    endpoint = TCP4ServerEndpoint(reactor, port, interface=interface)
    listening: Deferred[IListeningPort] = endpoint.listen(fake.site())
    return listening.addCallback(lambda bound: _FakePort(bound, fake))
