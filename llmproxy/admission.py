# -*- test-case-name: llmproxy.test.test_call -*-
"""
Phase two of a proxied request: admit.

An L{Admission} is one client request's claim on the proxy's limits: it
is made once, before the first upstream attempt (however many attempts
follow), and settled once, by the accounting phase, with what the request
really used. Rate limits are the one limit today; budgets join them here.

The limiter knows nothing of HTTP; this module turns its decision into
the answer a client gets (the status, the message and the headers).
"""

from __future__ import annotations

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.config import Estimation
from llmproxy.inspection import CallFacts
from llmproxy.metrics import Metrics
from llmproxy.ratelimit import (
    BackendUnavailable,
    Decision,
    Denial,
    IRateLimiter,
    LimitRequest,
    Reservation,
    estimate_tokens,
)
from llmproxy.usage import Usage

log = Logger(namespace="llmproxy.admission")

Header = tuple[bytes, bytes]


@frozen
class Admitted:
    """
    The request may go upstream.

    @ivar headers: response headers to send with whatever answer follows
        (C{X-RateLimit-Limit} and C{-Remaining} of the tightest scope).
    """

    headers: tuple[Header, ...] = ()


@frozen
class Refused:
    """
    The request may not go upstream: the proxy answers it itself.

    @ivar status: 429 (over a limit) or 503 (the limiter is unreachable and
        fails closed).
    @ivar message: for the error body, in the provider's format.
    @ivar headers: the headers that explain the refusal.
    """

    status: int
    message: str
    headers: tuple[Header, ...] = ()


class Admission:
    """
    One request's reservation against the limits, from admission to
    settlement.
    """

    __slots__ = ("_backend", "_estimation", "_limiter", "_metrics", "_reservation")

    def __init__(
        self,
        limiter: IRateLimiter | None,
        estimation: Estimation,
        backend: str,
        metrics: Metrics,
    ) -> None:
        """
        @param backend: the limiter's backend name, for its error metric.
        """
        self._limiter = limiter
        self._estimation = estimation
        self._backend = backend
        self._metrics = metrics
        self._reservation: Reservation | None = None

    def admit(self, facts: CallFacts) -> Deferred[Admitted | Refused]:
        """
        Reserve the request's estimated cost in every scope, or refuse it.
        Never fails: a limiter error is an answer too (503 when the
        backend is unreachable and fails closed; admitted otherwise).
        """
        limiter = self._limiter
        if limiter is None:
            return succeed(Admitted())
        estimate = estimate_tokens(
            text_chars=facts.request.prompt_chars,
            body_bytes=facts.body_bytes,
            provider=facts.provider,
            estimation=self._estimation,
        )
        asked = LimitRequest(
            provider=facts.provider,
            model=facts.request.model,
            key_id=facts.key_id,
            user=facts.user,
            estimated_tokens=estimate,
        )
        reserved: Deferred[Decision] = limiter.reserve(asked)
        return reserved.addCallbacks(self._decided, self._failed)

    def _decided(self, decision: Decision) -> Admitted | Refused:
        if decision.allowed:
            self._reservation = decision.reservation
            if decision.limit is None or decision.remaining is None:
                return Admitted()
            return Admitted(
                (
                    (b"X-RateLimit-Limit", b"%d" % decision.limit),
                    (b"X-RateLimit-Remaining", b"%d" % decision.remaining),
                )
            )
        denial = decision.denial
        assert denial is not None
        self._metrics.rate_limited(denial.scope.split(":", 1)[0], denial.metric, denial.window)
        return rate_limited(denial)

    def _failed(self, failure: Failure) -> Admitted | Refused:
        self._metrics.ratelimit_backend_error(self._backend)
        if failure.check(BackendUnavailable):
            return Refused(503, "Rate limiter unavailable; try again shortly.")
        log.failure("rate limiter failed; failing open", failure)
        return Admitted()

    def settle(self, usage: Usage, status: int | None, unsent: bool) -> None:
        """
        Correct the reservation to what the request really used.

        @param status: the status the client got, L{None} if it left first.
        @param unsent: the upstream never received the request: the whole
            reservation is given back.
        """
        limiter, reservation = self._limiter, self._reservation
        if limiter is None or reservation is None:
            return
        self._reservation = None
        if usage.reported:
            done = limiter.reconcile(reservation, usage.total_tokens)
        elif unsent:
            done = limiter.release(reservation)
        elif status is not None and status >= 400:
            # Error answers are not billed by the providers.
            done = limiter.reconcile(reservation, 0)
        else:
            # Unknown usage (cut before any usage arrived): keep the estimate.
            return
        done.addErrback(lambda f: log.failure("rate-limit reconcile failed", f))


def rate_limited(denial: Denial) -> Refused:
    """
    The 429 for a denial: which scope, metric and window ran out, and when
    to retry (or that this request alone exceeds the limit).
    """
    headers = [
        (b"X-RateLimit-Limit", b"%d" % denial.limit),
        (b"X-RateLimit-Remaining", b"%d" % denial.remaining),
        (b"X-RateLimit-Reset", b"%d" % denial.reset),
        (b"X-RateLimit-Scope", denial.scope.encode("utf-8")),
        (b"X-RateLimit-Metric", denial.metric.encode("ascii")),
        (b"X-RateLimit-Window", denial.window.encode("ascii")),
    ]
    if denial.exceeds_limit or denial.retry_after is None:
        headers.append((b"X-RateLimit-Reason", b"request exceeds limit"))
        message = (
            f"Rate limit: this request's estimated {denial.metric} alone exceed the "
            f"{denial.window} limit of {denial.limit} for {denial.scope}."
        )
    else:
        headers.append((b"Retry-After", b"%d" % denial.retry_after))
        message = (
            f"Rate limit exceeded: {denial.metric} per {denial.window} for "
            f"{denial.scope} (limit {denial.limit}). Retry after {denial.retry_after}s."
        )
    return Refused(429, message, tuple(headers))
