# -*- test-case-name: llmproxy.test.test_call -*-
"""
Relaying an upstream response body to the client as it arrives.

The L{Relay} is the body protocol of one upstream response and the push
producer of the client's response: when the client's socket buffer fills,
twisted.web pauses it, which pauses the upstream socket, so the proxy holds
about one chunk per stream. One timer per stream watches both the silence
between chunks and the call's total deadline.

With a L{StreamGate}, nothing is written until the stream's first content
event (or the gate's bounds): then the attempt commits and the held bytes
go out at once. A stream that fails before that may be abandoned for
another attempt, leaving the client's response untouched.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request

from llmproxy.gate import Gate, StreamGate
from llmproxy.providers import Meter

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


class Relay(Protocol):
    """
    Writes the upstream body to the client as it arrives, through the
    response's meter, and ends the client's response the way the body ended.
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
        self.first_byte: float | None = None
        self.gone = False
        self.abandoned = False
        self.written = 0
        self._timer: IDelayedCall | None = None
        self._gate_timer: IDelayedCall | None = None
        self._gate_seconds = gate_seconds
        self._aborted: tuple[str, str] | None = None

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)
        if self.gate is not None:
            self._gate_timer = self.clock.callLater(self._gate_seconds, self._open)
        self._arm()

    def _arm(self) -> None:
        """
        (Re)arm the one timer for whichever comes first: the idle limit from
        now, or the total deadline.
        """
        now = self.clock.seconds()
        end = self.deadline
        if self.idle_seconds > 0:
            idle_end = now + self.idle_seconds
            end = idle_end if end is None else min(end, idle_end)
        if end is None:
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
        else:
            self._abort("idle_timeout", "Upstream stream was silent for too long.")

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
        gate, self.gate = self.gate, None
        if self._gate_timer is not None and self._gate_timer.active():
            self._gate_timer.cancel()
        self._gate_timer = None
        if gate is None or self.abandoned:
            return
        if self.opened is not None:
            self.opened()
        self._write(gate.release())

    def _give_up(self, stop: bool = True) -> bool:
        """
        The stream failed before content: abandon it if the call has
        another attempt to make.

        @param stop: close the upstream (not needed once it is closed).
        """
        if self.failed_early is None or self.gone or not self.failed_early():
            return False
        self.abandoned = True
        self.gate = None
        if self._gate_timer is not None and self._gate_timer.active():
            self._gate_timer.cancel()
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
            self.ended(False, None, "client left")
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
            self.ended(False, "stream_error", reason.getErrorMessage())
            return
        self._write(tail)
        if complete:
            request.finish()
            self.ended(True, None, "")
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
        self.ended(False, kind, reason.getErrorMessage())
