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
from collections.abc import Callable, Mapping
from typing import Protocol

from attrs import define
from twisted.internet.defer import Deferred
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

CircuitKey = tuple[str, str, str]
"""(provider, upstream, model); the model is L{ANY_MODEL} for the upstream's own."""


class Fleet(Protocol):
    """
    Where the other instances' circuits are (L{llmproxy.shared_circuits}).
    """

    def failed(self, key: CircuitKey, threshold: int, cooldown: float, half_open: bool) -> None: ...

    def succeeded(self, key: CircuitKey) -> None: ...

    def claim_probe(self, key: CircuitKey, cooldown: float) -> Deferred[bool]: ...


@define
class Circuit:
    """
    One breaker.

    @ivar failures: consecutive failures counted while closed.
    @ivar open_until: when an open circuit becomes half-open.
    @ivar probing: a half-open circuit's one probe is in flight.
    @ivar cooldown: the cooldown it was opened with.
    @ivar fleet: the fleet opened it (another instance, or Redis's count).
    """

    state: State = State.CLOSED
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False
    cooldown: float = 0.0
    fleet: bool = False


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
        self._circuits: dict[CircuitKey, Circuit] = {}
        self._paused: dict[tuple[str, str], float] = {}
        self._in_flight: dict[tuple[str, str], int] = {}
        self._fleet: Fleet | None = None

    def share(self, fleet: Fleet | None) -> None:
        """
        Keep these circuits in step with other instances' (or stop).
        """
        self._fleet = fleet

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

    def _fail(self, key: CircuitKey, config: CircuitBreakerConfig, now: float) -> None:
        circuit = self._circuits.get(key)
        if circuit is None:
            circuit = self._circuits[key] = Circuit()
        half_open = circuit.state is State.HALF_OPEN
        circuit.probing = False
        circuit.failures += 1
        circuit.cooldown = config.cooldown_seconds
        if half_open or circuit.failures >= config.failures:
            circuit.open_until = now + config.cooldown_seconds
            if circuit.state is not State.OPEN:
                self._move(key, circuit, State.OPEN)
        if self._fleet is not None:
            self._fleet.failed(key, config.failures, config.cooldown_seconds, half_open)

    def _close(self, key: CircuitKey) -> None:
        circuit = self._circuits.pop(key, None)
        if circuit is None:
            return
        if circuit.state is not State.CLOSED:
            self._move(key, circuit, State.CLOSED)
        if self._fleet is not None:
            # Only a circuit with a history is worth a round trip: a success
            # on a clean one changes nothing anywhere.
            self._fleet.succeeded(key)

    # -- the fleet --------------------------------------------------------------

    def adopt(self, key: CircuitKey, open_until: float) -> None:
        """
        The fleet's verdict on a circuit after a failure: open until
        C{open_until}, or (C{0}) still closed.
        """
        if open_until <= 0:
            return
        circuit = self._circuits.get(key)
        if circuit is None:
            circuit = self._circuits[key] = Circuit()
        circuit.fleet = True
        if circuit.state is State.CLOSED or open_until > circuit.open_until:
            circuit.open_until = open_until
            if circuit.state is not State.OPEN:
                circuit.probing = False
                self._move(key, circuit, State.OPEN)

    def adopt_all(self, opened: Mapping[CircuitKey, float]) -> None:
        """
        The circuits the fleet has open now: open them here too, and close
        those the fleet has closed since.
        """
        for key, until in opened.items():
            self.adopt(key, until)
        for key, circuit in list(self._circuits.items()):
            if circuit.fleet and key not in opened and circuit.state is not State.CLOSED:
                del self._circuits[key]
                self._move(key, circuit, State.CLOSED)

    def claim_fleet_probe(
        self, provider: str, upstream: str, model: str | None
    ) -> Deferred[bool] | None:
        """
        With a fleet, claim its one probe of the upstream's half-open
        circuit (fires C{False} when another instance has it); L{None}
        without one (the local claim is all there is).
        """
        if self._fleet is None:
            return None
        for key in ((provider, upstream, ANY_MODEL), (provider, upstream, model or ANY_MODEL)):
            circuit = self._circuits.get(key)
            if circuit is not None and circuit.state is State.HALF_OPEN:
                return self._fleet.claim_probe(key, circuit.cooldown or 30.0)
        return None

    def probe_lost(self, provider: str, upstream: str, model: str | None) -> None:
        """
        Another instance is probing: keep the circuit from local probes
        until the fleet says how it went (or the probe's claim expires).
        """
        for key in ((provider, upstream, ANY_MODEL), (provider, upstream, model or ANY_MODEL)):
            circuit = self._circuits.get(key)
            if circuit is not None and circuit.state is State.HALF_OPEN:
                circuit.state = State.OPEN
                circuit.probing = False
                circuit.fleet = True
                circuit.open_until = self._clock.seconds() + min(circuit.cooldown or 30.0, 1.0)

    def _release(self, key: CircuitKey) -> None:
        """
        The attempt said nothing about this circuit: a probe it held may be
        taken by the next request.
        """
        circuit = self._circuits.get(key)
        if circuit is not None:
            circuit.probing = False

    def _move(self, key: CircuitKey, circuit: Circuit, state: State) -> None:
        circuit.state = state
        if self._listener is not None:
            self._listener(*key, state)
