# -*- test-case-name: llmproxy.test.test_call,llmproxy.test.test_runtime -*-
"""
What a request needs while it runs, split by lifetime:

  - L{Runtime} is everything derived from one configuration (upstream
    clients, prices, limits). A reload builds a new one and swaps it in; a
    request keeps the one it started with.
  - L{ProxyState} lives as long as the process: metrics, health counters,
    the cost sink, the drain flag and the in-flight count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from attrs import Factory, define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llmproxy.auth import Keyring
from llmproxy.budgets import AlertSender, BudgetBook, ISpendStore, SpendWatch, budget_caps
from llmproxy.buildinfo import BuildInfo
from llmproxy.circuits import CircuitBoard, State
from llmproxy.config import Config
from llmproxy.group.view import GroupView
from llmproxy.health import HealthBoard
from llmproxy.metrics import Metrics
from llmproxy.pricing import PriceBook, UnpricedWarnings
from llmproxy.ratelimit import IRateLimiter
from llmproxy.routes import RouteTable
from llmproxy.sinks import ICostSink
from llmproxy.status import StatusBoard
from llmproxy.tracing import NO_TRACER, ITracer
from llmproxy.upstream import AgentFactory, Upstream, build_upstream

log = Logger(namespace="llmproxy.circuits")


@frozen
class Runtime:
    """
    Everything derived from one configuration.

    @ivar keyring: the proxy keys (C{auth}).
    @ivar budgets: the budgets, when the configuration counts spend.
    """

    config: Config
    upstreams: Mapping[str, Upstream]
    routes: RouteTable
    prices: PriceBook
    limiter: IRateLimiter | None
    keyring: Keyring | None = None
    budgets: BudgetBook | None = None


def build_runtime(
    config: Config,
    agent_for: AgentFactory,
    limiter: IRateLimiter | None,
    *,
    spend: ISpendStore | None = None,
    alerts: AlertSender | None = None,
    metrics: Metrics | None = None,
    watch: SpendWatch | None = None,
) -> Runtime:
    """
    Derive a L{Runtime} from C{config}. Disabled providers are not mounted.

    @param spend: the process's spend store, when C{config} counts spend.
    @param alerts: where budget alerts go.
    @param metrics: the process's metrics, which learn the keys' budgets.
    @param watch: who learns each capped budget's spend after a settlement
        (the process's status board, L{StatusBoard.budget_spent}).
    """
    upstreams = {
        name: build_upstream(provider, agent_for)
        for name, provider in config.providers.items()
        if provider.enabled
    }
    prices = PriceBook.from_config(config)
    budgets = None
    if spend is not None and metrics is not None:
        budgets = BudgetBook(config.auth, prices, spend, alerts, metrics, watch)
    if metrics is not None:
        publish_budgets(config, metrics)
    return Runtime(
        config=config,
        upstreams=upstreams,
        routes=RouteTable(upstreams),
        prices=prices,
        limiter=limiter,
        keyring=Keyring(config.auth) if config.auth.mode != "passthrough" else None,
        budgets=budgets,
    )


def publish_budgets(config: Config, metrics: Metrics) -> None:
    """
    Tell the metrics which proxy keys exist and what their budgets are.
    """
    limits = {
        (scope.removeprefix("key:"), period): usd
        for (scope, period), usd in budget_caps(config.auth).items()
        if scope.startswith("key:")
    }
    metrics.budget_keys({key.id for key in config.auth.keys}, limits)


def _none_open() -> int:
    return 0


@define
class ProxyState:
    """
    Process-wide state shared by the web layer and the forwarder.

    @ivar runtime: the current configuration's runtime; replaced on reload.
    @ivar draining: set once shutdown begins; C{/health} then answers 503.
    @ivar inflight: requests received and not yet finished.
    @ivar status: the status page's aggregates.
    @ivar tracer: where request traces go (nowhere unless tracing is on).
    @ivar received: requests received since the start.
    @ivar group: in a worker of a group, its view of the whole group (what
        C{/health} reports); C{None} in a process of its own.
    @ivar open_connections: how many client connections are open (the
        site answers, once there is one).
    @ivar accounting: finished requests whose accounting has not run yet
        (L{account_after_io}); a drain waits for them too.
    """

    clock: IReactorTime
    runtime: Runtime
    metrics: Metrics
    health: HealthBoard
    sink: ICostSink
    build: BuildInfo
    started_at: float
    unpriced: UnpricedWarnings = field(factory=UnpricedWarnings)
    circuits: CircuitBoard = field(
        default=Factory(lambda self: CircuitBoard(self.clock, self._circuit_moved), takes_self=True)
    )
    draining: bool = False
    inflight: int = 0
    status: StatusBoard = field(
        default=Factory(lambda self: StatusBoard(self.clock), takes_self=True)
    )
    tracer: ITracer = NO_TRACER
    received: int = 0
    group: GroupView | None = None
    open_connections: Callable[[], int] = _none_open
    accounting: int = 0
    _idle_waiters: list[Deferred[None]] = field(factory=list)
    _to_account: list[Callable[[], object]] = field(factory=list)

    def __attrs_post_init__(self) -> None:
        self.status.configure(self.runtime.config)

    def _circuit_moved(self, provider: str, upstream: str, model: str, state: State) -> None:
        self.metrics.circuit_state(provider, upstream, model, state.value)
        log.warn(
            "circuit {provider}/{upstream} {model} is now {state}",
            provider=provider,
            upstream=upstream,
            model=model or "(all models)",
            state=state.name.lower(),
        )

    def stream_opened(self, provider: str) -> None:
        """
        A streamed response began to flow to a client.
        """
        self.health.provider(provider).active_streams += 1
        self.metrics.stream_opened(provider)

    def stream_closed(self, provider: str) -> None:
        self.health.provider(provider).active_streams -= 1
        self.metrics.stream_closed(provider)

    def upstream_attempted(self, provider: str, ok: bool, failure: str | None) -> None:
        """
        One upstream attempt ended: C{ok} is C{False} for a connection
        error, a timeout, a broken stream or a 5xx; C{failure} names what
        went wrong on the connection (C{connect}, C{first_byte_timeout},
        C{idle_timeout}, ...), L{None} when the upstream answered.
        """
        self.health.attempt(provider, ok=ok)
        if failure is not None:
            self.metrics.upstream_error(provider, failure)

    def request_started(self) -> None:
        self.inflight += 1
        self.received += 1

    def request_finished(self) -> None:
        self.inflight -= 1
        self._maybe_idle()

    def account_after_io(self, work: Callable[[], object]) -> None:
        """
        Run a finished request's accounting once the reactor has been
        through its I/O again.

        A response's last bytes are only queued when it finishes: the
        reactor sends them in its next pass over the sockets. Accounting
        run at once (limits, budgets, metrics, the access line, the cost
        record, the status page: about a tenth of a request's CPU) would
        hold that pass back, and the client would wait for it. Two turns
        of the timed calls put it after that pass (the reactor runs its
        due calls, then its I/O): the same work, off the client's latency.
        The requests that finish in one pass share the two timed calls.
        Nothing is lost by waiting: a drain waits for it (L{wait_idle}).
        """
        self.accounting += 1
        self._to_account.append(work)
        if len(self._to_account) == 1:
            self.clock.callLater(0, self._take_accounting)

    def _take_accounting(self) -> None:
        """
        First turn: take what finished before this pass; run it in the next
        turn, after the pass.
        """
        batch, self._to_account = self._to_account, []
        self.clock.callLater(0, self._run_accounting, batch)

    def _run_accounting(self, batch: list[Callable[[], object]]) -> None:
        for work in batch:
            try:
                work()
            except Exception:
                log.failure("accounting a request failed")
            self.accounting -= 1
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self.inflight == 0 and self.accounting == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def wait_idle(self) -> Deferred[None]:
        """
        A Deferred that fires once no request is in flight and every
        finished one is accounted.
        """
        waiter: Deferred[None] = Deferred()
        if self.inflight == 0 and self.accounting == 0:
            waiter.callback(None)
        else:
            self._idle_waiters.append(waiter)
        return waiter
