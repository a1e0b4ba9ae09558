"""
Say which provider API keys the live tests will find, without printing any
key: C{python -m tests.live.envcheck} (C{make env-check}).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TextIO

from tests.live.support import PROVIDER_KEYS


def report(environ: Mapping[str, str], out: TextIO) -> int:
    """
    Write one line per provider key: set or not, and which C{make} target
    runs or skips because of it.  Returns how many keys are set.

    A variable holding only whitespace counts as unset, as it does for the
    tests.
    """
    found = 0
    for variable, (label, target) in PROVIDER_KEYS.items():
        present = bool(environ.get(variable, "").strip())
        found += present
        state = "set" if present else "not set"
        effect = "runs" if present else "skips"
        out.write(f"{variable:<18} {state:<8} ({label}: make {target} {effect})\n")
    out.write(f"{found} of {len(PROVIDER_KEYS)} provider keys set; values are never printed.\n")
    return found


def main() -> None:
    report(os.environ, sys.stdout)


if __name__ == "__main__":
    main()
