# -*- test-case-name: llmproxy.test.test_health -*-
"""
The body of C{GET /health} for one process, from its own counters: it
never calls an upstream, so polling it costs nothing. A group of workers
merges its workers' reports (L{llmproxy.group.health}).
"""

from __future__ import annotations

from typing import Any

from llmproxy.ratelimit import limiter_status
from llmproxy.runtime import ProxyState


def health_report(state: ProxyState) -> dict[str, Any]:
    """
    This process's health: its status, build, and each enabled provider's
    counters and upstreams (described in docs/operations.md, "Health").
    """
    runtime = state.runtime
    now = state.clock.seconds()
    providers = {}
    circuits = state.circuits
    for name, upstream in runtime.upstreams.items():
        counters = state.health.provider(name)
        upstreams = {}
        for endpoint in upstream.config.upstreams:
            status, open_models = circuits.describe(name, endpoint.name)
            upstreams[endpoint.name] = {
                "status": status,
                "open_models": open_models,
                "in_flight": circuits.in_flight(name, endpoint.name),
            }
        available = any(entry["status"] == "healthy" for entry in upstreams.values())
        providers[name] = {
            "status": state.health.status(name) if available else "degraded",
            "base_url": upstream.config.base_url,
            "streaming_support": True,
            "requests": counters.requests,
            "errors": counters.errors,
            "active_streams": counters.active_streams,
            "upstreams": upstreams,
        }
    features = runtime.config.features
    return {
        "status": "draining" if state.draining else "healthy",
        "version": state.build.version,
        "uptime_seconds": round(now - state.started_at, 3),
        "build": state.build.as_dict(),
        "connections": {
            "open": state.open_connections(),
            "max": runtime.config.server.max_connections,
        },
        "rate_limiter": limiter_status(runtime.limiter),
        "providers": providers,
        "features": {
            "rate_limiting": features.rate_limiting.enabled,
            "cost_tracking": features.cost_tracking.enabled,
            "metrics": features.metrics.enabled,
        },
    }
