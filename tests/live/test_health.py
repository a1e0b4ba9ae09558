"""
C{/health} of a real proxy process serving the built-in defaults.  It never
calls a provider, so it needs no key and runs everywhere; with keys set, one
cheap request per provider shows up in that provider's counters.
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
from treq.content import content
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest
from twisted.web.http_headers import Headers

from tests.live.support import PROVIDER_KEYS, LiveTestCase, api_key

PUBLIC_BASE_URLS = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
}


def model_list_request(provider: str, key: str) -> tuple[str, dict[bytes, list[bytes]]]:
    """
    The path and headers of a free call: list the provider's models.
    """
    if provider == "openai":
        return "/openai/v1/models", {b"authorization": [b"Bearer " + key.encode()]}
    if provider == "anthropic":
        return "/anthropic/v1/models", {
            b"x-api-key": [key.encode()],
            b"anthropic-version": [b"2023-06-01"],
        }
    return "/gemini/v1beta/models", {b"x-goog-api-key": [key.encode()]}


class _HealthTestCase(LiveTestCase):
    @inlineCallbacks
    def get_health(self) -> Any:
        response = yield self.http.get(self.proxy.url + "/health")
        self.assertEqual(response.code, 200)
        return orjson.loads((yield content(response)))


class DefaultsTests(_HealthTestCase):
    may_use_fake = False

    @inlineCallbacks
    def test_defaults(self) -> Any:
        """
        With no configuration the three providers are served at their public
        base URLs, healthy, with nothing counted yet.
        """
        health = yield self.get_health()
        self.assertEqual(health["status"], "healthy")
        self.assertEqual(
            {name: p["base_url"] for name, p in health["providers"].items()}, PUBLIC_BASE_URLS
        )
        for provider in health["providers"].values():
            self.assertEqual(provider["status"], "healthy")
            self.assertEqual(provider["requests"], 0)
            self.assertTrue(provider["streaming_support"])
        self.assertFalse(health["features"]["rate_limiting"])
        self.assertFalse(health["features"]["cost_tracking"])


class CountersTests(_HealthTestCase):
    @inlineCallbacks
    def test_live_requests_counted(self) -> Any:
        """
        One model-list call per provider whose key is set: answered 200 by
        the real API through the proxy, counted, no errors.
        """
        keys: dict[str, str] = {}
        for variable in PROVIDER_KEYS:
            with contextlib.suppress(SkipTest):
                keys[variable.split("_")[0].lower()] = api_key(variable)
        if not keys:
            raise SkipTest(
                "none of OPENAI_API_KEY, ANTHROPIC_API_KEY, GEMINI_API_KEY set: "
                "live health counters skipped"
            )
        for provider, key in sorted(keys.items()):
            path, headers = model_list_request(provider, key)
            response = yield self.http.get(self.proxy.url + path, headers=Headers(headers))
            yield content(response)
            self.assertEqual(response.code, 200, provider)
        health = yield self.get_health()
        for provider in keys:
            counters = health["providers"][provider]
            self.assertEqual((counters["requests"], counters["errors"]), (1, 0), provider)
            self.assertEqual(counters["status"], "healthy")
