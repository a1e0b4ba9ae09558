# -*- test-case-name: llmproxy.test.test_group_channel -*-
"""
The connection between the master and one worker: small request/response
frames, in both directions, over a local stream socket.

A frame is a 9-byte header and a body::

    length (4 bytes, big-endian)  call id (4 bytes)  kind (1 byte)  body

The body is one JSON value (orjson: a reservation is about 80 bytes and
takes a few microseconds each way). The kind says what the frame is:

  - L{REPLY} and L{FAILURE} answer the call whose id they carry (a failure's
    body is the error message);
  - any other kind is a request for the handler registered for that kind at
    the receiving end; a call id of 0 asks for no answer (a one-way
    message).

Each end numbers its own calls, so both can call at once. Frames are
handled in the order they arrive, so one worker's requests reach the state
they change in the order it sent them.

Kinds in use: L{GROUP} (who is in the group, snapshots, reloads),
L{RATE_LIMIT} (the memory rate limiter's counters) and L{BUDGETS} (the
memory backend's budget spend). The number after them is kept for circuit
breaker state.
"""

from __future__ import annotations

import struct
import typing
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="llmproxy.group")

HEADER = struct.Struct("!IIB")
"""Body length, call id, kind."""

MAX_BODY = 16 * 1024 * 1024
"""A larger frame is a broken peer: the connection is closed."""

REPLY = 0
FAILURE = 1
GROUP = 2
RATE_LIMIT = 3
BUDGETS = 4
"""Budgets' spend, by scope and period (L{llmproxy.budgets.remote})."""
CIRCUITS = 5
"""Kept for circuit breaker state."""

Handler = Callable[["Channel", Any], Any]
"""
Serves one kind: called with the channel the request came on and the
request's body; returns the answer's body (a JSON value) or a Deferred of
it, or raises (the caller then gets a L{RemoteError}; raise L{RemoteError}
itself to refuse without logging a traceback).
"""


def describe(failure: Failure) -> str:
    """
    A failure in a few words: its message, else its type's name.
    """
    message = failure.getErrorMessage()
    if message:
        return message
    return failure.type.__name__ if failure.type is not None else "unknown error"


class Caller(typing.Protocol):
    """
    What a client of the other end needs (a L{Channel} provides it).
    """

    def call(self, kind: int, body: Any, timeout: float | None = None) -> Deferred[Any]: ...

    def tell(self, kind: int, body: Any) -> None: ...


class ChannelClosed(Exception):  # noqa: N818 - a state, not an error of the caller's
    """
    The connection closed before the answer came (or was already closed).
    """


class RemoteError(Exception):
    """
    The other end's handler failed or refused; the message says why.
    """


class Channel(Protocol):
    """
    One end of a connection.

    @ivar peer: whatever the owner wants to remember about the other end
        (the master keeps the worker's slot here).
    """

    def __init__(
        self,
        handlers: Mapping[int, Handler],
        clock: IReactorTime,
        on_lost: Callable[[Channel], object] | None = None,
    ) -> None:
        self._handlers = handlers
        self._clock = clock
        self._on_lost = on_lost
        self._buffer = bytearray()
        self._pending: dict[int, Deferred[Any]] = {}
        self._last_id = 0
        self._open = False
        self.peer: Any = None

    @property
    def open(self) -> bool:
        return self._open

    def connectionMade(self) -> None:
        self._open = True

    # -- sending --------------------------------------------------------------

    def call(self, kind: int, body: Any, timeout: float | None = None) -> Deferred[Any]:
        """
        Send a request and wait for its answer.

        @return: a Deferred that fires with the answer's body, or fails with
            L{RemoteError}, L{ChannelClosed}, or (after C{timeout} seconds)
            L{twisted.internet.defer.TimeoutError}.
        """
        if not self._open:
            return fail(ChannelClosed())
        call_id = self._last_id = self._last_id % 0xFFFFFFFF + 1

        def forget(answer: Deferred[Any]) -> None:
            self._pending.pop(call_id, None)

        answer: Deferred[Any] = Deferred(forget)
        self._pending[call_id] = answer
        self._send(call_id, kind, body)
        if timeout is not None:
            answer.addTimeout(timeout, self._clock)
        return answer

    def tell(self, kind: int, body: Any) -> None:
        """
        Send a one-way message (nothing is answered). Dropped when closed.
        """
        if self._open:
            self._send(0, kind, body)

    def _send(self, call_id: int, kind: int, body: Any) -> None:
        payload = orjson.dumps(body)
        assert self.transport is not None
        self.transport.write(HEADER.pack(len(payload), call_id, kind) + payload)

    def close(self) -> None:
        if self._open and self.transport is not None:
            self.transport.loseConnection()

    # -- receiving ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        size = HEADER.size
        start = 0
        end = len(buffer)
        while end - start >= size:
            length, call_id, kind = HEADER.unpack_from(buffer, start)
            if length > MAX_BODY:
                del buffer[:]
                self._abort(f"a {length}-byte frame")
                return
            if end - start - size < length:
                break
            body_start = start + size
            payload = bytes(buffer[body_start : body_start + length])
            start = body_start + length
            self._frame(call_id, kind, payload)
            if not self._open:
                break
        del buffer[:start]

    def _frame(self, call_id: int, kind: int, payload: bytes) -> None:
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self._abort("a frame that is not JSON")
            return
        if kind in (REPLY, FAILURE):
            answer = self._pending.pop(call_id, None)
            if answer is None:
                return  # timed out meanwhile
            if kind == REPLY:
                answer.callback(body)
            else:
                answer.errback(RemoteError(str(body)))
            return
        handler = self._handlers.get(kind)
        if handler is None:
            if call_id:
                self._send(call_id, FAILURE, f"nothing here serves kind {kind}")
            return
        try:
            result = handler(self, body)
        except Exception:
            self._answer_failure(Failure(), call_id)
            return
        if not call_id:
            return
        if isinstance(result, Deferred):
            result.addCallbacks(
                self._answer,
                self._answer_failure,
                callbackArgs=(call_id,),
                errbackArgs=(call_id,),
            )
        else:
            self._send(call_id, REPLY, result)

    def _answer(self, result: Any, call_id: int) -> None:
        if self._open:
            self._send(call_id, REPLY, result)

    def _answer_failure(self, failure: Failure, call_id: int) -> None:
        """
        Answer a failed request. A L{RemoteError} is the handler's way to
        refuse; anything else is a bug on this side, logged in full.
        """
        if not failure.check(RemoteError):
            log.failure("serving a request on the group channel", failure)
        if call_id and self._open:
            self._send(call_id, FAILURE, describe(failure))

    def _abort(self, what: str) -> None:
        log.error("closing a group connection that sent {what}", what=what)
        self._open = False
        transport: Any = self.transport
        transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._open = False
        pending, self._pending = self._pending, {}
        for answer in pending.values():
            answer.errback(ChannelClosed())
        if self._on_lost is not None:
            self._on_lost(self)
