# -*- test-case-name: llmproxy.test.test_ratelimit -*-
"""
The in-memory rate limiter: one process, counters in dicts.

The window arithmetic is described in L{llmproxy.ratelimit.policy}.  Each
scope-window with a limit gets a L{_Counter} holding only the slots that
still count; a scope nobody has used for a whole window is removed by
L{MemoryRateLimiter.sweep}, which L{sweeper_service} runs on a timer, so
memory is bounded by the scopes active in the last day (or minute, when
only per-minute limits are set).

Clients choose the names of three kinds of scope (users, keys, models), so
the number of counters is also capped (C{max_tracked_scopes}): once that
many are held, a request whose user, key or model has no counter yet is
counted in one shared counter of that kind, C{user:(overflow)} and so on,
with its own scope's limits. Nobody escapes a limit that way (the shared
counter is only stricter); the newcomers share their allowance until a
sweep frees room; scopes already counted are not affected.

Everything here runs in the reactor thread and completes synchronously: the
Deferreds it returns have already fired.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from attrs import evolve
from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from llmproxy.config import RateLimitConfig
from llmproxy.ratelimit.policy import (
    WINDOWS,
    Decision,
    IRateLimiter,
    LimitRequest,
    Reservation,
    Tracked,
    TrackedCache,
    WindowUsage,
    deny,
    fits,
    tightest,
)

log = Logger()

OVERFLOW = "(overflow)"
"""The name shared by new scopes of one kind once the counters are full."""

CLIENT_NAMED = ("user:", "key:", "model:")
"""Scope kinds whose names the clients choose."""


class _Counter:
    """
    Usage of one scope in one window.

    @ivar slots: C{[slot, requests, tokens]} for each slot that still counts,
        oldest first; slot numbers only grow.
    @ivar requests: the sum of the slots' requests.
    @ivar tokens: the sum of the slots' tokens.
    """

    __slots__ = ("requests", "slots", "tokens")

    def __init__(self) -> None:
        self.requests = 0
        self.tokens = 0
        self.slots: list[list[int]] = []

    def current(self, slot: int, count: int) -> int:
        """
        Forget the slots that no longer count at C{slot} and return the slot
        new usage goes into: C{slot}, or the newest one already used if the
        clock stepped back.

        @param count: the window's number of whole slots (C{N}).
        """
        slots = self.slots
        if slots and slots[-1][0] > slot:
            slot = slots[-1][0]
        first = slot - count
        expired = 0
        for entry in slots:
            if entry[0] >= first:
                break
            self.requests -= entry[1]
            self.tokens -= entry[2]
            expired += 1
        if expired:
            del slots[:expired]
        return slot

    def add(self, slot: int, requests: int, tokens: int) -> None:
        """
        Count usage in C{slot}, which is the value L{current} returned.
        """
        slots = self.slots
        if slots and slots[-1][0] == slot:
            entry = slots[-1]
            entry[1] += requests
            entry[2] += tokens
        else:
            slots.append([slot, requests, tokens])
        self.requests += requests
        self.tokens += tokens

    def find(self, slot: int) -> list[int] | None:
        """
        The C{[slot, requests, tokens]} entry of C{slot} if it still counts.
        """
        for entry in reversed(self.slots):
            if entry[0] == slot:
                return entry
            if entry[0] < slot:
                break
        return None

    def idle(self, slot: int, count: int) -> bool:
        """
        Whether nothing in this counter counts any more at C{slot}.
        """
        return not self.slots or self.slots[-1][0] < slot - count

    def usage(self, item: Tracked) -> WindowUsage:
        return WindowUsage(
            tracked=item,
            requests=self.requests,
            tokens=self.tokens,
            slots=tuple((entry[0], entry[1], entry[2]) for entry in self.slots),
        )


@implementer(IRateLimiter)
class MemoryRateLimiter:
    """
    A rate limiter whose counters live in this process.

    @ivar _counters: window name -> scope string -> counter.
    """

    def __init__(
        self,
        config: RateLimitConfig,
        clock: IReactorTime,
        overflowed: Callable[[], object] | None = None,
    ) -> None:
        """
        @param overflowed: called for each request counted in an overflow
            counter (for C{llmproxy_ratelimit_scope_overflow_total}).
        """
        self._config = config
        self._tracked = TrackedCache(config)
        self._clock = clock
        self._overflowed = overflowed
        self._counters: dict[str, dict[str, _Counter]] = {name: {} for name in WINDOWS}

    def reconfigure(self, config: RateLimitConfig) -> None:
        """
        Use new limits from now on, keeping the usage counted so far (a
        configuration reload must not hand everyone a fresh window).
        """
        self._config = config
        self._tracked = TrackedCache(config)

    def __len__(self) -> int:
        """
        The number of scope-windows holding counters.
        """
        return sum(len(table) for table in self._counters.values())

    def scopes(self) -> Iterator[tuple[str, str]]:
        """
        The C{(window name, scope)} pairs holding counters.
        """
        for name, table in self._counters.items():
            for scope in table:
                yield name, scope

    def reserve(self, request: LimitRequest) -> Deferred[Decision]:
        return succeed(self.reserve_now(request))

    def reserve_now(self, request: LimitRequest) -> Decision:
        """
        L{reserve}, without the Deferred.
        """
        now = self._clock.seconds()
        cost = max(0, request.estimated_tokens)
        optimistic = self._config.estimation.optimistic_first_request
        found: list[tuple[Tracked, _Counter, int, bool]] = []
        admit = True
        counters = self._counters
        overflow = False
        for item in self._tracked(request):
            window = item.window
            slot = window.slot(now)
            counter = counters[window.name].get(item.scope)
            if (
                counter is None
                and item.scope.startswith(CLIENT_NAMED)
                and len(self) >= self._config.max_tracked_scopes
            ):
                overflow = True
                item = evolve(item, scope=item.scope.split(":", 1)[0] + ":" + OVERFLOW)
                counter = counters[window.name].get(item.scope)
            new = counter is None
            if counter is None:
                counter = _Counter()
            else:
                slot = counter.current(slot, window.slots)
            if admit and not (
                fits(item.requests, counter.requests, 1)
                and fits(item.tokens, counter.tokens, cost, optimistic=optimistic)
            ):
                admit = False
            found.append((item, counter, slot, new))
        if overflow and self._overflowed is not None:
            self._overflowed()
        if not admit:
            usages = [counter.usage(item) for item, counter, _, _ in found]
            denial = deny(usages, cost, now, optimistic=optimistic)
            return Decision(
                allowed=False, reservation=None, denial=denial, limit=None, remaining=None
            )
        figures: list[tuple[int, int]] = []
        for item, counter, slot, new in found:
            if new:
                self._counters[item.window.name][item.scope] = counter
            counter.add(slot, 1, cost)
            figures.append((item.requests, counter.requests))
            figures.append((item.tokens, counter.tokens))
        limit, remaining = tightest(figures)
        reservation = Reservation(
            at=now,
            tokens=cost,
            entries=tuple((item.window.name, item.scope) for item, _, _, _ in found),
        )
        return Decision(
            allowed=True, reservation=reservation, denial=None, limit=limit, remaining=remaining
        )

    def _entries(
        self, reservation: Reservation, create: bool
    ) -> Iterator[tuple[_Counter, int, list[int] | None]]:
        """
        For each scope-window of C{reservation}: its counter, the current
        slot, and the reservation's slot entry if it still counts.  Missing
        counters are created if C{create}, else skipped.
        """
        now = self._clock.seconds()
        for name, scope in reservation.entries:
            window = WINDOWS[name]
            table = self._counters[name]
            slot = window.slot(now)
            counter = table.get(scope)
            if counter is None:
                if not create:
                    continue
                counter = table[scope] = _Counter()
            else:
                slot = counter.current(slot, window.slots)
            yield counter, slot, counter.find(window.slot(reservation.at))

    def reconcile(self, reservation: Reservation, actual_tokens: int) -> Deferred[None]:
        delta = max(0, actual_tokens) - reservation.tokens
        if delta > 0:
            for counter, slot, entry in self._entries(reservation, create=True):
                if entry is None:
                    counter.add(slot, 0, delta)
                else:
                    entry[2] += delta
                    counter.tokens += delta
        elif delta < 0:
            for counter, _, entry in self._entries(reservation, create=False):
                if entry is not None:
                    given = min(-delta, entry[2])
                    entry[2] -= given
                    counter.tokens -= given
        return succeed(None)

    def release(self, reservation: Reservation) -> Deferred[None]:
        for counter, _, entry in self._entries(reservation, create=False):
            if entry is not None:
                requests = min(1, entry[1])
                tokens = min(reservation.tokens, entry[2])
                entry[1] -= requests
                entry[2] -= tokens
                counter.requests -= requests
                counter.tokens -= tokens
        return succeed(None)

    def sweep(self) -> int:
        """
        Remove the counters of scopes idle for longer than their window.

        The tables are rebuilt rather than deleted from, because a Python
        dict never shrinks on deletion: after a burst of distinct keys it
        would keep its peak size.

        @return: the number of counters removed.
        """
        now = self._clock.seconds()
        removed = 0
        # The remembered scope lists go too (a fresh dict, for the same
        # reason); the active ones are rebuilt on their next request.
        self._tracked = TrackedCache(self._config)
        for name, table in list(self._counters.items()):
            window = WINDOWS[name]
            slot = window.slot(now)
            live = {
                scope: counter
                for scope, counter in table.items()
                if not counter.idle(slot, window.slots)
            }
            if len(live) != len(table):
                removed += len(table) - len(live)
                self._counters[name] = live
        return removed


def _sweep(limiter: MemoryRateLimiter) -> None:
    try:
        removed = limiter.sweep()
    except Exception:
        log.failure("rate-limit sweep failed")
    else:
        if removed:
            log.debug("rate-limit sweep removed {removed} idle scopes", removed=removed)


def sweeper_service(limiter: MemoryRateLimiter, interval: float, clock: IReactorTime) -> Service:
    """
    A service that sweeps C{limiter} every C{interval} seconds (and once at
    start).  A failing sweep is logged and the next one still runs: an
    exception would otherwise stop the underlying C{LoopingCall} for good.
    """
    service = TimerService(interval, _sweep, limiter)
    service.clock = clock
    service.setName("ratelimit-sweeper")
    return service
