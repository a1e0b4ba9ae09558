# -*- test-case-name: tests.e2e.test_daemon -*-
"""
Run the real daemon (C{twistd -n llmproxy}) as a child process for
end-to-end tests, compatibility suites and benchmarks.

The process listens on C{tcp:0} and the port is read from its own
"listening on" log line, so parallel tests never race for a port. With
C{workers}, the daemon is a master with that many workers, and it counts as
started once its "N workers serving" line says they all serve.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

REPO_ROOT = Path(__file__).resolve().parents[2]

_PORT_LINE = re.compile(rb"listening on \S*\(.*?port=(\d+)")
_WORKERS_LINE = re.compile(rb"\] (\d+) workers serving on ")


def twistd_command() -> list[str]:
    """
    The command that runs twistd with this interpreter.
    """
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class _Protocol(ProcessProtocol):
    def __init__(self, owner: ProxyProcess) -> None:
        self.owner = owner

    def outReceived(self, data: bytes) -> None:
        self.owner._output(data)

    def errReceived(self, data: bytes) -> None:
        self.owner._output(data)

    def processEnded(self, reason: Failure) -> None:
        self.owner._ended(reason)


class ProxyProcess:
    """
    One running daemon.

    @ivar port: the TCP port it listens on (set once started).
    @ivar output: everything it printed, stdout and stderr interleaved.
    @ivar exit_code: set once it has exited.
    """

    def __init__(self, reactor: Any, workers: int | None = None) -> None:
        self._reactor = reactor
        self.workers = workers
        self.output = b""
        self.port: int | None = None
        self.exit_code: int | None = None
        self._started: Deferred[ProxyProcess] | None = None
        self._exit_waiters: list[Deferred[int]] = []
        self._transport: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """
        The process id, while it runs.
        """
        if self.exit_code is not None or self._transport is None:
            return None
        pid: int | None = self._transport.pid
        return pid

    @classmethod
    def start(
        cls,
        reactor: Any,
        config_paths: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        listen: Sequence[str] = ("tcp:0:interface=127.0.0.1",),
        timeout: float = 30.0,
        wait_for_port: bool = True,
        workers: int | None = None,
    ) -> Deferred[ProxyProcess]:
        """
        Spawn the daemon; the Deferred fires once it listens (with
        C{workers}: once every worker serves; with C{wait_for_port=False}:
        at once), or fails with its output if it exits or stays silent for
        C{timeout} seconds.
        """
        proc = cls(reactor, workers)
        args = [*twistd_command(), "-n", "--pidfile=", "llmproxy"]
        if workers is not None:
            args += ["--workers", str(workers)]
        for path in config_paths:
            args += ["--config", path]
        for description in listen:
            args += ["--listen", description]
        args += list(extra_args)
        environ = dict(os.environ)
        environ["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [environ.get("PYTHONPATH")])]
        )
        environ.pop("PORT", None)
        if env:
            environ.update(env)
        started: Deferred[ProxyProcess] = Deferred()
        proc._started = started
        proc._transport = reactor.spawnProcess(
            _Protocol(proc), args[0], args, env=environ, path=str(REPO_ROOT)
        )
        if not wait_for_port:
            proc._started = None
            started.callback(proc)
            return started
        timer = reactor.callLater(timeout, proc._start_timed_out)
        started.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        return started

    def _output(self, data: bytes) -> None:
        self.output += data
        if self.port is None:
            match = _PORT_LINE.search(self.output)
            if match is not None:
                self.port = int(match.group(1))
        if self.port is not None and self._started is not None and self._all_serve():
            started, self._started = self._started, None
            started.callback(self)

    def _all_serve(self) -> bool:
        if self.workers is None:
            return True
        match = _WORKERS_LINE.search(self.output)
        return match is not None and int(match.group(1)) == self.workers

    def _start_timed_out(self) -> None:
        started, self._started = self._started, None
        if started is None:
            return
        self.send_signal(signal.SIGKILL)
        error = RuntimeError(
            "llmproxy did not start in time (its 'listening on' line needs logging.level "
            "info or debug):\n" + self.output.decode("utf-8", "replace")
        )

        def fail(_: object) -> None:
            started.errback(error)

        # Fail only once the killed process is reaped, so no process is left
        # behind in the reactor.
        self.wait_exit().addBoth(fail)

    def _ended(self, reason: Failure) -> None:
        if reason.check(ProcessDone):
            self.exit_code = 0
        elif reason.check(ProcessTerminated):
            value: Any = reason.value
            self.exit_code = value.exitCode if value.exitCode is not None else -(value.signal or 0)
        else:
            self.exit_code = -1
        started, self._started = self._started, None
        if started is not None:
            started.errback(
                RuntimeError(
                    f"llmproxy exited with {self.exit_code} before listening:\n"
                    + self.output.decode("utf-8", "replace")
                )
            )
        waiters, self._exit_waiters = self._exit_waiters, []
        for waiter in waiters:
            waiter.callback(self.exit_code)

    def send_signal(self, signum: int) -> None:
        if self.exit_code is None and self._transport is not None:
            self._transport.signalProcess(signum)

    def wait_exit(self) -> Deferred[int]:
        waiter: Deferred[int] = Deferred()
        if self.exit_code is not None:
            waiter.callback(self.exit_code)
        else:
            self._exit_waiters.append(waiter)
        return waiter

    def stop(self, kill_after: float = 15.0) -> Deferred[int]:
        """
        SIGTERM, then SIGKILL if it has not exited after C{kill_after} seconds.
        """
        done = self.wait_exit()
        if self.exit_code is None:
            self.send_signal(signal.SIGTERM)
            killer = self._reactor.callLater(kill_after, self.send_signal, signal.SIGKILL)
            done.addBoth(lambda result: (killer.active() and killer.cancel(), result)[1])
        return done
