# -*- test-case-name: llmproxy.test.test_call -*-
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

With a L{StreamGate}, nothing is written until the stream's first content
event (or the gate's bounds): then the attempt commits and the held bytes
go out at once. A stream that fails before that may be abandoned for
another attempt, leaving the client's response untouched.
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

from llmproxy.gate import Gate, StreamGate
from llmproxy.logs import describe_failure
from llmproxy.providers import Meter

log = Logger(namespace="llmproxy.relay")

ErrorEvent = Callable[[int, str], bytes | None]
"""
A provider's L{stream_error<llmproxy.providers.ProviderFormat.stream_error>}:
status and message to the bytes that end a failed stream, or L{None} when
the connection must be cut instead.
"""

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
        gate: StreamGate | None = None,
        gate_seconds: float = 0.0,
        opened: Callable[[], None] | None = None,
        failed_early: Callable[[], bool] | None = None,
        stall_seconds: float = 0.0,
    ) -> None:
        """
        @param meter: reads usage from the body (and may remove an event);
            L{None} for a body that is not metered.
        @param idle_seconds: the longest silence allowed between chunks (0: none).
        @param deadline: when the call's total time budget ends (clock
            seconds), or L{None}.
        @param error_event: for a streamed response, how to tell the client's
            SDK that the stream failed; L{None} for other bodies, whose
            connection is cut instead.
        @param gate: holds the stream back until its first content event;
            L{None} relays at once (the response is already committed).
        @param gate_seconds: the longest the gate holds.
        @param opened: commit the response, when the gate opens.
        @param failed_early: the stream failed before content: C{True} if
            the call gives it up for another attempt.
        @param stall_seconds: the longest the client may leave the response
            unread (0: no limit).

        @ivar abandoned: the stream was given up before anything was written.
        @ivar written: body bytes written to the client.
        """
        self.request = request
        self.meter = meter
        self.clock = clock
        self.idle_seconds = idle_seconds
        self.deadline = deadline
        self.error_event = error_event
        self.ended = ended
        self.gate = gate
        self.opened = opened
        self.failed_early = failed_early
        self.stall_seconds = stall_seconds
        self._paused_at: float | None = None
        self.first_byte: float | None = None
        self.gone = False
        self.abandoned = False
        self.written = 0
        self._timer: IDelayedCall | None = None
        self._gate_timer: IDelayedCall | None = None
        self._gate_seconds = gate_seconds
        self._aborted: tuple[str, str] | None = None

    def connectionMade(self) -> None:
        self.request.registerProducer(self, True)
        if self.gate is not None:
            self._gate_timer = self.clock.callLater(self._gate_seconds, self._open)
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
        if self.gate is not None:
            state = self.gate.feed(data)
            if state is Gate.OPEN:
                self._open()
            elif state is Gate.FAILED:
                if self._give_up():
                    return
                self._open()
            return
        self._write(data)

    def _write(self, data: bytes) -> None:
        if data and not self.gone:
            self.written += len(data)
            self.request.write(data)

    def _open(self) -> None:
        """
        Content began (or the gate's bounds were reached): commit and let
        everything held go.
        """
        gate = self._close_gate()
        if gate is None or self.abandoned:
            return
        if self.opened is not None:
            self.opened()
        self._write(gate.release())

    def _close_gate(self) -> StreamGate | None:
        """
        Stop holding: cancel the gate's timer and hand back the gate (what it
        held), or L{None} if it was open already.
        """
        gate, self.gate = self.gate, None
        if self._gate_timer is not None and self._gate_timer.active():
            self._gate_timer.cancel()
        self._gate_timer = None
        return gate

    def _give_up(self, stop: bool = True) -> bool:
        """
        The stream failed before content: abandon it if the call has
        another attempt to make.

        @param stop: close the upstream (not needed once it is closed).
        """
        if self.failed_early is None or self.gone or not self.failed_early():
            return False
        self.abandoned = True
        self._close_gate()
        if stop:
            self.transport.stopProducing()  # type: ignore[union-attr]
        return True

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
        complete = self._aborted is None and bool(reason.check(ResponseDone, PotentialDataLoss))
        if self.gone:
            self._close_gate()
            self._end(False, None, "client left")
            return
        if self.gate is not None:
            if tail:
                self.gate.feed(tail)
                tail = b""
            if complete or not self._give_up(stop=False):
                # Ended without content (an empty answer), or failed with
                # no other attempt to make: the client gets it as it was.
                self._open()
        request = self.request
        request.unregisterProducer()
        if self.abandoned:
            self._end(False, "stream_error", describe_failure(reason))
            return
        self._write(tail)
        if complete:
            request.finish()
            self._end(True, None, "")
            return
        kind, message = self._aborted or ("broken_stream", "Upstream stream ended unexpectedly.")
        status = 504 if kind in ("idle_timeout", "total_timeout") else 502
        ending = self.error_event(status, message) if self.error_event is not None else None
        if ending is not None:
            request.write(ending)
            request.finish()
        else:
            # Headers are gone already: cut the connection so the client sees
            # a truncated body rather than a complete-looking one.
            request.loseConnection()
        self._end(False, kind, describe_failure(reason))

    def _end(self, complete: bool, kind: str | None, detail: str) -> None:
        """
        Tell the attempt how the body ended, then let go of it (and its
        other callbacks) and of the upstream's transport: the attempt holds
        this relay, so holding them back would keep both (and the meter's buffers) alive until the
        garbage collector's next full pass.
        """
        ended, self.ended = self.ended, _ended_already
        self.opened = self.failed_early = None
        self._close_gate()
        ended(complete, kind, detail)
        self.transport = None


def _ended_already(complete: bool, kind: str | None, detail: str) -> None:
    """The body already ended."""
