# -*- test-case-name: llmproxy.test.test_ratelimit -*-
"""
What a rate limit means, independent of where its counters live.

Scopes
======

A request is counted in up to five scopes, checked in this order:
C{global}, C{provider:<name>}, C{model:<model>} (when the model is known),
C{key:<key id>} (when the client sent a credential) and C{user:<user>} (when
the request names a user).  C{limits} apply to every scope; an override for
one provider, model, key id or user replaces them for that scope only.

Windows: a conservative sliding window over fixed slots
=======================================================

Each scope has a minute window and a day window, and in each window a
request counter and a token counter.  A window of length C{W} is cut into
C{N} slots of C{s = W / N} seconds, numbered C{floor(t / s)} from the Unix
epoch (minute: 60 slots of 1 s; day: 24 slots of 1 h).  A reservation made at
time C{t} is added to slot C{k = floor(t / s)}.  At time C{t} the window's
usage is the sum of slots C{k - N} to C{k}: the current, partial slot plus the
C{N} whole slots before it, so a reservation keeps counting for between C{W}
and C{W + s} seconds after it was made.

A request is admitted when, in every scope and window, usage plus the
request's cost is at most the limit.

Worst-case overshoot: none from the window itself.  Any interval of C{W}
seconds, wherever it starts, touches at most C{N + 1} consecutive slots, and
the last admission inside it saw all of those slots when it was checked, so no
interval of length C{W} ever holds more than the limit in admitted
reservations.  Fixed windows allow C{2 x limit} across a boundary; a weighted
two-bucket sliding counter and a token bucket of capacity C{limit} both allow
close to C{2 x limit} within one window length (a full burst, then the refill
or the decaying weight).  The price of the guarantee is an undershoot: a
client sending at exactly its limit sees each reservation held for up to one
extra slot, so its sustained rate is at least C{N / (N + 1)} of the limit
(98.4% per minute, 96% per day).

What can still exceed a limit is knowledge the limiter did not have when it
admitted the request:

  - tokens are reserved from an estimate; L{IRateLimiter.reconcile} later
    adds the difference to the real input + output tokens, which may push a
    window past its limit (the next requests then wait longer);
  - the optimistic first request (L{Estimation.optimistic_first_request}):
    when a window's token usage is 0, its token check is skipped, so one
    request larger than the whole limit can be admitted into an empty window.

Corrections
===========

A reservation remembers the time it was made.  A correction applies to the
slot the reservation went into while that slot still counts (C{k >= now's
slot - N}).  When it no longer counts, a negative correction (the estimate
was too high) and a release are dropped, since the reservation has already
stopped counting; a positive correction (more tokens were used than
estimated) goes into the current slot, because those tokens were really
consumed.  No slot ever goes below 0.

Time
====

Time comes from an injected C{IReactorTime}.  If it steps backwards, the
newest slot a counter has seen stays its current slot, so slots are always
filled in order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from attrs import frozen
from zope.interface import Interface

from llmproxy.config import Limits, RateLimitConfig
from llmproxy.redislink import BackendUnavailable as BackendUnavailable

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


@frozen
class LimitRequest:
    """
    What the limiter needs to know about one request.

    @ivar key_id: a short one-way hash of the client's credential, never the
        credential itself: it becomes part of memory keys and Redis key names.
    @ivar estimated_tokens: the input-token estimate (L{estimate_tokens}).
    """

    provider: str
    model: str | None
    key_id: str | None
    user: str | None
    estimated_tokens: int


@frozen
class Denial:
    """
    Why a request was refused, in the terms of the 429 headers.

    @ivar scope: the first exhausted scope in check order (C{global},
        C{provider:<name>}, C{model:<model>}, C{key:<key id>}, C{user:<user>};
        see docs/rate-limiting.md).
    @ivar metric: C{requests} or C{tokens}.
    @ivar window: C{minute} or C{day}.
    @ivar limit: the limit of that scope, window and metric.
    @ivar remaining: what was left of it before this request (never below 0).
    @ivar retry_after: whole seconds until this request would be admitted if
        nothing else were sent (the latest of all its exhausted limits), or
        C{None} when waiting cannot help because its estimate alone exceeds a
        token limit.
    @ivar reset: whole seconds until this scope's window has freed enough for
        this request; for a request over the limit, until the window is empty.
    @ivar exceeds_limit: the request's estimate alone is over this token limit.
    """

    scope: str
    metric: str
    window: str
    limit: int
    remaining: int
    retry_after: int | None
    reset: int
    exceeds_limit: bool


@frozen
class Reservation:
    """
    What a backend needs to correct or give back an admitted request.

    Callers treat it as opaque and hand it back to the limiter that made it.

    @ivar at: the limiter's clock when the request was admitted.
    @ivar tokens: the tokens reserved (the estimate).
    @ivar entries: the C{(window name, scope)} pairs the request was counted
        in; scopes and windows without limits are not counted anywhere.
    @ivar local: a shared backend decided it without its server (during an
        outage), against counters of this process.
    """

    at: float
    tokens: int
    entries: tuple[tuple[str, str], ...]
    local: bool = False


@frozen
class Decision:
    """
    The limiter's answer to L{IRateLimiter.reserve}.

    @ivar reservation: set when allowed.
    @ivar denial: set when refused.
    @ivar limit: on an allowed answer, the limit of the tightest counted
        scope, window and metric (the one with the smallest fraction left);
        C{None} when nothing limits the request.
    @ivar remaining: what is left of that limit after this request.
    """

    allowed: bool
    reservation: Reservation | None
    denial: Denial | None
    limit: int | None
    remaining: int | None


class IRateLimiter(Interface):
    """
    A rate limiter: check-and-reserve before forwarding, correct afterwards.
    """

    def reserve(request: LimitRequest) -> Deferred[Decision]:  # noqa: N805
        """
        Atomically check every scope, both windows and both metrics, and
        count the request (1 request, its estimated tokens) in all of them,
        or in none.

        @raise BackendUnavailable: (as a failure) when the backend is
            unreachable and C{fail_mode} is C{closed}.
        """

    def reconcile(reservation: Reservation, actual_tokens: int) -> Deferred[None]:  # noqa: N805
        """
        Correct the reserved tokens to the real input + output tokens. Call
        at most once per reservation, and not together with L{release}.
        """

    def release(reservation: Reservation) -> Deferred[None]:  # noqa: N805
        """
        Give back the request and its reserved tokens (the proxy failed
        before the upstream could bill anything).
        """


@frozen
class Window:
    """
    A sliding window of C{slots} slots of C{slot_seconds} seconds each.
    """

    name: str
    slot_seconds: int
    slots: int

    def slot(self, now: float) -> int:
        """
        The number of the slot C{now} falls in.
        """
        return math.floor(now / self.slot_seconds)

    def expires(self, slot: int) -> int:
        """
        When (in seconds since the epoch) a reservation in C{slot} stops
        counting.
        """
        return (slot + self.slots + 1) * self.slot_seconds


MINUTE = Window("minute", slot_seconds=1, slots=60)
DAY = Window("day", slot_seconds=3600, slots=24)
WINDOWS: dict[str, Window] = {MINUTE.name: MINUTE, DAY.name: DAY}


@frozen
class Tracked:
    """
    One scope in one window that has at least one limit.

    @ivar requests: the request limit (0: unlimited).
    @ivar tokens: the token limit (0: unlimited).
    """

    scope: str
    window: Window
    requests: int
    tokens: int


def _window_limits(limits: Limits, window: Window) -> tuple[int, int]:
    if window is MINUTE:
        return limits.requests_per_minute, limits.tokens_per_minute
    return limits.requests_per_day, limits.tokens_per_day


def scopes(config: RateLimitConfig, request: LimitRequest) -> list[tuple[str, Limits]]:
    """
    The scopes a request is counted in, in check order (C{global},
    C{provider}, C{model}, C{key}, C{user}), with their limits.
    """
    overrides = config.overrides
    base = config.limits
    found = [
        ("global", base),
        ("provider:" + request.provider, overrides.per_provider.get(request.provider, base)),
    ]
    if request.model is not None:
        found.append(("model:" + request.model, overrides.per_model.get(request.model, base)))
    if request.key_id is not None:
        found.append(("key:" + request.key_id, overrides.per_key.get(request.key_id, base)))
    if request.user is not None:
        found.append(("user:" + request.user, overrides.per_user.get(request.user, base)))
    return found


def tracked(config: RateLimitConfig, request: LimitRequest) -> list[Tracked]:
    """
    The scope-windows a request must be checked and counted in, in check
    order (scope order, then minute before day).  Unlimited ones are left
    out: they need no counter.
    """
    found = []
    for scope, limits in scopes(config, request):
        for window in (MINUTE, DAY):
            requests, tokens = _window_limits(limits, window)
            if requests or tokens:
                found.append(Tracked(scope, window, requests, tokens))
    return found


class TrackedCache:
    """
    L{tracked}, remembered per (provider, model, key, user) for one
    configuration: building the scope strings and L{Tracked} values was a
    third of a reservation's cost, and their answer only changes with the
    configuration (a reload makes a new cache). Bounded: when
    L{MAX_ENTRIES} combinations are held it starts over.
    """

    MAX_ENTRIES = 4096

    def __init__(self, config: RateLimitConfig) -> None:
        self.config = config
        self._found: dict[tuple[str, str | None, str | None, str | None], list[Tracked]] = {}

    def __call__(self, request: LimitRequest) -> list[Tracked]:
        key = (request.provider, request.model, request.key_id, request.user)
        found = self._found.get(key)
        if found is None:
            if len(self._found) >= self.MAX_ENTRIES:
                self._found.clear()
            found = self._found[key] = tracked(self.config, request)
        return found


def fits(limit: int, used: int, cost: int, *, optimistic: bool = False) -> bool:
    """
    Whether C{cost} more fits under C{limit} (0: unlimited) on top of
    C{used}.  C{optimistic} is the first-request rule for tokens: an empty
    window admits anything.
    """
    if not limit:
        return True
    if optimistic and used == 0:
        return True
    return used + cost <= limit


@frozen
class WindowUsage:
    """
    A snapshot of one tracked scope-window, enough to explain a denial.

    @ivar slots: C{(slot, requests, tokens)} for the slots still counting,
        oldest first.
    """

    tracked: Tracked
    requests: int
    tokens: int
    slots: tuple[tuple[int, int, int], ...]


def _wait(usage: WindowUsage, metric: int, limit: int, need: int, now: float) -> float:
    """
    Seconds until the slots that must expire for C{need} more to fit under
    C{limit} have expired; C{need > limit} waits until the metric is empty
    (0 if it already is).
    """
    used = (usage.requests, usage.tokens)[metric]
    target = limit - need if need <= limit else 0
    if used <= target:
        return 0.0
    for slot, *counts in usage.slots:
        used -= counts[metric]
        if used <= target:
            return max(0.0, usage.tracked.window.expires(slot) - now)
    raise AssertionError("window totals exceed the sum of its slots")


def deny(usages: Sequence[WindowUsage], cost: int, now: float, *, optimistic: bool) -> Denial:
    """
    Explain why a request costing C{cost} tokens does not fit.

    The denial names the first exhausted limit in check order (scope order;
    in a scope: minute requests, minute tokens, day requests, day tokens).
    If any exhausted limit is a token limit the request exceeds on its own,
    the first of those is named instead and C{retry_after} is C{None}:
    waiting for the others would not help.  Otherwise C{retry_after} is the
    longest wait among all exhausted limits, since the request needs all of
    them.

    @raise ValueError: if the request fits everywhere.
    """
    exhausted: list[tuple[WindowUsage, int, int, bool]] = []
    for usage in usages:
        tracked = usage.tracked
        if not fits(tracked.requests, usage.requests, 1):
            exhausted.append((usage, 0, 1, False))
        if not fits(tracked.tokens, usage.tokens, cost, optimistic=optimistic):
            exhausted.append((usage, 1, cost, cost > tracked.tokens))
    if not exhausted:
        raise ValueError("the request fits: nothing to deny")
    over = [entry for entry in exhausted if entry[3]]
    usage, metric, need, too_big = over[0] if over else exhausted[0]
    tracked = usage.tracked
    limit = (tracked.requests, tracked.tokens)[metric]
    used = (usage.requests, usage.tokens)[metric]
    retry_after: int | None = None
    if not over:
        retry_after = math.ceil(
            max(
                _wait(u, m, (u.tracked.requests, u.tracked.tokens)[m], n, now)
                for u, m, n, _ in exhausted
            )
        )
    return Denial(
        scope=tracked.scope,
        metric=("requests", "tokens")[metric],
        window=tracked.window.name,
        limit=limit,
        remaining=max(0, limit - used),
        retry_after=retry_after,
        reset=math.ceil(_wait(usage, metric, limit, need, now)),
        exceeds_limit=too_big,
    )


def tightest(figures: Iterable[tuple[int, int]]) -> tuple[int | None, int | None]:
    """
    The C{(limit, remaining)} with the smallest fraction left among C{(limit,
    used)} pairs; limits of 0 (unlimited) are ignored and ties go to the
    first.  C{(None, None)} when nothing is limited.
    """
    best: tuple[int, int] | None = None
    for limit, used in figures:
        if not limit:
            continue
        remaining = max(0, limit - used)
        if best is None or remaining * best[0] < best[1] * limit:
            best = (limit, remaining)
    if best is None:
        return None, None
    return best
