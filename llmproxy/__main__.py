# -*- test-case-name: llmproxy.test.test_main -*-
"""
C{python -m llmproxy check-config PATH...}, C{python -m llmproxy new-key
--id ID} and C{python -m llmproxy version}.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
from collections.abc import Sequence
from typing import TextIO

import orjson

from llmproxy import buildinfo
from llmproxy.config import ConfigError, load_config
from llmproxy.config.auth import KEY_ID
from llmproxy.identity import PROXY_KEY_PREFIX

USAGE = "usage: python -m llmproxy check-config PATH... | new-key --id ID | version\n"

KEY_BYTES = 32
"""Random bytes in a new key: 256 bits, beyond guessing or brute force."""


def new_key(key_id: str, out: TextIO) -> None:
    """
    Print a fresh proxy key, once, and the C{auth.keys} entry that accepts
    it (its SHA-256: the key itself is not kept anywhere).
    """
    key = PROXY_KEY_PREFIX.decode("ascii") + secrets.token_urlsafe(KEY_BYTES)
    digest = hashlib.sha256(key.encode("ascii")).hexdigest()
    out.write(
        "New proxy key (shown once; llmproxy keeps only its hash):\n"
        f"{key}\n"
        "\n"
        "Add this entry under auth.keys, then reload (SIGHUP):\n"
        f"  - id: {key_id}\n"
        f'    hash: "sha256:{digest}"\n'
    )


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
    if command == "new-key":
        if len(args) != 2 or args[0] != "--id":
            err.write("usage: python -m llmproxy new-key --id ID\n")
            return 2
        if not KEY_ID.fullmatch(args[1]):
            err.write(
                f"new-key: bad id {args[1]!r}: up to 64 letters, digits, '.', '_' and '-', "
                "starting with a letter or digit\n"
            )
            return 2
        new_key(args[1], out)
        return 0
    if command == "version":
        out.write(orjson.dumps(buildinfo.load().as_dict(), option=orjson.OPT_INDENT_2).decode())
        out.write("\n")
        return 0
    err.write(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], sys.stdout, sys.stderr))
