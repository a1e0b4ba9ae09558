# -*- test-case-name: llmproxy.test.test_tap -*-
"""
The twistd plugin's options and the composition root: the only module that
imports the global reactor, and only inside L{makeService}.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python import usage

from llmproxy import buildinfo
from llmproxy.allocator import tune_allocator
from llmproxy.config import Config, ConfigError, load_config
from llmproxy.health import HealthBoard
from llmproxy.logs import LevelHolder, LineBuffer, make_observer
from llmproxy.metrics import Metrics
from llmproxy.ratelimit import IRateLimiter, limiter_for, reconfigure_limiter, tracked_scopes
from llmproxy.runtime import ProxyState, Runtime, build_runtime
from llmproxy.service import ProxyService, describe_listen
from llmproxy.sinks import ICostSink, cost_sink_for
from llmproxy.upstream import make_pool, pooled_agents
from llmproxy.web import gateway_site

log = Logger(namespace="llmproxy.tap")


class Options(usage.Options):
    """
    C{twistd llmproxy} options.
    """

    synopsis = "[--config PATH]... [--listen DESCRIPTION]..."
    longdesc = (
        "Reverse proxy for LLM provider APIs. Later --config files deep-merge over "
        "earlier ones; without any, built-in defaults serve the three providers."
    )

    def __init__(self) -> None:
        super().__init__()
        self["config"] = []
        self["listen"] = []

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

    # Large bodies reuse heap memory instead of faulting in fresh mappings.
    tune_allocator()
    service = build_service(reactor, options["settings"], options["config"], options["listen"])
    # Everything built so far lives as long as the process: keep the
    # collector from walking it again on every full collection.
    gc.collect()
    gc.freeze()
    return service


def build_service(
    reactor: Any, config: Config, config_paths: Sequence[str], listen: Sequence[str]
) -> ProxyService:
    """
    Wire the process together: state, runtime, site, children, reload.
    """
    level = LevelHolder(config.logging.level)
    lines = LineBuffer(sys.stdout, reactor)
    observer = make_observer(config.logging.format, level, lines)
    # The last lines (the drain, "stopped") are written once the reactor is done.
    reactor.addSystemEventTrigger("after", "shutdown", lines.flush)
    metrics = Metrics()
    pool = make_pool(reactor)
    agent_for = pooled_agents(reactor, pool)
    limiter = limiter_for(config.features.rate_limiting, reactor, metrics)
    runtime = build_runtime(config, agent_for, limiter)
    sink: ICostSink
    sink, sink_service = cost_sink_for(config.features.cost_tracking, reactor, metrics)
    state = ProxyState(
        clock=reactor,
        runtime=runtime,
        metrics=metrics,
        health=HealthBoard(reactor),
        sink=sink,
        build=buildinfo.load(),
        started_at=reactor.seconds(),
    )
    metrics.ratelimit_tracked_scopes.set_function(lambda: tracked_scopes(state.runtime.limiter))
    site = gateway_site(state)
    metrics.client_connections.set_function(lambda: len(site.channels))
    limiter_children = _limiter_services(limiter, config, reactor)

    def reload() -> Deferred[Runtime]:
        loading: Deferred[Config] = deferToThread(load_config, list(config_paths), os.environ)

        def rebuild(new: Config) -> Runtime:
            current: IRateLimiter | None = state.runtime.limiter
            old_limits = state.runtime.config.features.rate_limiting
            new_limits = new.features.rate_limiting
            new_limiter = reconfigure_limiter(current, old_limits, new_limits, reactor, metrics)
            if (
                new_limiter is not current
                or new_limits.sweep_interval_seconds != old_limits.sweep_interval_seconds
            ):
                _replace_children(
                    service, limiter_children, _limiter_services(new_limiter, new, reactor)
                )
            level.set(new.logging.level)
            return build_runtime(new, agent_for, new_limiter)

        return loading.addCallback(rebuild)

    service = ProxyService(reactor, listen, site, state, pool, reload, observer)
    if sink_service is not None:
        sink_service.setServiceParent(service)
    for child in limiter_children:
        child.setServiceParent(service)
    return service


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

    return services_for(limiter, config.features.rate_limiting, reactor)
