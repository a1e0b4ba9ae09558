# -*- test-case-name: llmproxy.test.test_group_health -*-
"""
C{/health} for a whole group of workers, whichever worker answers.

Each worker provides a C{"health"} snapshot (L{health_snapshot}): its own
report plus the raw facts a merge needs. The answering worker gathers every
worker's and merges them (L{merge_health}):

  - counters (C{requests}, C{errors}, C{active_streams}, an upstream's
    C{in_flight}) are summed;
  - a provider is C{degraded} when the last 5 upstream attempts of the
    whole group all failed within 60 seconds (the attempts of every worker,
    in time order), or when no worker has a healthy upstream for it;
  - an upstream's C{status} is the most severe any worker reports
    (C{rate_limited}, C{open}, C{half_open}, C{healthy}), and its
    C{open_models} those open in any worker: each worker keeps its own
    circuits;
  - C{status} is C{draining} once the master (or the answering worker)
    drains; C{uptime_seconds} is the master's;
  - C{workers} lists each worker: its pid, whether it serves, how many
    requests it has received, how many it holds now and how many of those
    are streams being relayed; C{spare_worker} the booted spare (its pid),
    if there is one.

If the master does not answer, the worker answers with its own report and
says so in C{"group"}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.group.channel import describe
from llmproxy.group.view import Gathered, GroupView
from llmproxy.health import merge_upstream, status_of
from llmproxy.healthreport import health_report
from llmproxy.runtime import ProxyState

log = Logger(namespace="llmproxy.group")


def health_snapshot(state: ProxyState) -> dict[str, Any]:
    """
    One worker's C{"health"} snapshot.
    """
    return {
        "report": health_report(state),
        "recent": {
            name: list(state.health.provider(name).recent) for name in state.runtime.upstreams
        },
        "received": state.received,
        "in_flight": state.inflight,
        "started_at": state.started_at,
    }


def _merge_provider(
    mine: dict[str, Any], name: str, snapshots: list[dict[str, Any]], now: float
) -> dict[str, Any]:
    reports = [
        found
        for found in (snapshot["report"]["providers"].get(name) for snapshot in snapshots)
        if found is not None
    ]
    merged = dict(mine)
    for counter in ("requests", "errors", "active_streams"):
        merged[counter] = sum(report[counter] for report in reports)
    upstreams = {}
    for endpoint, entry in mine["upstreams"].items():
        entries = [
            report["upstreams"][endpoint] for report in reports if endpoint in report["upstreams"]
        ]
        upstreams[endpoint] = merge_upstream(entry, entries)
    merged["upstreams"] = upstreams
    available = any(
        report["upstreams"][endpoint]["status"] == "healthy"
        for report in reports
        for endpoint in mine["upstreams"]
        if endpoint in report["upstreams"]
    )
    recent = [snapshot["recent"].get(name, []) for snapshot in snapshots]
    merged["status"] = status_of(recent, now) if available else "degraded"
    return merged


def merge_health(local: dict[str, Any], gathered: Gathered, now: float) -> dict[str, Any]:
    """
    The group's health, in the shape of the answering worker's C{local}
    report, from every worker's snapshot.
    """
    snapshots = [w.snapshot for w in gathered.workers if w.snapshot is not None]
    body = dict(local)
    body["providers"] = {
        name: _merge_provider(mine, name, snapshots, now)
        for name, mine in local["providers"].items()
    }
    if snapshots and "connections" in local:
        # Each worker keeps server.max_connections for itself.
        body["connections"] = {
            "open": sum(s["report"]["connections"]["open"] for s in snapshots),
            "max": local["connections"]["max"] * len(gathered.workers),
        }
    if gathered.master.draining:
        body["status"] = "draining"
    body["uptime_seconds"] = round(now - gathered.master.started_at, 3)
    body["spare_worker"] = (
        {"pid": gathered.master.spare} if gathered.master.spare is not None else None
    )
    body["workers"] = [
        {
            "index": worker.index,
            "pid": worker.pid,
            "status": worker.status,
            "requests": worker.snapshot["received"] if worker.snapshot else None,
            "in_flight": worker.snapshot["in_flight"] if worker.snapshot else None,
            "active_streams": (
                sum(p["active_streams"] for p in worker.snapshot["report"]["providers"].values())
                if worker.snapshot
                else None
            ),
            "uptime_seconds": (
                round(now - worker.snapshot["started_at"], 3) if worker.snapshot else None
            ),
        }
        for worker in gathered.workers
    ]
    return body


def group_health(view: GroupView, state: ProxyState) -> Deferred[dict[str, Any]]:
    """
    The group's C{/health} body, as seen from this worker.
    """

    def merged(gathered: Gathered) -> dict[str, Any]:
        return merge_health(health_report(state), gathered, state.clock.seconds())

    def alone(failure: Failure) -> dict[str, Any]:
        log.warn(
            "/health: the master did not answer ({error}); answering for this worker only",
            error=describe(failure),
        )
        body = health_report(state)
        body["group"] = f"the master did not answer: worker {view.index} alone"
        return body

    return view.gather("health").addCallbacks(merged, alone)
