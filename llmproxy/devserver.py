"""
C{make dev}: run the daemon and restart it whenever a source or config file
changes. A development tool only: it polls modification times once a second
from its own process, outside the reactor.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

WATCHED = ("llmproxy", "configs", "twisted/plugins")
SUFFIXES = (".py", ".yml", ".yaml")


def snapshot(roots: Iterable[str]) -> dict[str, float]:
    """
    Modification times of every watched file.
    """
    times: dict[str, float] = {}
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.suffix in SUFFIXES and path.is_file():
                try:
                    times[str(path)] = path.stat().st_mtime
                except OSError:
                    continue
    return times


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    command = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    command += ["-n", "--pidfile=", "llmproxy"]
    for path in args.config:
        command += ["--config", path]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    seen = snapshot(WATCHED)
    child = subprocess.Popen(command, env=env)
    try:
        while True:
            time.sleep(args.interval)
            now = snapshot(WATCHED)
            if now != seen:
                seen = now
                print("llmproxy dev: change detected, restarting", file=sys.stderr)
                child.terminate()
                child.wait()
                child = subprocess.Popen(command, env=env)
    except KeyboardInterrupt:
        child.terminate()
        return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
