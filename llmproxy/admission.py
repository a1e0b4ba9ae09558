# -*- test-case-name: llmproxy.test.test_call -*-
"""
Phase two of a proxied request: admit.

An L{Admission} is one client request's claim on the proxy: it is made
once, before the first upstream attempt (however many attempts follow),
and settled once, by the accounting phase, with what the request really
used. In order:

  1. the key: a proxy key is recognised (L{llmproxy.auth.Keyring}) and
     swapped for the provider's credential, or the request is refused
     (401, 403);
  2. the budgets: the request's worst-case cost is planned, and a model
     that cannot be priced under a budget is refused (403);
  3. the rate limits reserve the estimated tokens (429 when they do not
     fit);
  4. the budgets reserve the worst-case cost (402 when it does not fit,
     and the rate-limit reservation is given back).

The limiter, the keyring and the budgets know nothing of HTTP; this module
turns their decisions into the answer a client gets (the status, the
message and the headers).
"""

from __future__ import annotations

import math

from attrs import evolve, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.auth import KeyRefusal, Keyring
from llmproxy.budgets import (
    BudgetBook,
    BudgetReservation,
    Plan,
    Shortfall,
    SpendDecision,
    Unpriced,
    nanos_to_usd,
    period_end,
)
from llmproxy.config import Estimation, ProxyKey
from llmproxy.credentials import without_query_key
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
    @ivar facts: the request's facts as admitted: with a proxy key, its key
        id and user, and the credential swap.
    """

    headers: tuple[Header, ...] = ()
    facts: CallFacts | None = None


@frozen
class Refused:
    """
    The request may not go upstream: the proxy answers it itself.

    @ivar status: 401 (no valid key), 402 (over a budget), 403 (the key may
        not do this), 429 (over a limit) or 503 (a shared backend is
        unreachable and fails closed).
    @ivar message: for the error body, in the provider's format.
    @ivar headers: the headers that explain the refusal.
    """

    status: int
    message: str
    headers: tuple[Header, ...] = ()


class Admission:
    """
    One request's claims (its key, its rate-limit and budget reservations),
    from admission to settlement.
    """

    __slots__ = (
        "_backend",
        "_budgets",
        "_clock",
        "_estimation",
        "_facts",
        "_keyring",
        "_limiter",
        "_metrics",
        "_plan",
        "_reservation",
        "_spend",
    )

    def __init__(
        self,
        limiter: IRateLimiter | None,
        estimation: Estimation,
        backend: str,
        metrics: Metrics,
        *,
        keyring: Keyring | None = None,
        budgets: BudgetBook | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param backend: the limiter's backend name, for its error metric.
        @param keyring: the proxy keys, when C{auth.mode} uses them.
        @param budgets: the budgets, when spend is counted.
        @param clock: for key expiry and budget periods (needed with
            either).
        """
        self._limiter = limiter
        self._estimation = estimation
        self._backend = backend
        self._metrics = metrics
        self._keyring = keyring
        self._budgets = budgets
        self._clock = clock
        self._reservation: Reservation | None = None
        self._facts: CallFacts | None = None
        self._plan: Plan | None = None
        self._spend: BudgetReservation | None = None

    def _now(self) -> float:
        assert self._clock is not None, "keys and budgets need a clock"
        return self._clock.seconds()

    def admit(self, facts: CallFacts) -> Deferred[Admitted | Refused]:
        """
        Check the key, then reserve the request's estimated tokens in every
        rate-limit scope and its worst-case cost in every budget, or refuse
        it. Never fails: a backend error is an answer too (503 when it is
        unreachable and fails closed; admitted otherwise).
        """
        key = None
        keyring = self._keyring
        if keyring is not None and keyring.active:
            found = keyring.recognise(
                facts.presented, facts.provider, facts.request.model, self._now()
            )
            if isinstance(found, KeyRefusal):
                self._metrics.auth_failure(found.reason)
                return succeed(Refused(found.status, found.message))
            if found is not None:
                key = found
                facts = swapped(facts, key, keyring)
        self._facts = facts
        if self._budgets is None and self._limiter is None:
            return succeed(Admitted(facts=facts))
        estimate = estimate_tokens(
            text_chars=facts.request.prompt_chars,
            body_bytes=facts.body_bytes,
            provider=facts.provider,
            estimation=self._estimation,
        )
        if self._budgets is not None:
            planned = self._budgets.plan(facts.provider, facts.request, key, facts.user, estimate)
            if isinstance(planned, Unpriced):
                self._metrics.auth_failure("unpriced_model")
                return succeed(unpriced(planned))
            if planned.holds:
                self._plan = planned
        limiter = self._limiter
        if limiter is None:
            limited: Deferred[Admitted | Refused] = succeed(Admitted(facts=facts))
        else:
            asked = LimitRequest(
                provider=facts.provider,
                model=facts.request.model,
                key_id=facts.key_id,
                user=facts.user,
                estimated_tokens=estimate,
            )
            reserved: Deferred[Decision] = limiter.reserve(asked)
            limited = reserved.addCallbacks(self._decided, self._failed)
        if self._plan is None:
            return limited
        return limited.addCallback(self._reserve_budget)

    def _decided(self, decision: Decision) -> Admitted | Refused:
        if decision.allowed:
            self._reservation = decision.reservation
            if decision.limit is None or decision.remaining is None:
                return Admitted(facts=self._facts)
            return Admitted(
                (
                    (b"X-RateLimit-Limit", b"%d" % decision.limit),
                    (b"X-RateLimit-Remaining", b"%d" % decision.remaining),
                ),
                self._facts,
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
        return Admitted(facts=self._facts)

    # -- budgets ----------------------------------------------------------------

    def _reserve_budget(self, verdict: Admitted | Refused) -> Deferred[Admitted | Refused]:
        budgets, plan = self._budgets, self._plan
        assert budgets is not None and plan is not None
        if isinstance(verdict, Refused):
            self._plan = None
            return succeed(verdict)
        now = self._now()

        def decided(decision: SpendDecision) -> Admitted | Refused:
            shortfall = decision.shortfall
            if shortfall is None:
                self._spend = decision.reservation
                return verdict
            self._plan = None
            self._give_back_tokens()
            budgets.refused(plan, shortfall)
            return out_of_budget(shortfall, now)

        def failed(failure: Failure) -> Admitted | Refused:
            self._metrics.ratelimit_backend_error(self._backend)
            if failure.check(BackendUnavailable):
                self._plan = None
                self._give_back_tokens()
                return Refused(503, "Budget store unavailable; try again shortly.")
            log.failure("budget store failed; failing open", failure)
            return verdict

        reserved: Deferred[Admitted | Refused] = budgets.reserve(plan, now).addCallbacks(
            decided, failed
        )
        return reserved

    def _give_back_tokens(self) -> None:
        """
        Release the rate-limit reservation of a request the budgets refused.
        """
        limiter, reservation = self._limiter, self._reservation
        self._reservation = None
        if limiter is not None and reservation is not None:
            limiter.release(reservation).addErrback(
                lambda f: log.failure("rate-limit release failed", f)
            )

    # -- settlement ------------------------------------------------------------

    def settle(
        self, usage: Usage, status: int | None, unsent: bool, cost: float | None = None
    ) -> None:
        """
        Correct the reservations to what the request really used.

        @param status: the status the client got, L{None} if it left first.
        @param unsent: the upstream never received the request: the whole
            reservation is given back.
        @param cost: what the request cost in USD (its cost record's
            C{total_cost}), L{None} when unknown.
        """
        self._settle_budget(usage, status, unsent, cost)
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

    def _settle_budget(
        self, usage: Usage, status: int | None, unsent: bool, cost: float | None
    ) -> None:
        budgets, plan, spend = self._budgets, self._plan, self._spend
        if budgets is None or plan is None or spend is None:
            return
        self._spend = None
        charged: float | None
        if usage.reported:
            # Unknown for a model without a price: the worst case stays.
            charged = cost
        elif unsent or (status is not None and status >= 400):
            charged = 0.0
        else:
            # Cut before any usage arrived: the upstream may bill it all.
            charged = None
        budgets.settle(plan, spend, charged, self._now())


def swapped(facts: CallFacts, key: ProxyKey, keyring: Keyring) -> CallFacts:
    """
    The facts of a request admitted with proxy key C{key}: its key id and
    (when nothing else names one) user are the key's, and its credential
    is swapped for the provider's on the way out (C{?key=} goes now).
    """
    return evolve(
        facts,
        key_id=key.id,
        user=facts.user or key.user,
        query=without_query_key(facts.query),
        credential_swap=keyring.swap,
    )


def unpriced(refusal: Unpriced) -> Refused:
    return Refused(
        403,
        f"Model {refusal.model!r} has no price, and the budget of {refusal.scope} only "
        "admits models it can count.",
    )


def _usd(nanos: int) -> bytes:
    return b"%.6f" % nanos_to_usd(nanos)


def out_of_budget(shortfall: Shortfall, now: float) -> Refused:
    """
    The 402 for a request whose worst case does not fit a budget: which
    scope and period, its cap, what is left of it and when it resets.
    """
    hold = shortfall.hold
    limit = hold.limit or 0
    reset = max(0, math.ceil(period_end(hold.period, now) - now))
    headers = (
        (b"X-LLM-Proxy-Budget-Scope", hold.scope.encode("utf-8")),
        (b"X-LLM-Proxy-Budget-Period", hold.period.encode("ascii")),
        (b"X-LLM-Proxy-Budget-Limit-USD", _usd(limit)),
        (b"X-LLM-Proxy-Budget-Remaining-USD", _usd(shortfall.remaining)),
        (b"X-LLM-Proxy-Budget-Reset", b"%d" % reset),
    )
    message = (
        f"Budget exceeded: {hold.scope} has {nanos_to_usd(shortfall.remaining):.6f} of its "
        f"{hold.period} budget of {nanos_to_usd(limit):.6f} USD left, and this request may "
        f"cost up to {nanos_to_usd(hold.amount):.6f} USD. It resets in {reset}s."
    )
    return Refused(402, message, headers)


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
