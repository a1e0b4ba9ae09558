# -*- test-case-name: llmproxy.test.test_fake_upstream -*-
"""
The fake upstream standalone, for process-level tests and benchmarks::

    python -m llmproxy.testing.fake_upstream --port 0 [--interface 127.0.0.1]
        [--default x-fake-delay-ms=20 ...] [--no-auth]

prints the bound port number on a line of its own once it is listening and
serves until SIGINT or SIGTERM.  It records neither requests nor response
bodies: nobody reads them, and a long benchmark would grow them forever.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort

from llmproxy.testing.fake_upstream.knobs import KNOBS
from llmproxy.testing.fake_upstream.server import FakeUpstream, listen


def _options(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmproxy.testing.fake_upstream",
        description="Serve the fake LLM upstream; print the bound port on stdout.",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (0: any free one)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to bind")
    parser.add_argument(
        "--default",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="a knob default for every request, e.g. x-fake-delay-ms=20 (repeatable)",
    )
    parser.add_argument("--no-auth", action="store_true", help="do not check credentials")
    options = parser.parse_args(list(argv))
    for item in options.default:
        name, equals, _ = item.partition("=")
        if not equals or name.strip().lower() not in KNOBS:
            parser.error(f"--default: expected KNOB=VALUE with a known knob, got {item!r}")
    return options


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run the fake until SIGINT/SIGTERM.
    """
    from twisted.internet.task import react

    options = _options(sys.argv[1:] if argv is None else argv)

    def run(reactor: Any) -> Deferred[None]:
        fake = FakeUpstream(reactor)
        fake.require_auth = not options.no_auth
        fake.record_bodies = False
        fake.record_requests = False
        for item in options.default:
            name, _, value = item.partition("=")
            fake.defaults[name.strip().lower()] = value.strip()
        listening = listen(fake, reactor, options.port, options.interface)

        def announce(port: IListeningPort) -> Deferred[None]:
            print(port.getHost().port, flush=True)  # type: ignore[attr-defined]
            return Deferred()

        return listening.addCallback(announce)

    react(run)


if __name__ == "__main__":
    main()
