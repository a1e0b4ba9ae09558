# -*- test-case-name: llmproxy.test.test_tap -*-
"""
The twistd plugin's options and the composition root: the only module that
imports the global reactor, and only inside L{makeService}.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attrs import frozen
from twisted.application.internet import TimerService
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import Agent

from llmproxy import buildinfo
from llmproxy.allocator import tune_allocator
from llmproxy.budgets import (
    AlertSender,
    MemorySpend,
    reconfigure_spend_store,
    spend_services,
    spend_store_for,
)
from llmproxy.config import Config, ConfigError, load_config
from llmproxy.config.validate import MAX_WORKERS
from llmproxy.health import HealthBoard
from llmproxy.logs import SecretHolder, TextSink, configured_secrets, process_log
from llmproxy.metrics import Metrics
from llmproxy.ratelimit import (
    IRateLimiter,
    MemoryBackend,
    limiter_for,
    rate_limits_for,
    reconfigure_limiter,
    tracked_scopes,
)
from llmproxy.runtime import ProxyState, Runtime, build_runtime
from llmproxy.service import ProxyService, describe_listen
from llmproxy.shared_circuits import SharedCircuits
from llmproxy.sinks import ICostSink, cost_sink_for
from llmproxy.status import StatusBoard
from llmproxy.tracing import ITracer, tracer_for
from llmproxy.upstream import make_pool, pooled_agents
from llmproxy.web import gateway_site
from llmproxy.webhook import json_poster

log = Logger(namespace="llmproxy.tap")

GAUGE_SAMPLE_SECONDS = 1.0
"""How often the gauges that count held things (connections, scopes) are set."""


class Options(usage.Options):
    """
    C{twistd llmproxy} options.
    """

    synopsis = "[--config PATH]... [--listen DESCRIPTION]... [--workers N]"
    longdesc = (
        "Reverse proxy for LLM provider APIs. Later --config files deep-merge over "
        "earlier ones; without any, built-in defaults serve the three providers."
    )

    def __init__(self) -> None:
        super().__init__()
        self["config"] = []
        self["listen"] = []
        self["workers"] = None

    def opt_config(self, path: str) -> None:
        """
        A YAML config file (repeatable; later files merge over earlier ones).
        """
        self["config"].append(path)

    opt_c = opt_config

    def opt_listen(self, description: str) -> None:
        """
        A server endpoint description, e.g. tcp:9002:interface=127.0.0.1 or
        systemd:domain=INET:index=0 (repeatable).
        """
        self["listen"].append(description)

    def opt_workers(self, count: str) -> None:
        """
        How many processes accept on the listeners (overrides server.workers;
        above 1, a master process supervises them).
        """
        try:
            workers = int(count)
        except ValueError:
            workers = 0
        if not 1 <= workers <= MAX_WORKERS:
            raise usage.UsageError(
                f"--workers: expected an integer from 1 to {MAX_WORKERS}, got {count!r}"
            )
        self["workers"] = workers

    def postOptions(self) -> None:
        """
        Load and validate the configuration now, so a bad file ends twistd
        with the error and exit status 1 before anything listens.
        """
        try:
            settings = load_config(self["config"], os.environ)
        except ConfigError as error:
            sys.stderr.write(f"llmproxy: invalid configuration:\n{error}\n")
            raise SystemExit(1) from None
        self["settings"] = settings
        listen = describe_listen(settings, self["listen"], os.environ.get("PORT"))
        for description in listen:
            problem = _check_description(description)
            if problem is not None:
                sys.stderr.write(f"llmproxy: bad --listen {description!r}: {problem}\n")
                raise SystemExit(1)
        self["listen"] = listen
        if self["workers"] is None:
            self["workers"] = settings.server.workers


def _check_description(description: str) -> str | None:
    """
    Parse an endpoint description without listening; the reason it is bad,
    or C{None}.
    """
    from twisted.internet import reactor

    try:
        serverFromString(reactor, description)
    except Exception as error:  # the parser raises a variety of types
        return str(error) or type(error).__name__
    return None


def makeService(options: Mapping[str, Any]) -> IService:
    from twisted.internet import reactor

    if options.get("workers", 1) > 1:
        from llmproxy.group.master import build_master

        return build_master(
            reactor, options["settings"], options["config"], options["listen"], options["workers"]
        )
    # Large bodies reuse heap memory instead of faulting in fresh mappings.
    tune_allocator()
    service = build_service(reactor, options["settings"], options["config"], options["listen"])
    freeze_heap()
    return service


def freeze_heap() -> None:
    """
    Everything built so far lives as long as the process: keep the
    collector from walking it again on every full collection.
    """
    gc.collect()
    gc.freeze()


@frozen
class ProcessRole:
    """
    How a serving process fits in: alone (the defaults), or as one worker of
    a group (L{llmproxy.group.worker}).

    @ivar endpoint_for: the endpoint of each listen description; by default
        the description parsed (a worker adopts the master's sockets).
    @ivar memory_limiter: builds the C{memory} rate-limit backend; by default
        counters in this process (a worker asks the master's).
    @ivar memory_spend: builds the budgets' spend store of the C{memory}
        backend; by default spend in this process, rebuilt from the cost
        records (a worker asks the master's).
    @ivar metrics: builds the metrics; a worker counts in the group's files.
    @ivar log_stream: where log lines go; stdout by default.
    """

    endpoint_for: Callable[[str], IStreamServerEndpoint] | None = None
    memory_limiter: MemoryBackend | None = None
    memory_spend: MemorySpend | None = None
    metrics: Callable[[], Metrics] = Metrics
    log_stream: TextSink | None = None


def build_service(
    reactor: Any,
    config: Config,
    config_paths: Sequence[str],
    listen: Sequence[str],
    role: ProcessRole = ProcessRole(),
) -> ProxyService:
    """
    Wire the process together: state, runtime, site, children, reload.
    """
    logging = config.logging
    secrets = SecretHolder(configured_secrets(config))
    level, observer = process_log(
        logging.format, logging.level, role.log_stream or sys.stdout, reactor, secrets
    )
    metrics = role.metrics()
    pool = make_pool(reactor)
    agent_for = pooled_agents(reactor, pool)
    memory = role.memory_limiter
    limiter = limiter_for(rate_limits_for(config), reactor, metrics, memory)

    def in_thread(work: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), work)

    def spend_error() -> None:
        metrics.ratelimit_backend_error("redis")

    spend = spend_store_for(config, reactor, in_thread, spend_error, role.memory_spend)
    alerts = AlertSender(reactor, json_poster(Agent(reactor, pool=pool), reactor))
    status = StatusBoard(reactor)
    runtime = build_runtime(
        config,
        agent_for,
        limiter,
        spend=spend,
        alerts=alerts,
        metrics=metrics,
        watch=status.budget_spent,
    )
    sink: ICostSink
    sink, sink_service = cost_sink_for(config.features.cost_tracking, reactor, metrics)
    tracer = tracer_for(config.features.tracing, reactor)
    state = ProxyState(
        clock=reactor,
        runtime=runtime,
        metrics=metrics,
        health=HealthBoard(reactor),
        sink=sink,
        build=buildinfo.load(),
        started_at=reactor.seconds(),
        tracer=tracer,
        status=status,
    )
    site = gateway_site(state)

    def sample_gauges() -> None:
        # Set on a timer, not with set_function: in a group of workers a
        # gauge's value must be written to the worker's metrics file.
        metrics.ratelimit_tracked_scopes.set(tracked_scopes(state.runtime.limiter))
        metrics.client_connections.set(state.open_connections())

    limiter_children = _limiter_services(limiter, config, reactor)
    spend_children = spend_services(spend)
    stores = {"spend": spend}

    def reload() -> Deferred[Runtime]:
        loading: Deferred[Config] = deferToThread(load_config, list(config_paths), os.environ)

        def rebuild(new: Config) -> Runtime:
            current: IRateLimiter | None = state.runtime.limiter
            old_limits = rate_limits_for(state.runtime.config)
            new_limits = rate_limits_for(new)
            new_limiter = reconfigure_limiter(
                current, old_limits, new_limits, reactor, metrics, memory
            )
            if (
                new_limiter is not current
                or new_limits.sweep_interval_seconds != old_limits.sweep_interval_seconds
            ):
                _replace_children(
                    service, limiter_children, _limiter_services(new_limiter, new, reactor)
                )
            new_spend = reconfigure_spend_store(
                stores["spend"],
                state.runtime.config,
                new,
                reactor,
                in_thread,
                spend_error,
                role.memory_spend,
            )
            if new_spend is not stores["spend"]:
                _replace_children(service, spend_children, spend_services(new_spend))
                stores["spend"] = new_spend
            level.set(new.logging.level)
            secrets.set(configured_secrets(new))
            if new.features.tracing.enabled != config.features.tracing.enabled:
                log.warn("features.tracing.enabled changes take effect at the next restart")
            runtime = build_runtime(
                new,
                agent_for,
                new_limiter,
                spend=new_spend,
                alerts=alerts,
                metrics=metrics,
                watch=status.budget_spent,
            )
            state.status.configure(new)
            return runtime

        return loading.addCallback(rebuild)

    service = ProxyService(
        reactor, listen, site, state, pool, reload, observer, endpoint_for=role.endpoint_for
    )
    if sink_service is not None:
        sink_service.setServiceParent(service)
    limits = config.features.rate_limiting
    if limits.enabled and limits.backend == "redis":
        # With the Redis backend, every instance shares its circuit breakers.
        SharedCircuits(limits, state.circuits, reactor).setServiceParent(service)
    for child in [*limiter_children, *spend_children, alerts]:
        child.setServiceParent(service)
    TracerService(tracer).setServiceParent(service)
    gauges = TimerService(GAUGE_SAMPLE_SECONDS, sample_gauges)
    gauges.clock = reactor
    gauges.setServiceParent(service)
    return service


class TracerService(Service):
    """
    Exports the spans and metrics still buffered when the process stops
    (after the drain: children stop last).
    """

    def __init__(self, tracer: ITracer) -> None:
        self._tracer = tracer

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return self._tracer.shutdown()


def _replace_children(parent: ProxyService, current: list[IService], new: list[IService]) -> None:
    """
    After a reload built a new limiter (or changed the sweep interval):
    stop the services of the old one and start those of the new one
    (adding a child to a running service starts it). A service in both
    lists (a Redis limiter kept across the reload) keeps running.
    C{current} is updated in place.
    """
    for child in current:
        if child not in new:
            stopping = child.disownServiceParent()
            if stopping is not None:
                stopping.addErrback(
                    lambda failure: log.failure("stopping a limiter service", failure)
                )
    for child in new:
        if child not in current:
            child.setServiceParent(parent)
    current[:] = new


def _limiter_services(limiter: IRateLimiter | None, config: Config, reactor: Any) -> list[IService]:
    """
    The limiter's own services: the memory backend's sweeper, the Redis
    backend's connection.
    """
    from llmproxy.ratelimit import services_for

    return services_for(limiter, rate_limits_for(config), reactor)
