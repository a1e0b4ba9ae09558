# -*- test-case-name: llmproxy.test.test_ratelimit_redis -*-
"""
A private C{redis-server} for tests: its own free loopback port, no
persistence, started and stopped by the test that needs it.

Tests skip (with L{REDIS_SERVER_MISSING} as the reason) only when the
C{redis-server} binary is not installed.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from urllib.parse import quote

REDIS_SERVER = shutil.which("redis-server")
"""Path of the C{redis-server} binary, or C{None}."""

REDIS_SERVER_MISSING = "redis-server is not installed (apt-get install redis-server)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def redis_server_command(
    binary: str, port: int, directory: str, password: str | None = None
) -> list[str]:
    """
    The command line of a private C{redis-server}: in the foreground, on
    127.0.0.1:C{port} only, with no persistence (no snapshots, no
    append-only file) and C{directory} as its working directory.

    @param password: what clients must C{AUTH} with, if anything.
    """
    command = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        directory,
        "--daemonize",
        "no",
    ]
    if password:
        command += ["--requirepass", password]
    return command


def _encode(*args: str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RedisServer:
    """
    One C{redis-server} process on 127.0.0.1.

    @ivar port: the port it listens on; kept across L{stop} and L{start} so a
        test can restart the server where clients expect it.
    """

    def __init__(self, password: str | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError(REDIS_SERVER_MISSING)
        self._binary = REDIS_SERVER
        self.password = password
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="llmproxy-redis-")

    def url(self, db: int = 0) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 10.0) -> None:
        """
        Start the server and wait until it answers C{PING}.  Without a port
        yet, a free one is picked (again, if another process took it first).
        """
        fixed = bool(self.port)
        for _ in range(1 if fixed else 5):
            if not fixed:
                self.port = _free_port()
            if self._spawn(timeout):
                return
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def _spawn(self, timeout: float) -> bool:
        command = redis_server_command(self._binary, self.port, self._dir, self.password)
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            if self._answers():
                self._process = process
                return True
            time.sleep(0.01)
        process.kill()
        process.wait()
        return False

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                command = _encode("PING")
                if self.password:
                    command = _encode("AUTH", self.password) + command
                connection.sendall(command)
                reply = b""
                while b"PONG" not in reply and b"-" not in reply[:1]:
                    chunk = connection.recv(1024)
                    if not chunk:
                        return False
                    reply += chunk
                return b"PONG" in reply
        except OSError:
            return False

    def stop(self) -> None:
        """
        Kill the server (as a crash would) and wait for it to exit.
        """
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """
        Freeze the server (C{SIGSTOP}): connections stay open, nothing
        answers, as with a server starved of CPU or stuck.
        """
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
