# -*- test-case-name: llmproxy.test.test_config_checks -*-
"""
What a configuration error says: L{ConfigError}, and how its messages name
a key path and show a value.

The checker and the file loader both write these messages, so their form
is kept in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class ConfigError(Exception):
    """
    The configuration is invalid; nothing was loaded.

    Each message names the file and the dotted key path it is about, in the
    form C{<file>: <key.path>: <what was expected>, got <value>}, so an
    operator can fix every problem in one pass rather than one per restart.

    @ivar errors: every problem found, in file order.
    """

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


Segment = str | int
"""A key (C{str}) or a list index (C{int}) in a path through the YAML tree."""

KeyPath = tuple[Segment, ...]

Locate = Callable[[KeyPath], str]
"""Names the file that set the value at a path, for error messages."""


def segment(key: object) -> str:
    """
    The path segment for a mapping key: YAML allows non-string keys, which
    the validator rejects, so they are shown as their repr.
    """
    return key if isinstance(key, str) else repr(key)


def _dotted(path: KeyPath) -> str:
    """
    C{("features", "cost_tracking", "transports", 0, "type")} ->
    C{features.cost_tracking.transports[0].type}.
    """
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


def show(value: object) -> str:
    """
    The value in an error message: its repr (C{'ten'}, C{True}, C{-1}), cut
    short so a whole mapping does not flood the terminal.
    """
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def error_line(source: str, path: KeyPath, message: str) -> str:
    """
    One error as L{ConfigError} holds it: C{<source>: <key.path>: <message>}.
    """
    return f"{source}: {_dotted(path)}: {message}"
