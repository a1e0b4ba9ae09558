# -*- test-case-name: llmproxy.test.test_config_load -*-
"""
Reading configuration files: YAML with duplicate keys refused, C{extends}
chains, C{${VAR}} expansion, deep merge in order, and remembering which
file set each key so that an error names that file.

What the merged mapping may contain is L{llmproxy.config.validate}'s
business; this module only gets it there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import yaml

from llmproxy.config.checks import Expanded
from llmproxy.config.errors import ConfigError, KeyPath, Locate, error_line, segment, show
from llmproxy.config.model import Config
from llmproxy.config.validate import validate

MAX_VALUES = 100_000
"""
Most values a configuration file may hold once its YAML aliases and merge
keys are expanded: a few hundred bytes of nested aliases can otherwise
stand for billions of values.
"""

MAX_DEPTH = 64
"""Deepest nesting of mappings and lists a configuration file may have."""


class _Loader(yaml.SafeLoader):
    """
    PyYAML's safe loader, except that a key given twice in one mapping is an
    error (PyYAML silently keeps the last, hiding a typo'd override), and
    that merge keys (C{<<}) may not expand past L{MAX_VALUES} entries in all.
    """

    _entries = 0

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        super().flatten_mapping(node)
        self._entries += len(node.value)
        if self._entries > MAX_VALUES:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"mappings (with their merge keys) expand past {MAX_VALUES} entries",
                node.start_mark,
            )

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def _expand(
    value: object, path: KeyPath, source: str, environ: Mapping[str, str], errors: list[str]
) -> object:
    """
    Expand C{${VAR}} and C{${VAR:-default}} in every string value (not in
    keys).  As in the shell, the default applies when C{VAR} is unset or
    empty; C{$${} writes a literal C{${}.
    """
    if isinstance(value, dict):
        return {
            key: _expand(item, (*path, segment(key)), source, environ, errors)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [
            _expand(item, (*path, index), source, environ, errors)
            for index, item in enumerate(value)
        ]
    if not isinstance(value, str) or _REFERENCE.search(value) is None:
        return value
    problems: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if name is None:
            problems.append("expected ${NAME} or ${NAME:-default} after '${'")
            return text
        found = environ.get(name, "")
        if found:
            return found
        if default is not None:
            return default
        if name in environ:
            return ""
        problems.append(f"expected environment variable {name} to be set (or ${{{name}:-default}})")
        return text

    expanded = _REFERENCE.sub(substitute, value)
    for problem in problems:
        errors.append(error_line(source, path, f"{problem}, got {show(value)}"))
    return Expanded(expanded)


def _read_yaml(source: str, errors: list[str]) -> dict[str, object] | None:
    """
    Parse one file; problems are appended to C{errors}.

    @return: its mapping (an empty file is an empty mapping), or L{None}.
    """
    try:
        with open(source, "rb") as stream:
            data = yaml.load(stream, Loader=_Loader)  # a SafeLoader subclass
    except RecursionError:
        errors.append(f"{source}: invalid YAML: nested too deeply (at most {MAX_DEPTH} levels)")
        return None
    except OSError as error:
        errors.append(f"{source}: cannot read the file: {error.strerror or error}")
        return None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = error.problem or error.context or "syntax error"
        errors.append(f"{source}: {where}invalid YAML: {problem}")
        return None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        errors.append(f"{source}: invalid YAML: {error}")
        return None
    if data is None:
        return {}
    if not isinstance(data, dict):
        errors.append(f"{source}: (top level): expected a mapping, got {show(data)}")
        return None
    oversize = _too_large(data)
    if oversize is not None:
        errors.append(f"{source}: invalid YAML: {oversize}")
        return None
    return data


def _too_large(data: object) -> str | None:
    """
    Why C{data} is too large to work with, if it is: more than
    L{MAX_VALUES} values once every alias is counted where it is used, or
    nesting deeper than L{MAX_DEPTH}. The walk stops at the limit, so an
    alias bomb costs no more than a legitimate file.
    """
    count = 0
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            return f"expands to more than {MAX_VALUES} values (through YAML aliases?)"
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels"
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
    return None


def _load_file(
    source: str,
    environ: Mapping[str, str],
    layers: list[tuple[str, dict[str, object]]],
    errors: list[str],
    chain: tuple[tuple[str, str], ...],
) -> None:
    """
    Append C{source}'s layers to C{layers} in merge order: what it extends
    first (recursively), then the file itself.

    @param chain: (real path, name) of the files whose C{extends} led here,
        outermost first, to detect cycles.
    """
    real = os.path.realpath(source)
    data = _read_yaml(source, errors)
    if data is None:
        return
    data = cast(dict[str, object], _expand(data, (), source, environ, errors))
    if "extends" in data:
        target = data.pop("extends")
        if not isinstance(target, str) or not target:
            errors.append(
                f"{source}: extends: expected the path of a YAML file, got {show(target)}"
            )
        else:
            parent = os.path.normpath(os.path.join(os.path.dirname(source), str(target)))
            here = (*chain, (real, source))
            cycle = [name for path, name in here if path == os.path.realpath(parent)]
            if cycle:
                names = " -> ".join([name for _, name in here] + [parent])
                errors.append(
                    f"{source}: extends: expected a file not already in the extends chain "
                    f"(cycle {names}), got {show(target)}"
                )
            elif not os.path.isfile(parent):
                errors.append(
                    f"{source}: extends: expected the path of a YAML file, relative to this "
                    f"one, got {show(target)} ({parent} does not exist)"
                )
            else:
                _load_file(parent, environ, layers, errors, here)
    layers.append((source, data))


def _merge(base: object, overlay: object) -> object:
    """
    Deep merge: mappings merge key by key; anything else (scalars, lists)
    in C{overlay} replaces what C{base} had.
    """
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for key, value in overlay.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return overlay


def _paths(value: object, prefix: KeyPath = ()) -> Iterator[KeyPath]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, segment(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _locator(layers: Sequence[tuple[str, dict[str, object]]]) -> Locate:
    """
    Name the file responsible for a path of the merged tree: the last file
    (in merge order) that contains the path, or its nearest parent.
    """
    sets = [(source, set(_paths(data))) for source, data in layers]

    def locate(path: KeyPath) -> str:
        for length in range(len(path), -1, -1):
            for source, paths in reversed(sets):
                if path[:length] in paths:
                    return source
        return layers[-1][0]

    return locate


def load_config(paths: Sequence[str], environ: Mapping[str, str]) -> Config:
    """
    Load, merge and validate configuration files.

    Each file may name another with C{extends} (relative to itself), which is
    loaded first; later files, and files over the ones they extend, are
    deep-merged over earlier ones.  C{${VAR}} references are expanded from
    C{environ} in every string value before merging.  Error messages name the
    file that set the offending key.

    @param paths: the files, in order; none means the built-in defaults.
    @param environ: the environment for C{${VAR}} (normally C{os.environ}).
    @raise ConfigError: with every problem found; nothing is half-loaded.
    """
    if not paths:
        return Config()
    errors: list[str] = []
    layers: list[tuple[str, dict[str, object]]] = []
    for path in paths:
        _load_file(path, environ, layers, errors, ())
    if errors:
        raise ConfigError(errors)
    merged: object = {}
    for _source, data in layers:
        merged = _merge(merged, data)
    return validate(merged, _locator(layers))
