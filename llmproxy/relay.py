# -*- test-case-name: llmproxy.test.test_attempt -*-
"""
Relaying an upstream response body to the client as it arrives.

The L{Relay} is the body protocol of one upstream response and the push
producer of the client's response: when the client's socket buffer fills,
twisted.web pauses it, and it pauses the upstream socket, so the proxy holds
about one chunk per stream. One timer per stream watches the call's total
deadline and, whichever applies, the upstream's silence between chunks
(while the client reads) or the client's stall (while it does not: the
upstream is then silent because the relay stopped reading it, which is no
fault of the upstream's). A client that stalls longer than its limit is
dropped, as a client fault.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request
from zope.interface import implementer

from llmproxy.logs import describe_failure
from llmproxy.providers import Meter

log = Logger(namespace="llmproxy.relay")

ErrorEvent = Callable[[int, str], bytes]
"""A provider's C{sse_error_event}: status and message to SSE bytes."""

BodyEnded = Callable[[bool, str | None, str], None]
"""
Told once when the body ends: whether it was complete; if not, why (a
failure kind such as C{idle_timeout}, or L{None} when the client left) and
the error's text.
"""


@implementer(IPushProducer)
class Relay(Protocol):
    """
    Writes the upstream body to the client as it arrives, through the
    response's meter, and ends the client's response the way the body ended.

    It is the push producer of the client's response (twisted.web pauses
    and resumes it as the client's socket fills and drains) and passes that
    on to the upstream's transport.
    """

    def __init__(
        self,
        request: Request,
        meter: Meter | None,
        clock: IReactorTime,
        idle_seconds: float,
        deadline: float | None,
        error_event: ErrorEvent | None,
        ended: BodyEnded,
        stall_seconds: float = 0.0,
    ) -> None:
        """
        @param meter: reads usage from the body (and may remove an event);
            L{None} for a body that is not metered.
        @param idle_seconds: the longest silence allowed between chunks (0: none).
        @param deadline: when the call's total time budget ends (clock
            seconds), or L{None}.
        @param error_event: for an SSE response, how to tell the client's SDK
            that the stream failed; L{None} for other bodies, whose
            connection is cut instead.
        @param stall_seconds: the longest the client may leave the response
            unread (0: no limit).
        """
        self.request = request
        self.meter = meter
        self.clock = clock
        self.idle_seconds = idle_seconds
        self.deadline = deadline
        self.error_event = error_event
        self.ended = ended
        self.stall_seconds = stall_seconds
        self.first_byte: float | None = None
        self.gone = False
        self._paused_at: float | None = None
        self._timer: IDelayedCall | None = None
        self._aborted: tuple[str, str] | None = None

    def connectionMade(self) -> None:
        self.request.registerProducer(self, True)
        self._arm()

    # -- the client's flow control -----------------------------------------------

    def pauseProducing(self) -> None:
        """
        The client's socket is full: stop reading the upstream; from now
        on the client's stall counts, not the upstream's silence.
        """
        if self.transport is None:
            return
        if self._paused_at is None:
            self._paused_at = self.clock.seconds()
            self._arm()
        self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self.transport is None:
            return
        if self._paused_at is not None:
            self._paused_at = None
            self._arm()
        self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        """
        The client's connection is gone.
        """
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    # -- the one timer -------------------------------------------------------------

    def _arm(self) -> None:
        """
        (Re)arm the one timer for whichever comes first: the total deadline,
        or the idle limit from now (while the client reads) or the stall
        limit from when it stopped (while it does not).
        """
        now = self.clock.seconds()
        end = self.deadline
        if self._paused_at is None:
            limit, since = self.idle_seconds, now
        else:
            limit, since = self.stall_seconds, self._paused_at
        if limit > 0:
            end = since + limit if end is None else min(end, since + limit)
        if end is None:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        delay = max(end - now, 0.0)
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self.clock.callLater(delay, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self.deadline is not None and self.clock.seconds() >= self.deadline:
            self._abort("total_timeout", "Upstream exceeded the total time budget.")
        elif self._paused_at is not None:
            self._drop_client()
        else:
            self._abort("idle_timeout", "Upstream stream was silent for too long.")

    def _drop_client(self) -> None:
        """
        The client read nothing for C{stall_seconds}: cut its connection (it
        would never drain a graceful close). The request then ends as a
        client that left, which is no failure of the upstream's.
        """
        log.info(
            "client read nothing for {seconds}s; dropped",
            seconds=self.stall_seconds,
        )
        channel = getattr(self.request, "channel", None)
        site = getattr(channel, "site", None)
        if site is not None:
            site.dropped("stalled_reading")
        transport = getattr(channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _abort(self, kind: str, message: str) -> None:
        """
        Give up on the upstream mid-body: close it; L{connectionLost} then
        ends the client's response with an error.
        """
        if self._aborted is None:
            self._aborted = (kind, message)
            self.transport.stopProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.first_byte is None:
            self.first_byte = self.clock.seconds()
        if self._paused_at is None:
            self._arm()
        if self.meter is not None:
            data = self.meter.feed(data)
        if data and not self.gone:
            self.request.write(data)

    def client_gone(self) -> None:
        """
        The client left: stop reading the upstream (which closes it).
        """
        self.gone = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        tail = self.meter.finish() if self.meter is not None else b""
        if self.gone:
            self._end(False, None, "client left")
            return
        request = self.request
        request.unregisterProducer()
        if tail:
            request.write(tail)
        if self._aborted is None and reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
            self._end(True, None, "")
            return
        kind, message = self._aborted or ("broken_stream", "Upstream stream ended unexpectedly.")
        if self.error_event is not None:
            status = 504 if kind in ("idle_timeout", "total_timeout") else 502
            # The blank line ends an event the upstream left half-written, so
            # the error event after it parses on its own.
            request.write(b"\n\n" + self.error_event(status, message))
            request.finish()
        else:
            # Headers are gone already: cut the connection so the client sees
            # a truncated body rather than a complete-looking one.
            request.loseConnection()
        self._end(False, kind, describe_failure(reason))

    def _end(self, complete: bool, kind: str | None, detail: str) -> None:
        """
        Tell the attempt how the body ended, then let go of it and of the
        upstream's transport: the attempt holds this relay, so holding it
        back would keep both (and the meter's buffers) alive until the
        garbage collector's next full pass.
        """
        ended, self.ended = self.ended, _ended_already
        ended(complete, kind, detail)
        self.transport = None


def _ended_already(complete: bool, kind: str | None, detail: str) -> None:
    """The body already ended."""
