# -*- test-case-name: llmproxy.test.test_resilience -*-
"""
Which upstream each attempt of one client request goes to.

An L{AttemptPlan} walks the request's mount and then its fallbacks, in
order. Each attempt goes to an available upstream that has not failed for
this request, at once: among those of the lowest priority, by weight and
fewest requests in flight. Once none is left, an upstream that has failed
is tried again after a backoff (doubling, with full jitter), and one that
asked to be left alone for no longer than C{max_wait_seconds} after that
wait. Every wait stays within the call's deadline; the number of attempts
within C{retry.max_attempts} of the request's own mount.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from attrs import frozen
from twisted.internet.interfaces import IReactorTime

from llmproxy.circuits import CircuitBoard
from llmproxy.config import UpstreamConfig
from llmproxy.upstream import Upstream


@frozen
class Choice:
    """
    The next attempt: where it goes and how long to wait first.

    @ivar mount: the mount's name (the request's own, or a fallback's).
    @ivar upstream: the mounted provider (wire format, agent, config).
    @ivar endpoint: the upstream of that mount.
    @ivar probe: it is the half-open probe of a circuit.
    """

    mount: str
    upstream: Upstream
    endpoint: UpstreamConfig
    wait: float = 0.0
    probe: bool = False

    @property
    def label(self) -> str:
        """C{<mount>/<upstream name>}, as C{X-LLM-Proxy-Upstream} says."""
        return f"{self.mount}/{self.endpoint.name}"


@frozen
class Exhausted:
    """
    No attempt is possible now.

    @ivar retry_after: seconds until the first upstream might be available
        again, when that is known.
    """

    retry_after: float | None = None


class AttemptPlan:
    """
    The upstreams tried for one client request, and those still left.
    """

    def __init__(
        self,
        chain: Sequence[tuple[str, Upstream]],
        model: str | None,
        board: CircuitBoard,
        clock: IReactorTime,
        deadline: float | None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """
        @param chain: the request's mount and then its fallbacks, each as
            (name, upstream).
        @param model: the requested model (circuits are per model).
        @param deadline: when the call's total budget ends, or L{None}.
        @param rand: uniform in [0, 1): the jitter and the weighted choice.
        """
        self._chain = list(chain)
        self._model = model
        self._board = board
        self._clock = clock
        self._deadline = deadline
        self._rand = rand
        self._retry = chain[0][1].config.retry
        self._failed: set[tuple[str, str]] = set()
        self._waits = 0
        self.attempts = 0

    @property
    def may_retry(self) -> bool:
        """Another attempt may follow the one last planned."""
        return self.attempts < self._retry.max_attempts

    def retract(self, choice: Choice) -> None:
        """
        C{choice} was not sent after all (another instance holds the
        circuit's probe): it does not count as an attempt.
        """
        self.attempts -= 1

    def failed(self, choice: Choice) -> None:
        """
        The attempt at C{choice} failed (and may be retried).
        """
        self._failed.add((choice.mount, choice.endpoint.name))

    def next(self) -> Choice | Exhausted:
        """
        Where the next attempt goes, or why there is none.
        """
        if self.attempts >= self._retry.max_attempts:
            return Exhausted()
        if len(self._chain) == 1 and not self._failed:
            # One mount: its first attempt, or after a pause (most requests).
            mount, upstream = self._chain[0]
            endpoints = upstream.config.upstreams
            if len(endpoints) == 1:
                endpoint = endpoints[0]
                state = self._board.availability(mount, endpoint.name, self._model)
                if state.available:
                    return self._take(Choice(mount, upstream, endpoint, 0.0, state.probe))
        now = self._clock.seconds()
        soonest: float | None = None
        retry: list[tuple[str, Upstream, UpstreamConfig]] = []
        for mount, upstream in self._chain:
            fresh: list[tuple[UpstreamConfig, bool]] = []
            for endpoint in upstream.config.upstreams:
                state = self._board.availability(mount, endpoint.name, self._model)
                if not state.available:
                    if state.until is not None:
                        soonest = state.until if soonest is None else min(soonest, state.until)
                    continue
                if (mount, endpoint.name) in self._failed:
                    retry.append((mount, upstream, endpoint))
                else:
                    fresh.append((endpoint, state.probe))
            if fresh:
                endpoint, probe = self._spread(mount, fresh)
                return self._take(Choice(mount, upstream, endpoint, 0.0, probe))
        if retry:
            mount, upstream, endpoint = retry[0]
            backoff = self._retry.backoff_seconds * (2**self._waits) * self._rand()
            self._waits += 1
            return self._take(Choice(mount, upstream, endpoint, backoff), now)
        if soonest is not None and self.attempts > 0:
            wait = soonest - now
            if wait <= self._retry.max_wait_seconds:
                # Only upstreams that asked for a pause are left: wait it out.
                return self._waiting_for(soonest, now)
        return Exhausted(None if soonest is None else max(soonest - now, 0.0))

    def _waiting_for(self, when: float, now: float) -> Choice | Exhausted:
        for mount, upstream in self._chain:
            for endpoint in upstream.config.upstreams:
                key = (mount, endpoint.name)
                if self._board.availability(mount, endpoint.name, self._model).until == when:
                    self._failed.discard(key)
                    return self._take(Choice(mount, upstream, endpoint, when - now), now)
        return Exhausted(when - now)

    def _take(self, choice: Choice, now: float | None = None) -> Choice | Exhausted:
        if choice.wait > 0 and self._deadline is not None:
            start = (now if now is not None else self._clock.seconds()) + choice.wait
            if start >= self._deadline:
                return Exhausted()
        if choice.probe and not self._board.take_probe(
            choice.mount, choice.endpoint.name, self._model
        ):
            return Exhausted()
        self.attempts += 1
        return choice

    def _spread(
        self, mount: str, candidates: list[tuple[UpstreamConfig, bool]]
    ) -> tuple[UpstreamConfig, bool]:
        """
        Among the candidates of the lowest priority, those with the fewest
        requests in flight for their weight; among them, one at random in
        proportion to its weight.
        """
        if len(candidates) == 1:
            return candidates[0]
        lowest = min(endpoint.priority for endpoint, _ in candidates)
        tier = [(e, p) for e, p in candidates if e.priority == lowest]
        loads = [self._board.in_flight(mount, e.name) / e.weight for e, _ in tier]
        least = min(loads)
        tier = [c for c, load in zip(tier, loads, strict=True) if load <= least + 1e-9]
        total = sum(e.weight for e, _ in tier)
        point = self._rand() * total
        for endpoint, probe in tier:
            point -= endpoint.weight
            if point < 0:
                return endpoint, probe
        return tier[-1]
