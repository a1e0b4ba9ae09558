# -*- test-case-name: llmproxy.test.test_config_cloud -*-
"""
The provider keys of the cloud kinds (C{azure_openai}, C{bedrock},
C{vertex}): their parsers, which kind each belongs to, the C{base_url} a
C{region} implies, and the optional extra a key needs installed.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

import attrs

from llmproxy.config.checks import Checker, Invalid, named, string
from llmproxy.config.errors import KeyPath
from llmproxy.config.model import ProviderConfig

_REGIONS: Mapping[str, tuple[re.Pattern[str], str]] = {
    "bedrock": (
        re.compile(r"[a-z]{2}(?:-[a-z]+)+-[0-9]{1,2}"),
        "expected an AWS region such as 'us-east-1'",
    ),
    "vertex": (
        re.compile(r"global|[a-z]+-[a-z]+[0-9]{1,2}"),
        "expected a Google Cloud region such as 'us-central1', or 'global'",
    ),
}

KEY_KINDS: Mapping[str, str] = {
    "deployments": "azure_openai",
    "aws_sigv4": "bedrock",
    "google_adc": "vertex",
}
"""Keys that only one kind takes (C{region} is checked on its own)."""

EXTRAS: Mapping[str, tuple[tuple[str, ...], str]] = {
    "aws_sigv4": (("botocore",), "aws"),
    "google_adc": (("google.auth", "requests"), "gcp"),
}
"""A switch that needs libraries: the modules, and the extra that installs them."""


def importable(module: str) -> bool:
    """
    Whether C{module} can be imported (without importing it).
    """
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def regional_base_url(kind: str, region: str) -> str:
    """
    The public endpoint of C{kind} in C{region}.
    """
    if kind == "bedrock":
        return f"https://bedrock-runtime.{region}.amazonaws.com"
    if region == "global":
        return "https://aiplatform.googleapis.com"
    return f"https://{region}-aiplatform.googleapis.com"


def aws_region(provider: ProviderConfig) -> str | None:
    """
    The AWS region a Bedrock provider's requests are signed for: its
    C{region}, else the one its C{base_url} names
    (C{bedrock-runtime.<region>.amazonaws.com}), else L{None}.
    """
    if provider.region:
        return provider.region
    parts = (urlsplit(provider.base_url).hostname or "").split(".")
    if len(parts) >= 4 and parts[0].startswith("bedrock") and parts[-2:] == ["amazonaws", "com"]:
        return parts[1]
    return None


def region(ck: Checker, path: KeyPath, value: object) -> str | Invalid:
    """
    A region name: lower-case letters, digits and dashes (it becomes part of
    a host name); which pattern it must follow depends on the kind, checked
    in L{finish_cloud_keys}.
    """
    if isinstance(value, str) and re.fullmatch(r"[a-z0-9-]{2,40}", value):
        return str(value)
    return ck.fail(path, "expected a region name such as 'us-east-1' or 'us-central1'", value)


def deployments(ck: Checker, path: KeyPath, value: object) -> dict[str, str] | Invalid:
    """
    Azure deployment name -> the model it runs (a priced model name).
    """
    result: dict[str, str] = {}
    for name, entry, raw in named(ck, path, value, "deployment name"):
        model = string(ck, entry, raw)
        if not isinstance(model, Invalid):
            result[name] = model
    return result


def base_url_required(value: Mapping[str, object]) -> bool:
    """
    Whether a provider that is not built in must name its C{base_url}: all
    must, except a regional kind that gives its C{region}.
    """
    return not ("region" in value and value.get("kind") in _REGIONS)


def finish_cloud_keys(
    ck: Checker, path: KeyPath, given: object, provider: ProviderConfig
) -> ProviderConfig:
    """
    Check the keys that belong to one kind, the region's pattern and the
    extras the switches need; derive C{base_url} from C{region} when the
    configuration names no C{base_url}.
    """
    if not isinstance(given, Mapping):
        return provider
    kind = provider.kind
    for key, owner in KEY_KINDS.items():
        if key in given and kind != owner:
            expected = f"expected no {key} for kind {kind!r} (only {owner!r})"
            ck.fail((*path, key), expected, given[key])
    if "region" in given:
        rule = _REGIONS.get(kind)
        if rule is None:
            ck.fail(
                (*path, "region"),
                f"expected no region for kind {kind!r} (only 'bedrock' and 'vertex')",
                given["region"],
            )
        elif provider.region is not None and not rule[0].fullmatch(provider.region):
            ck.fail((*path, "region"), rule[1], provider.region)
    for key, (modules, extra) in EXTRAS.items():
        if given.get(key) is True and kind == KEY_KINDS[key]:
            missing = [module for module in modules if not importable(module)]
            if missing:
                ck.note(
                    (*path, key),
                    f"needs {', '.join(missing)} (not installed): pip install 'llmproxy[{extra}]'",
                )
    if "base_url" not in given and provider.region is not None and kind in _REGIONS:
        provider = attrs.evolve(provider, base_url=regional_base_url(kind, provider.region))
    if provider.aws_sigv4 and kind == "bedrock" and aws_region(provider) is None:
        ck.note(
            (*path, "region"),
            "aws_sigv4 signs for one AWS region: give region (the base_url names none)",
        )
    return provider
