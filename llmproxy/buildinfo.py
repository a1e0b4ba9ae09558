# -*- test-case-name: llmproxy.test.test_buildinfo -*-
"""
What build is running: package version, git commit, build time, Python and
Twisted versions.

C{make install} and C{make build} write C{llmproxy/_build.json}; a checkout
without it falls back to reading C{.git} once at startup (never on the
request path).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import twisted
from attrs import asdict, frozen

import llmproxy

_BUILD_FILE = Path(__file__).with_name("_build.json")


@frozen
class BuildInfo:
    version: str
    commit: str | None
    built_at: str | None
    python: str
    twisted: str

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def _git_commit(start: Path) -> str | None:
    """
    Read the commit of a checkout without running git: follow HEAD to a loose
    ref or to C{packed-refs}.
    """
    for directory in (start, *start.parents):
        git = directory / ".git"
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref: "):
                return head or None
            ref = head[5:]
            loose = git / ref
            if loose.exists():
                return loose.read_text().strip() or None
            packed = git / "packed-refs"
            if packed.exists():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split(" ", 1)[0]
        except OSError:
            return None
        return None
    return None


def load() -> BuildInfo:
    """
    Gather the build information; called once at startup.
    """
    commit: str | None = os.environ.get("LLMPROXY_BUILD_COMMIT") or None
    built_at: str | None = os.environ.get("LLMPROXY_BUILD_TIME") or None
    try:
        recorded = json.loads(_BUILD_FILE.read_text())
        commit = commit or recorded.get("commit")
        built_at = built_at or recorded.get("built_at")
    except (OSError, ValueError):
        pass
    if commit is None:
        commit = _git_commit(Path(__file__).resolve().parent)
    return BuildInfo(
        version=llmproxy.__version__,
        commit=commit,
        built_at=built_at,
        python=platform.python_version(),
        twisted=twisted.__version__,
    )
