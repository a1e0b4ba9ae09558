# -*- test-case-name: llmproxy.test.test_group_listeners -*-
"""
What the master tells each worker it starts, and the environment it
starts it in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import orjson
from attrs import frozen

import llmproxy
from llmproxy.group.listeners import Inherited

SYSTEMD_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)
"""systemd talks to the master only: a worker must not see these."""

METRICS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


@frozen
class WorkerSpec:
    """
    What the master tells a worker it starts.

    @ivar index: the worker's number in the group (0 to N - 1), or -1 for
        the spare (see L{llmproxy.group.worker}).
    @ivar configs: the C{--config} files, as the master was given them.
    @ivar listeners: the inherited listening sockets, in listen order.
    @ivar state: the path of the master's state service socket.
    @ivar metrics: the group's metrics directory.
    """

    index: int
    configs: tuple[str, ...]
    listeners: tuple[Inherited, ...]
    state: str
    metrics: str

    def to_json(self) -> str:
        return orjson.dumps(
            {
                "index": self.index,
                "configs": list(self.configs),
                "listeners": [listener.to_json() for listener in self.listeners],
                "state": self.state,
                "metrics": self.metrics,
            }
        ).decode()

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        value = orjson.loads(text)
        return cls(
            index=int(value["index"]),
            configs=tuple(value["configs"]),
            listeners=tuple(Inherited.from_json(item) for item in value["listeners"]),
            state=str(value["state"]),
            metrics=str(value["metrics"]),
        )


def worker_environment(environ: Mapping[str, str], metrics: str) -> dict[str, str]:
    """
    A worker's environment: the master's (so C{${VAR}} in the configuration
    expands the same), without systemd's variables, with the group's
    metrics directory, and with this copy of llmproxy first on the path.
    """
    env = {key: value for key, value in environ.items() if key not in SYSTEMD_VARIABLES}
    env[METRICS_VARIABLE] = metrics
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(llmproxy.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [environ.get("PYTHONPATH")])])
    return env
