# -*- test-case-name: llmproxy.test.test_group_status -*-
"""
C{/status.json} (the data of C{/status}) for a whole group of workers,
whichever worker answers.

Each worker provides a C{"status"} snapshot: its status board's part
(L{llmproxy.status.board.StatusBoard.part}: recent per-second counts,
TTFB histograms, the day's tables, its last errors, its providers' and
upstreams' live counters). The answering worker gathers every worker's
and composes the page's data from all of them
(L{llmproxy.status.document.compose}: counts and tables summed,
histograms merged before quantiles are read, the newest 50 errors of all,
each upstream at the most severe state any worker has for it). The
uptime is the master's, and C{workers} lists each worker and its state.

If the master does not answer, the worker answers with its own data and
says so in C{"group"}, as C{/health} does.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from llmproxy.group.channel import describe
from llmproxy.group.view import Gathered, GroupView
from llmproxy.runtime import ProxyState
from llmproxy.status.document import compose

log = Logger(namespace="llmproxy.group")


def status_snapshot(state: ProxyState) -> dict[str, Any]:
    """
    One worker's C{"status"} snapshot.
    """
    return state.status.part(state)


def merge_status(state: ProxyState, gathered: Gathered, asking: int = 0) -> dict[str, Any]:
    """
    The group's status data, composed in the answering worker (C{state})
    from every worker's snapshot.

    @param asking: requests in flight that are the answer's own.
    """
    parts = [worker.snapshot for worker in gathered.workers if worker.snapshot is not None]
    master = gathered.master
    body = compose(
        state, parts, asking=asking, started_at=master.started_at, draining=master.draining
    )
    body["workers"] = [
        {"index": worker.index, "pid": worker.pid, "status": worker.status}
        for worker in gathered.workers
    ]
    return body


def group_status(view: GroupView, state: ProxyState, asking: int = 0) -> Deferred[dict[str, Any]]:
    """
    The group's C{/status.json} body, as seen from this worker.
    """

    def merged(gathered: Gathered) -> dict[str, Any]:
        return merge_status(state, gathered, asking)

    def alone(failure: Failure) -> dict[str, Any]:
        log.warn(
            "/status: the master did not answer ({error}); answering for this worker only",
            error=describe(failure),
        )
        body = state.status.snapshot(state, asking)
        body["group"] = f"the master did not answer: worker {view.index} alone"
        return body

    return view.gather("status").addCallbacks(merged, alone)
