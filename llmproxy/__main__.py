# -*- test-case-name: llmproxy.test.test_main -*-
"""
C{python -m llmproxy check-config PATH...} and C{python -m llmproxy version}.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TextIO

import orjson

from llmproxy import buildinfo
from llmproxy.config import ConfigError, load_config

USAGE = "usage: python -m llmproxy check-config PATH... | version\n"


def main(argv: Sequence[str], out: TextIO, err: TextIO) -> int:
    """
    Run a command; returns the exit status.
    """
    if not argv:
        err.write(USAGE)
        return 2
    command, args = argv[0], list(argv[1:])
    if command == "check-config":
        if not args:
            err.write("usage: python -m llmproxy check-config PATH...\n")
            return 2
        try:
            config = load_config(args, os.environ)
        except ConfigError as error:
            err.write(f"{error}\n")
            return 1
        providers = ", ".join(sorted(config.providers))
        out.write(f"ok: {' + '.join(args)} (providers: {providers})\n")
        return 0
    if command == "version":
        out.write(orjson.dumps(buildinfo.load().as_dict(), option=orjson.OPT_INDENT_2).decode())
        out.write("\n")
        return 0
    err.write(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], sys.stdout, sys.stderr))
