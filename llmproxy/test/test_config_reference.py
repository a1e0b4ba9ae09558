"""
Tests for L{llmproxy.config.reference}: every key of the model is
documented, every documented key exists, and defaults come from the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import NoneType, UnionType
from typing import Any, get_args, get_origin, get_type_hints

import attrs
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.config import Config, ModelConfig, ProviderConfig, reference_keys

_YAML_NAMES = {
    "features.cost_tracking.transports[].path": "features.cost_tracking.transports[].file.path"
}
"""Model keys that YAML spells differently."""


def _model_keys(cls: Any, prefix: str) -> list[str]:
    """
    The dotted keys of the attrs model below C{cls}: attrs values (optional
    or not) recurse, tuples of attrs values recurse through C{[]}, mappings
    recurse through a C{<>} placeholder, anything else is a leaf.
    """
    keys = []
    hints = get_type_hints(cls)
    for field in attrs.fields(cls):
        if cls is ProviderConfig and field.name == "name":
            continue  # the mapping key, not a YAML key
        kind = hints[field.name]
        if isinstance(kind, UnionType) and cls is not ModelConfig:
            # (pricing is documented as YAML has it: a mapping or tiers.)
            kind = next(arg for arg in get_args(kind) if arg is not NoneType)
        key = f"{prefix}{field.name}"
        if attrs.has(kind):
            keys.extend(_model_keys(kind, key + "."))
        elif get_origin(kind) is tuple and attrs.has(get_args(kind)[0]):
            keys.extend(_YAML_NAMES.get(k, k) for k in _model_keys(get_args(kind)[0], key + "[]."))
        elif get_origin(kind) is Mapping and attrs.has(get_args(kind)[1]):
            keys.extend(_model_keys(get_args(kind)[1], key + ".<>."))
        elif get_origin(kind) is Mapping and get_origin(get_args(kind)[1]) is Mapping:
            keys.append(key + ".<>.<>")
        else:
            keys.append(key)
    return keys


def _matches(pattern: str, key: str) -> bool:
    """
    Whether a reference key (with C{<name>} placeholders) covers a model key
    (with C{<>} placeholders).
    """
    left, right = pattern.split("."), key.split(".")
    return len(left) == len(right) and all(
        a == b or (a.startswith("<") and (b == "<>" or not b.startswith("<")))
        for a, b in zip(left, right, strict=True)
    )


def _names_list(key: str, field: str) -> bool:
    """
    Whether a reference key names the list a model key is an item key of
    (C{providers.<name>.upstreams} for C{providers.<>.upstreams[].name}).
    """
    head, brackets, _ = field.partition("[]")
    return bool(brackets) and _matches(key, head)


class ReferenceKeysTests(SynchronousTestCase):
    def test_every_model_field_is_documented(self) -> None:
        documented = [key for key, _, _ in reference_keys()]
        for key in _model_keys(Config, ""):
            # A list of mappings is documented by its items' keys (transports[].type).
            self.assertTrue(
                any(
                    _matches(pattern, key) or pattern.startswith(key + "[]")
                    for pattern in documented
                ),
                f"{key} undocumented",
            )

    def test_every_documented_key_exists(self) -> None:
        """
        Each reference key is a model field, or one of the keys that YAML
        has and the model represents differently.
        """
        model = _model_keys(Config, "")
        yaml_only = ("extends", ".pricing.", ".pricing[]", ".transports[].type")
        for key, default, meaning in reference_keys():
            self.assertTrue(meaning)
            self.assertTrue(default)
            if any(marker in key or key == marker for marker in yaml_only):
                continue
            self.assertTrue(
                any(_matches(key, field) or _names_list(key, field) for field in model), key
            )

    def test_defaults_come_from_the_model(self) -> None:
        rows = {key: default for key, default, _ in reference_keys()}
        self.assertEqual(rows["server.max_body_bytes"], "33554432")
        self.assertEqual(rows["server.cors.allow_origins"], '["*"]')
        self.assertEqual(rows["providers.<name>.timeouts.first_byte_seconds"], "600")
        self.assertEqual(rows["features.rate_limiting.redis.url"], "redis://127.0.0.1:6379/0")
        self.assertEqual(rows["features.metrics.enabled"], "true")
