# -*- test-case-name: llmproxy.test.test_ratelimit_redis -*-
"""
The Redis rate limiter: the same windows as the in-memory one, with the
counters in Redis so any number of proxy instances share them exactly.

Every call is one Lua script (L{llmproxy.ratelimit.redis_scripts}), so
check-and-reserve over all scopes is atomic however many instances run.
The scripts take C{now} from the caller's clock (C{ARGV}), so tests control
time and the instances' clocks define the slots (NTP-level skew only moves
slot boundaries by the skew; a counter never goes back to an older slot
than the newest it has used).

Key layout
==========

One hash per scope and window, named C{llmproxy:rl:<window>:<scope>}, e.g.
C{llmproxy:rl:minute:key:3f2a9c0d1e5b7a64}.  Scope strings are those of
L{llmproxy.ratelimit.policy}: the key id in C{key:<key id>} is the short hash
the caller computed from the credential, never the credential itself, so no
key name contains a secret.  Fields: C{r} and C{t} (the window's request and
token totals), C{lo} and C{hi} (the oldest and newest slot that may hold
usage), and C{r<slot>} / C{t<slot>} per slot.  Each write sets a
C{PEXPIRE} to just after the newest slot stops counting, so idle scopes
vanish on their own and nothing needs sweeping.  Redis Cluster is not
supported (one script touches several keys).

Batches
=======

The reservations asked in one turn of the event loop go to Redis as one
script call, and so do the corrections (reconcile, release): under load a
call carries dozens, which is most of the saving. A batch holds at most
L{MAX_BATCH}; the script handles them in order, so the decisions are
exactly those of one call each.

Slow answers and outages
========================

A call that has no answer after C{redis.timeout_ms} counts as a failure,
but its requests keep waiting for the answer: only a real outage makes
them be decided without Redis. Before counting, the limiter lets the event
loop read once, so an answer that arrived while this process was busy is
never taken for a timeout. An outage is:

  - every connection of the pool down after one was up (a stopped Redis
    closes its sockets at once), or
  - C{redis.outage_after_failures} failures in a row (timeouts or errors,
    with no answer in between).

During an outage nothing waits on Redis. C{fail_mode: open} decides each
request against local in-memory counters holding C{redis.outage_limit_fraction}
of every limit (bounded, not unlimited; the fraction 1/N keeps a fleet of N
instances within the limit); C{closed} refuses with L{BackendUnavailable}.
Redis is pinged every second; the first answer (to a ping, or a late one
to a call given up on) ends the outage. The state
shows in C{/health} (L{RedisRateLimiter.status}), in the
C{llmproxy_ratelimit_degraded} gauge, and in a warning when it begins and
a line when it ends. A call that failed alone (an error reply) is decided
the same way, without declaring an outage.

Reservations decided locally are corrected locally. Corrections of Redis
reservations that cannot reach Redis are counted and dropped; a
reservation Redis made for a call given up on is given back when its late
answer arrives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

from attrs import evolve
from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from llmproxy.config import Limits, RateLimitConfig, RateLimitOverrides
from llmproxy.ratelimit.memory import MemoryRateLimiter
from llmproxy.ratelimit.policy import (
    BackendUnavailable,
    Decision,
    IRateLimiter,
    LimitRequest,
    Reservation,
    TrackedCache,
)
from llmproxy.ratelimit.redis_scripts import (
    CORRECT,
    KEY_PREFIX,
    RESERVE,
    Ask,
    Correction,
    correct_call,
    key_name,
    reserve_call,
)
from llmproxy.redispool import RedisPool, RedisTarget, parse_redis_url

__all__ = [
    "KEY_PREFIX",
    "RedisRateLimiter",
    "RedisTarget",
    "key_name",
    "parse_redis_url",
]

log = Logger()

WARNING_INTERVAL = 10.0
"""Seconds between two warnings about failing backend calls."""

PROBE_INTERVAL = 1.0
"""Seconds between two pings of Redis during an outage."""

MAX_BATCH = 128
"""Most reservations (or corrections) in one script call."""


class RateLimitMetrics(Protocol):
    """
    What the limiter reports (the proxy's L{llmproxy.metrics.Metrics}).
    """

    def ratelimit_backend_error(self, backend: str) -> None: ...

    def ratelimit_degraded(self, backend: str, degraded: bool) -> None: ...

    def ratelimit_local_decision(self, backend: str) -> None: ...


def local_share(config: RateLimitConfig) -> RateLimitConfig:
    """
    The configuration of the local counters used during an outage: every
    limit times C{redis.outage_limit_fraction}, rounded up (a limit never
    becomes 0, which would mean unlimited).
    """
    fraction = config.redis.outage_limit_fraction
    if fraction >= 1.0:
        return evolve(config, backend="memory")

    def scaled(limits: Limits) -> Limits:
        return Limits(
            *(
                math.ceil(value * fraction) if value else 0
                for value in (
                    limits.requests_per_minute,
                    limits.tokens_per_minute,
                    limits.requests_per_day,
                    limits.tokens_per_day,
                )
            )
        )

    overrides = config.overrides
    return evolve(
        config,
        backend="memory",
        limits=scaled(config.limits),
        overrides=RateLimitOverrides(
            per_provider={k: scaled(v) for k, v in overrides.per_provider.items()},
            per_model={k: scaled(v) for k, v in overrides.per_model.items()},
            per_key={k: scaled(v) for k, v in overrides.per_key.items()},
            per_user={k: scaled(v) for k, v in overrides.per_user.items()},
        ),
    )


class _Watch:
    """
    One script call in flight: its deadline, and what to do with an answer
    that comes after the call was given up.

    @ivar result: fires with the answer, or fails with the call's error or
        with L{BackendUnavailable} once an outage gives it up.
    """

    def __init__(
        self,
        limiter: RedisRateLimiter,
        answer: Deferred[Any],
        late: Any = None,
    ) -> None:
        self._limiter = limiter
        self._late = late
        self.result: Deferred[Any] = Deferred()
        self._timer: IDelayedCall | None = None
        self._grace: IDelayedCall | None = None
        self._arm()
        limiter._watches.add(self)
        answer.addCallbacks(self._answered, self._failed)

    def _arm(self) -> None:
        self._timer = self._limiter._reactor.callLater(self._limiter._timeout(), self._expired)

    def _stop(self) -> None:
        for timer in (self._timer, self._grace):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._grace = None
        self._limiter._watches.discard(self)

    def _answered(self, reply: Any) -> None:
        self._stop()
        self._limiter._answered()
        if not self.result.called:
            self.result.callback(reply)
        elif self._late is not None:
            self._late(reply)

    def _failed(self, failure: Failure) -> None:
        self._stop()
        if not self.result.called:
            self._limiter._call_failed(failure)
        if not self.result.called:
            self.result.errback(failure)

    def _expired(self) -> None:
        # The answer may be waiting, unread, because this process was busy:
        # let the event loop read once before this counts as a failure.
        self._timer = None
        self._grace = self._limiter._reactor.callLater(0, self._overdue)

    def _overdue(self) -> None:
        self._grace = None
        if self.result.called:
            return
        self._limiter._call_failed(Failure(TimeoutError(self._limiter._timeout_text())))
        if not self.result.called:
            self._arm()

    def give_up(self, why: str) -> None:
        """
        An outage began: stop waiting (a late answer still goes to C{late}).
        """
        for timer in (self._timer, self._grace):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._grace = None
        if not self.result.called:
            self.result.errback(Failure(BackendUnavailable(why)))


@implementer(IRateLimiter)
class RedisRateLimiter(Service):
    """
    A rate limiter whose counters live in Redis.

    It is a service: starting it opens the connection pool, stopping it
    closes the pool. Calls made before it starts are decided as during an
    outage.

    @param clock: the time the windows are computed from.
    @param reactor: runs the batches, deadlines and probes.
    @param metrics: told about failed calls the caller does not see
        (C{llmproxy_ratelimit_backend_errors_total}), the outage state and
        each request decided without Redis.
    @param poolsize: connections in the pool.
    """

    def __init__(
        self,
        config: RateLimitConfig,
        clock: IReactorTime,
        reactor: IReactorTime,
        metrics: RateLimitMetrics | None = None,
        *,
        poolsize: int = 4,
    ) -> None:
        self._config = config
        self._tracked = TrackedCache(config)
        self._clock = clock
        self._reactor = reactor
        self._metrics = metrics
        self.target = parse_redis_url(config.redis.url)
        self._pool = RedisPool(self.target, reactor, poolsize)
        self._fallback = MemoryRateLimiter(local_share(config), clock)
        self._asks: list[tuple[Ask, Deferred[Decision], LimitRequest]] = []
        self._corrections: list[tuple[Correction, Deferred[None]]] = []
        self._flush_call: IDelayedCall | None = None
        self._watches: set[_Watch] = set()
        self._failures = 0
        self._degraded_since: float | None = None
        self._probe: LoopingCall | None = None
        self._probing = False
        self._local_decisions = 0
        self._last_warning = -math.inf
        self._suppressed = 0

    def reconfigure(self, config: RateLimitConfig) -> None:
        """
        Use new limits, timeout and fail mode from now on.  The Redis URL
        is read at start only; a new one needs a restart.
        """
        if config.redis.url != self._config.redis.url:
            log.warn("rate-limit Redis URL changed; restart llmproxy to use the new one")
        self._config = config
        self._tracked = TrackedCache(config)
        self._fallback.reconfigure(local_share(config))

    # -- the service ----------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._pool.open()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self._stop_probe()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._flush()
        for watch in list(self._watches):
            watch.give_up("the Redis rate limiter stopped")
        return self._pool.close()

    def status(self) -> dict[str, object]:
        """
        The backend's state for C{/health}.
        """
        since = self._degraded_since
        return {
            "backend": "redis",
            "state": "ok" if since is None else "degraded",
            "degraded_seconds": None if since is None else round(self._clock.seconds() - since, 3),
            "fail_mode": self._config.fail_mode,
            "outage_limit_fraction": self._config.redis.outage_limit_fraction,
            "decided_locally": self._local_decisions,
        }

    # -- reserving ---------------------------------------------------------------------

    def reserve(self, request: LimitRequest) -> Deferred[Decision]:
        now = self._clock.seconds()
        cost = max(0, request.estimated_tokens)
        items = self._tracked(request)
        if not items:
            reservation = Reservation(at=now, tokens=cost, entries=())
            return succeed(Decision(True, reservation, None, None, None))
        if not self._pool.running:
            return self._locally(request, "the Redis rate limiter is not running")
        if self._degraded_since is None and self._pool.lost():
            self._begin_outage("every connection to Redis was lost")
        if self._degraded_since is not None:
            return self._locally(request, "Redis is unreachable")
        optimistic = self._config.estimation.optimistic_first_request
        decided: Deferred[Decision] = Deferred()
        self._asks.append((Ask(tuple(items), now, cost, optimistic), decided, request))
        self._soon()
        return decided

    def _locally(self, request: LimitRequest, why: str) -> Deferred[Decision]:
        """
        Decide without Redis: against the local share of the limits
        (C{fail_mode: open}), or not at all (C{closed}).
        """
        self._local_decisions += 1
        if self._metrics is not None:
            self._metrics.ratelimit_local_decision("redis")
        if self._config.fail_mode == "closed":
            return fail(BackendUnavailable(why))
        decision = self._fallback.reserve_now(request)
        if decision.reservation is not None:
            decision = evolve(decision, reservation=evolve(decision.reservation, local=True))
        return succeed(decision)

    def _soon(self) -> None:
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        """
        Send what this turn asked for: a batch of reservations, one of
        corrections.
        """
        self._flush_call = None
        asks, self._asks = self._asks[:MAX_BATCH], self._asks[MAX_BATCH:]
        corrections = self._corrections[:MAX_BATCH]
        self._corrections = self._corrections[MAX_BATCH:]
        if (self._asks or self._corrections) and self.running:
            self._soon()
        if asks:
            self._send_asks(asks)
        if corrections:
            self._send_corrections(corrections)

    def _send_asks(self, asks: Sequence[tuple[Ask, Deferred[Decision], LimitRequest]]) -> None:
        if self._degraded_since is not None or not self._pool.running:
            for _, decided, request in asks:
                self._locally(request, "Redis is unreachable").chainDeferred(decided)
            return
        keys, args = reserve_call([ask for ask, _, _ in asks])

        def answered(replies: list[Any]) -> None:
            if not isinstance(replies, list) or len(replies) != len(asks):
                replies = [None] * len(asks)
            for (ask, decided, request), reply in zip(asks, replies, strict=True):
                try:
                    decision = ask.decision(reply)
                except Exception:
                    log.failure("unreadable rate-limit reply")
                    self._locally(request, "unreadable reply").chainDeferred(decided)
                else:
                    decided.callback(decision)

        def failed(failure: Failure) -> None:
            closed = self._config.fail_mode == "closed"
            # Closed: the caller sees BackendUnavailable and counts it itself.
            # Given up for an outage: its own warning said so.
            outage = failure.check(BackendUnavailable) is not None
            self._backend_error("reserve", failure, count=not closed, warn=not outage)
            for _, decided, request in asks:
                self._locally(request, self._describe(failure)).chainDeferred(decided)

        def late(replies: list[Any]) -> None:
            # Given up on, then answered: give back what Redis reserved.
            for ask, reply in zip([ask for ask, _, _ in asks], replies, strict=False):
                decision = ask.decision(reply)
                if decision.reservation is not None:
                    self.release(decision.reservation)

        watch = _Watch(self, self._pool.eval(RESERVE, keys, args), late)
        watch.result.addCallbacks(answered, failed)

    # -- correcting -----------------------------------------------------------------------

    def reconcile(self, reservation: Reservation, actual_tokens: int) -> Deferred[None]:
        if reservation.local:
            return self._fallback.reconcile(reservation, actual_tokens)
        delta = max(0, actual_tokens) - reservation.tokens
        if not delta or not reservation.entries:
            return succeed(None)
        return self._correct(Correction("r", self._clock.seconds(), delta, reservation))

    def release(self, reservation: Reservation) -> Deferred[None]:
        if reservation.local:
            return self._fallback.release(reservation)
        if not reservation.entries:
            return succeed(None)
        return self._correct(
            Correction("x", self._clock.seconds(), reservation.tokens, reservation)
        )

    def _correct(self, correction: Correction) -> Deferred[None]:
        if self._degraded_since is not None or not self._pool.running:
            self._backend_error(
                "reconcile", Failure(BackendUnavailable("Redis is unreachable")), warn=False
            )
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._corrections.append((correction, done))
        self._soon()
        return done

    def _send_corrections(self, corrections: Sequence[tuple[Correction, Deferred[None]]]) -> None:
        if self._degraded_since is not None or not self._pool.running:
            for _, done in corrections:
                done.callback(None)
            return
        keys, args = correct_call([correction for correction, _ in corrections])

        def settled(result: object) -> None:
            if isinstance(result, Failure):
                self._backend_error("reconcile", result)
            for _, done in corrections:
                done.callback(None)

        _Watch(self, self._pool.eval(CORRECT, keys, args)).result.addBoth(settled)

    # -- health ------------------------------------------------------------------------------

    def _timeout(self) -> float:
        return self._config.redis.timeout_ms / 1000

    def _timeout_text(self) -> str:
        return f"no answer within {self._config.redis.timeout_ms} ms"

    def _answered(self) -> None:
        """
        Redis answered a call (perhaps one given up on): it is reachable.
        """
        self._failures = 0
        self._pool.connected_once = True
        if self._degraded_since is not None:
            self._end_outage()

    def _call_failed(self, failure: Failure) -> None:
        """
        A call timed out (it still waits) or failed: one more failure in a
        row; enough of them, or a lost connection, is an outage.
        """
        self._failures += 1
        if self._degraded_since is not None:
            return
        if self._failures >= self._config.redis.outage_after_failures:
            self._begin_outage(
                f"{self._failures} calls in a row failed ({self._describe(failure)})"
            )
        elif self._pool.lost():
            self._begin_outage("every connection to Redis was lost")

    def _begin_outage(self, why: str) -> None:
        if not self.running:
            return
        self._degraded_since = self._clock.seconds()
        log.warn(
            "rate-limit Redis unreachable ({why}); deciding requests without it "
            "(fail_mode {mode}, {fraction} of each limit locally) until it answers again",
            why=why,
            mode=self._config.fail_mode,
            fraction=self._config.redis.outage_limit_fraction,
        )
        if self._metrics is not None:
            self._metrics.ratelimit_degraded("redis", True)
        self._probe = LoopingCall(self._ping)
        self._probe.clock = self._reactor
        self._probe.start(PROBE_INTERVAL, now=False)
        # Last: the requests decided now may run anything, stopping this
        # service included.
        for watch in list(self._watches):
            watch.give_up(why)

    def _ping(self) -> None:
        self._fallback.sweep()
        if self._probing or not self._pool.running:
            return
        self._probing = True
        pinged = self._pool.ping()
        pinged.addTimeout(max(self._timeout(), PROBE_INTERVAL), self._reactor)

        def answered(_: object) -> None:
            self._probing = False
            self._end_outage()

        def failed(_: Failure) -> None:
            self._probing = False

        pinged.addCallbacks(answered, failed)

    def _end_outage(self) -> None:
        since = self._degraded_since
        if since is None:
            return
        self._degraded_since = None
        self._failures = 0
        self._stop_probe()
        log.info(
            "rate-limit Redis answers again after {seconds}s of outage; "
            "{local} requests were decided without it so far",
            seconds=round(self._clock.seconds() - since, 1),
            local=self._local_decisions,
        )
        if self._metrics is not None:
            self._metrics.ratelimit_degraded("redis", False)

    def _stop_probe(self) -> None:
        if self._probe is not None and self._probe.running:
            self._probe.stop()
        self._probe = None

    def _describe(self, failure: Failure) -> str:
        if failure.check(TimeoutError):
            return self._timeout_text()
        return failure.getErrorMessage() or repr(failure.value)

    def _backend_error(
        self, operation: str, failure: Failure, *, count: bool = True, warn: bool = True
    ) -> None:
        if count and self._metrics is not None:
            try:
                self._metrics.ratelimit_backend_error("redis")
            except Exception:
                log.failure("rate-limit metrics hook failed")
        now = self._reactor.seconds()
        if not warn or now - self._last_warning < WARNING_INTERVAL:
            self._suppressed += 1
            return
        log.warn(
            "rate-limit backend {operation} failed ({error}); deciding without Redis "
            "({suppressed} more failures since the last warning)",
            operation=operation,
            error=self._describe(failure),
            suppressed=self._suppressed,
        )
        self._last_warning = now
        self._suppressed = 0
