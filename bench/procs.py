"""
Starting, pinning, waiting for and always stopping the processes a benchmark
run needs: nginx, the Python upstream, redis-server, the proxies, and the load
tools.

Every child starts in its own session (so a Ctrl-C at the terminal reaches
only the driver, which then stops them in order) and is remembered by pid;
L{Processes.stop_all} ends exactly those pids: SIGTERM, a grace period, then
SIGKILL.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from attrs import define, field


class BenchError(Exception):
    """
    A part of the run could not be set up; the message says what and why.
    """


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, deadline: float, process: subprocess.Popen[bytes]) -> None:
    """
    Wait until 127.0.0.1:C{port} accepts connections, or fail if C{process}
    exits or C{deadline} (a C{time.monotonic} value) passes.
    """
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"exited with status {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"not listening on port {port} in time")


def http_request(
    port: int, method: str, path: str, body: bytes | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    """
    One plain HTTP request to 127.0.0.1:C{port}; (status, body).
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-not-a-key"}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@define
class Pinning:
    """
    Which CPUs the load side (upstreams, clients, driver) and the proxy use.

    @ivar load: CPU list for the upstreams and clients, or C{None} if unpinned.
    @ivar proxy: CPU list for the proxies, or C{None} if unpinned.
    @ivar note: how the pinning was decided, for the report.
    """

    load: str | None
    proxy: str | None
    note: str

    @classmethod
    def detect(cls) -> Pinning:
        """
        Two or more CPUs and C{taskset}: load side on the first, proxy on
        the second.  Otherwise nothing is pinned and the report says so.
        """
        cpus = sorted(os.sched_getaffinity(0))
        if shutil.which("taskset") is None:
            return cls(None, None, "not pinned: taskset missing (apt-get install -y util-linux)")
        if len(cpus) < 2:
            return cls(None, None, "not pinned: only one CPU available")
        load, proxy = str(cpus[0]), str(cpus[1])
        return cls(load, proxy, f"upstreams + clients on CPU {load}, proxy on CPU {proxy}")

    def wrap(self, cpus: str | None, argv: Sequence[str]) -> list[str]:
        """
        C{argv} prefixed with C{taskset -c CPUS} when pinning is on.  taskset
        execs the command, so the pid stays the command's own.
        """
        if cpus is None:
            return list(argv)
        return ["taskset", "-c", cpus, *argv]


@define
class Processes:
    """
    The children of one run.
    """

    tmp: Path
    _children: list[tuple[str, subprocess.Popen[bytes]]] = field(factory=list)
    _logs: list[IO[bytes]] = field(factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """
        Start a long-running child whose output goes to C{<tmp>/<name>.log}.
        """
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop_all
        self._logs.append(log)
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
        self._children.append((name, process))
        return process

    def log_tail(self, name: str, lines: int = 15) -> str:
        """
        The end of a child's log, for error messages.
        """
        path = self.tmp / f"{name}.log"
        if not path.exists():
            return ""
        text = path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def run(
        self, argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None
    ) -> tuple[int, str, str]:
        """
        Run a load tool to completion: (exit status, stdout, stderr).  It is
        tracked while it runs, so an interrupt stops it too.
        """
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        self._children.append(("tool", process))
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(process)
            out, err = process.communicate()
            return -1, out.decode(errors="replace"), "timed out\n" + err.decode(errors="replace")
        finally:
            self._forget(process)
        return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def _forget(self, process: subprocess.Popen[bytes]) -> None:
        self._children = [(n, p) for n, p in self._children if p is not process]

    def stop(self, process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        """
        SIGTERM, wait up to C{grace} seconds, then SIGKILL; by pid only.
        """
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait(timeout=5)
        self._forget(process)

    def stop_all(self) -> None:
        """
        Stop every child still running, newest first (proxies before the
        upstreams they talk to), and close the log files.
        """
        for _, process in reversed(list(self._children)):
            self.stop(process)
        for log in self._logs:
            log.close()
        self._logs.clear()


def proc_status(pid: int) -> dict[str, int]:
    """
    The kB figures of C{/proc/<pid>/status} (VmRSS, VmHWM, ...); empty if
    the process is gone.
    """
    result: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return result
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            result[name] = int(parts[0])
    return result


def cpu_seconds(pid: int) -> float:
    """
    User + system CPU time a process has used so far (from
    C{/proc/<pid>/stat}, in clock ticks of usually 10 ms); 0 if it is gone.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces; fields after its ")" are plain.
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    return ticks / os.sysconf("SC_CLK_TCK")


def core_times(cpu: int) -> tuple[float, float]:
    """
    (busy, total) seconds CPU C{cpu} has accumulated since boot, from
    C{/proc/stat}; busy is everything but idle and iowait, steal included.
    """
    tick = os.sysconf("SC_CLK_TCK")
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            values = [int(value) for value in line.split()[1:9]]
            user, nice, system, idle, iowait, irq, softirq, steal = values
            busy = user + nice + system + irq + softirq + steal
            return busy / tick, (busy + idle + iowait) / tick
    return 0.0, 0.0
