# -*- test-case-name: llmproxy.test.test_group_health -*-
"""
A worker's view of its group: what it tells the others about itself, and
what it can learn about all of them.

Each worker provides named snapshots of itself (C{"health"}: its counters;
a status page would add C{"status"}). When a page must describe the whole
group, the worker that answers gathers: it asks the master, the master
asks every serving worker for that snapshot (the asker included) and
answers with all of them plus its own facts (L{Gathered}). The page then
merges them (L{llmproxy.group.health} for C{/health}). Gathering costs a
round trip to every worker, which is right for pages a person or a load
balancer polls every few seconds, not for anything per request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred

from llmproxy.group.channel import GROUP, Caller, RemoteError

GATHER_TIMEOUT = 3.0
"""Seconds a worker waits for the master's answer to a gather."""

SNAPSHOT_TIMEOUT = 1.0
"""Seconds the master waits for each worker's snapshot."""


@frozen
class MasterFacts:
    """
    What the master knows about the group.

    @ivar started_at: when the master started (the group's uptime).
    @ivar draining: whether the group is shutting down.
    @ivar workers: how many workers it runs.
    @ivar spare: the pid of the booted spare worker, if there is one.
    """

    pid: int
    started_at: float
    draining: bool
    workers: int
    spare: int | None


@frozen
class WorkerSnapshot:
    """
    One worker's answer to a gather.

    @ivar status: C{serving}; C{starting} (not ready yet: no snapshot),
        C{unresponsive} (did not answer in time: no snapshot).
    @ivar snapshot: what the worker provided, as JSON data.
    """

    index: int
    pid: int | None
    status: str
    snapshot: Any


@frozen
class Gathered:
    """
    Every worker's snapshot of one name, and the master's facts.
    """

    master: MasterFacts
    workers: tuple[WorkerSnapshot, ...]

    def to_json(self) -> dict[str, Any]:
        master = self.master
        return {
            "master": [
                master.pid,
                master.started_at,
                master.draining,
                master.workers,
                master.spare,
            ],
            "workers": [[w.index, w.pid, w.status, w.snapshot] for w in self.workers],
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Gathered:
        return cls(
            MasterFacts(*value["master"]),
            tuple(WorkerSnapshot(*entry) for entry in value["workers"]),
        )


class GroupView:
    """
    A worker's view of its group, over its channel to the master.

    @ivar index: this worker's number in the group (0 to N - 1).
    """

    def __init__(self, master: Caller, index: int) -> None:
        self._master = master
        self.index = index
        self._providers: dict[str, Callable[[], Any]] = {}

    def provide(self, name: str, snapshot: Callable[[], Any]) -> None:
        """
        Answer gathers of C{name} with C{snapshot()} (JSON data).
        """
        self._providers[name] = snapshot

    def snapshot(self, name: str) -> Any:
        """
        This worker's snapshot of C{name}, for the master.
        """
        provider = self._providers.get(name)
        if provider is None:
            raise RemoteError(f"worker {self.index} provides no snapshot {name!r}")
        return provider()

    def gather(self, name: str) -> Deferred[Gathered]:
        """
        Every serving worker's snapshot of C{name}.
        """
        asked = self._master.call(GROUP, ["gather", name], GATHER_TIMEOUT)
        return asked.addCallback(Gathered.from_json)
