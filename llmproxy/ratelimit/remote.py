# -*- test-case-name: llmproxy.test.test_ratelimit_remote -*-
"""
The memory backend shared by the workers of one master: the counters live
once, in the master's L{MemoryRateLimiter}; each worker's limiter
(L{RemoteRateLimiter}) asks it over the worker's channel
(L{llmproxy.group.channel}, kind C{RATE_LIMIT}).

The master handles one request at a time, so a reservation is as atomic
across workers as it is inside one process: 300 concurrent requests
against C{requests_per_minute: 100}, spread over any number of workers,
admit exactly 100. The master's clock and configuration decide: slot
times come from it, and so do the limits (it reloads them on SIGHUP
before the workers do).

Requests, as compact JSON arrays (a reservation travels whole, so the master
keeps nothing per request and a worker that dies leaks nothing):

  - C{["r", provider, model, key_id, user, estimated_tokens]}, answered
    C{[1, limit, remaining, at, tokens, entries]} when admitted, or
    C{[0, scope, metric, window, limit, remaining, retry_after, reset,
    exceeds_limit]} when refused;
  - C{["c", at, tokens, entries, actual_tokens]} (reconcile) and
    C{["x", at, tokens, entries]} (release), one-way: frames are handled in
    order, so the worker's next reservation already sees them.

When the master cannot answer in time (it is gone, or wedged), C{fail_mode}
decides as it does for Redis: C{open} admits without a reservation,
C{closed} refuses with L{BackendUnavailable} (503).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from llmproxy.config import RateLimitConfig
from llmproxy.group.channel import RATE_LIMIT, Caller, RemoteError
from llmproxy.group.client import CALL_TIMEOUT, MasterClient
from llmproxy.ratelimit.memory import MemoryRateLimiter
from llmproxy.ratelimit.policy import (
    BackendUnavailable,
    Decision,
    Denial,
    IRateLimiter,
    LimitRequest,
    Reservation,
)


def _entries(flat: list[list[str]]) -> tuple[tuple[str, str], ...]:
    return tuple((window, scope) for window, scope in flat)


def encode_decision(decision: Decision) -> list[Any]:
    """
    A decision as the master sends it.
    """
    denial = decision.denial
    if denial is not None:
        return [
            0,
            denial.scope,
            denial.metric,
            denial.window,
            denial.limit,
            denial.remaining,
            denial.retry_after,
            denial.reset,
            denial.exceeds_limit,
        ]
    reservation = decision.reservation
    assert reservation is not None
    return [
        1,
        decision.limit,
        decision.remaining,
        reservation.at,
        reservation.tokens,
        reservation.entries,
    ]


def decode_decision(body: list[Any]) -> Decision:
    """
    The decision the master sent.
    """
    if body[0]:
        _, limit, remaining, at, tokens, entries = body
        reservation = Reservation(at=at, tokens=tokens, entries=_entries(entries))
        return Decision(
            allowed=True, reservation=reservation, denial=None, limit=limit, remaining=remaining
        )
    _, scope, metric, window, limit, remaining, retry_after, reset, exceeds = body
    denial = Denial(
        scope=scope,
        metric=metric,
        window=window,
        limit=limit,
        remaining=remaining,
        retry_after=retry_after,
        reset=reset,
        exceeds_limit=exceeds,
    )
    return Decision(allowed=False, reservation=None, denial=denial, limit=None, remaining=None)


def serve_limiter(limiter: Callable[[], MemoryRateLimiter | None]) -> Callable[[Any, Any], Any]:
    """
    The master's handler for C{RATE_LIMIT} requests, over the limiter
    C{limiter()} returns at the time (a reload may replace it; C{None} when
    the configuration has no memory rate limiting).
    """

    def handle(channel: Any, body: list[Any]) -> Any:
        current = limiter()
        if current is None:
            raise RemoteError("no memory rate limiter in the master")
        op = body[0]
        if op == "r":
            _, provider, model, key_id, user, tokens = body
            request = LimitRequest(provider, model, key_id, user, tokens)
            return encode_decision(current.reserve_now(request))
        reservation = Reservation(at=body[1], tokens=body[2], entries=_entries(body[3]))
        if op == "c":
            current.reconcile(reservation, body[4])
        elif op == "x":
            current.release(reservation)
        else:
            raise RemoteError(f"unknown rate-limit request {op!r}")
        return None

    return handle


@implementer(IRateLimiter)
class RemoteRateLimiter(MasterClient):
    """
    A worker's limiter: every decision is the master's (the limits
    themselves are the master's too; L{reconfigure} takes the new
    C{fail_mode}).
    """

    def reserve(self, request: LimitRequest) -> Deferred[Decision]:
        body = [
            "r",
            request.provider,
            request.model,
            request.key_id,
            request.user,
            request.estimated_tokens,
        ]
        asked = self._master.call(RATE_LIMIT, body, CALL_TIMEOUT)
        return asked.addCallbacks(decode_decision, self._unanswered)

    def _unanswered(self, failure: Failure) -> Decision | Failure:
        self.unanswered("a rate-limit reservation", failure)
        if self.failing_closed:
            return Failure(BackendUnavailable("the master did not answer"))
        return Decision(allowed=True, reservation=None, denial=None, limit=None, remaining=None)

    def reconcile(self, reservation: Reservation, actual_tokens: int) -> Deferred[None]:
        self._master.tell(
            RATE_LIMIT,
            ["c", reservation.at, reservation.tokens, reservation.entries, actual_tokens],
        )
        return succeed(None)

    def release(self, reservation: Reservation) -> Deferred[None]:
        self._master.tell(
            RATE_LIMIT, ["x", reservation.at, reservation.tokens, reservation.entries]
        )
        return succeed(None)


def remote_limiter_factory(
    master: Caller, clock: IReactorTime, on_error: Callable[[], object] | None = None
) -> Callable[[RateLimitConfig], IRateLimiter]:
    """
    What a worker builds when its configuration asks for the memory backend.
    """

    def build(config: RateLimitConfig) -> IRateLimiter:
        return RemoteRateLimiter(config, master, clock, on_error)

    return build
