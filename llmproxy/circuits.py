# -*- test-case-name: llmproxy.test.test_circuits -*-
"""
Which upstreams are available right now, process-wide.

A circuit breaker per upstream and model: consecutive failed attempts
open it for a cooldown; after the cooldown exactly one request probes it
(half-open): success closes it, failure opens it again. Connection
failures open the upstream's own circuit, which covers every model. An
upstream that asked to be left alone (a 429 or 503 with C{Retry-After},
or its rate-limit headers at zero) is paused until then, which is not a
failure. The board also counts each upstream's requests in flight, for
spreading load.

Nothing here knows HTTP: the attempt's outcome arrives as an
L{llmproxy.outcomes.Breaker} verdict.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from attrs import define
from twisted.internet.interfaces import IReactorTime

from llmproxy.config import CircuitBreakerConfig
from llmproxy.outcomes import Breaker

ANY_MODEL = ""
"""The model key of an upstream's own circuit (connection failures)."""


class State(enum.Enum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


StateListener = Callable[[str, str, str, State], None]
"""Told (provider, upstream, model, new state) at each transition."""


@define
class Circuit:
    """
    One breaker.

    @ivar failures: consecutive failures counted while closed.
    @ivar open_until: when an open circuit becomes half-open.
    @ivar probing: a half-open circuit's one probe is in flight.
    """

    state: State = State.CLOSED
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False


@define
class Availability:
    """
    Whether an upstream can take a request for a model now.

    @ivar available: it can.
    @ivar probe: it can, as the half-open probe of a circuit (whoever sends
        it must L{CircuitBoard.take_probe} first).
    @ivar until: when it might be available again, if it is not now.
    """

    available: bool
    probe: bool = False
    until: float | None = None


class CircuitBoard:
    """
    Circuits, pauses and requests in flight of every upstream.
    """

    def __init__(self, clock: IReactorTime, listener: StateListener | None = None) -> None:
        self._clock = clock
        self._listener = listener
        self._circuits: dict[tuple[str, str, str], Circuit] = {}
        self._paused: dict[tuple[str, str], float] = {}
        self._in_flight: dict[tuple[str, str], int] = {}

    # -- asking ---------------------------------------------------------------

    def availability(self, provider: str, upstream: str, model: str | None) -> Availability:
        now = self._clock.seconds()
        paused = self._paused.get((provider, upstream))
        if paused is not None:
            if paused > now:
                return Availability(False, until=paused)
            del self._paused[(provider, upstream)]
        probe = busy = False
        until: float | None = None
        for key in ((provider, upstream, ANY_MODEL), (provider, upstream, model or ANY_MODEL)):
            circuit = self._circuits.get(key)
            if circuit is None or circuit.state is State.CLOSED:
                continue
            if circuit.state is State.OPEN and circuit.open_until > now:
                until = max(until or 0.0, circuit.open_until)
                continue
            if circuit.state is State.OPEN:
                self._move(key, circuit, State.HALF_OPEN)
            if circuit.probing:
                # Its one probe is out: unavailable until that ends, which
                # is no time anyone can name.
                busy = True
            else:
                probe = True
        if until is not None or busy:
            return Availability(False, until=until)
        return Availability(True, probe=probe)

    def in_flight(self, provider: str, upstream: str) -> int:
        return self._in_flight.get((provider, upstream), 0)

    def describe(self, provider: str, upstream: str) -> tuple[str, list[str]]:
        """
        The upstream's state for C{/health} (C{healthy}, C{open},
        C{half_open}, C{rate_limited}) and the models whose circuits are not
        closed.
        """
        now = self._clock.seconds()
        paused = self._paused.get((provider, upstream), 0.0) > now
        status = "rate_limited" if paused else "healthy"
        models = []
        for (p, u, model), circuit in self._circuits.items():
            if p != provider or u != upstream or circuit.state is State.CLOSED:
                continue
            if model == ANY_MODEL:
                if status == "healthy":
                    status = "open" if circuit.state is State.OPEN else "half_open"
            else:
                models.append(model)
        return status, sorted(models)

    # -- telling --------------------------------------------------------------

    def take_probe(self, provider: str, upstream: str, model: str | None) -> bool:
        """
        Claim the half-open probe of the upstream's circuits; C{False} when
        another request holds it.
        """
        for key in ((provider, upstream, ANY_MODEL), (provider, upstream, model or ANY_MODEL)):
            circuit = self._circuits.get(key)
            if circuit is not None and circuit.state is State.HALF_OPEN:
                if circuit.probing:
                    return False
                circuit.probing = True
        return True

    def started(self, provider: str, upstream: str) -> None:
        key = (provider, upstream)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def finished(
        self,
        provider: str,
        upstream: str,
        model: str | None,
        breaker: Breaker,
        config: CircuitBreakerConfig,
        pause_seconds: float | None = None,
    ) -> None:
        """
        An attempt on the upstream ended with C{breaker}'s verdict.
        """
        key = (provider, upstream)
        self._in_flight[key] = max(self._in_flight.get(key, 0) - 1, 0)
        now = self._clock.seconds()
        if pause_seconds is not None and pause_seconds > 0:
            self._paused[key] = max(self._paused.get(key, 0.0), now + pause_seconds)
        model_key = (provider, upstream, model or ANY_MODEL)
        upstream_key = (provider, upstream, ANY_MODEL)
        if breaker is Breaker.SUCCESS:
            for circuit_key in {upstream_key, model_key}:
                self._close(circuit_key)
        elif breaker is Breaker.FAILURE:
            self._fail(model_key, config, now)
            self._release(upstream_key)
        elif breaker is Breaker.UNREACHABLE:
            self._fail(upstream_key, config, now)
            self._release(model_key)
        else:
            for circuit_key in {upstream_key, model_key}:
                self._release(circuit_key)

    def _fail(self, key: tuple[str, str, str], config: CircuitBreakerConfig, now: float) -> None:
        circuit = self._circuits.get(key)
        if circuit is None:
            circuit = self._circuits[key] = Circuit()
        circuit.probing = False
        circuit.failures += 1
        if circuit.state is State.HALF_OPEN or circuit.failures >= config.failures:
            circuit.open_until = now + config.cooldown_seconds
            if circuit.state is not State.OPEN:
                self._move(key, circuit, State.OPEN)

    def _close(self, key: tuple[str, str, str]) -> None:
        circuit = self._circuits.pop(key, None)
        if circuit is not None and circuit.state is not State.CLOSED:
            self._move(key, circuit, State.CLOSED)

    def _release(self, key: tuple[str, str, str]) -> None:
        """
        The attempt said nothing about this circuit: a probe it held may be
        taken by the next request.
        """
        circuit = self._circuits.get(key)
        if circuit is not None:
            circuit.probing = False

    def _move(self, key: tuple[str, str, str], circuit: Circuit, state: State) -> None:
        circuit.state = state
        if self._listener is not None:
            self._listener(*key, state)
