"""
What the live suites share: the key check that skips, a real proxy process
per test, and the small, cheap models they call.

Model names can be changed without editing the tests
(C{LLMPROXY_LIVE_OPENAI_MODEL}, ...), since providers retire models.

C{LLMPROXY_LIVE_AGAINST_FAKE=1} runs the same tests with made-up keys
against the fake upstream (the proxy process configured to forward there):
a check of the tests themselves on a machine without keys or network.  The
assertions are the ones made against the real APIs, so they only check what
both answer alike (shapes, classes, statuses), never exact text.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from llmproxy.testing.fake_upstream import FakeUpstream
from llmproxy.testing.proxy_process import ProxyProcess
from tests.e2e.harness import providers_yaml, reactor, serve_fake, write_config

T = TypeVar("T")

PROVIDER_KEYS: dict[str, tuple[str, str]] = {
    "OPENAI_API_KEY": ("OpenAI", "test-openai"),
    "ANTHROPIC_API_KEY": ("Anthropic", "test-anthropic"),
    "GEMINI_API_KEY": ("Gemini", "test-gemini"),
}
"""Each key variable, with the provider it unlocks and its make target."""

SDK_TIMEOUT = 60.0
"""Seconds one live SDK call may take."""

SDK_RETRIES = 2
"""The real APIs shed load now and then (429, 529): retry like a user would."""


def live_model(provider: str, default: str) -> str:
    """
    The model the live tests of C{provider} call:
    C{LLMPROXY_LIVE_<PROVIDER>_MODEL}, else C{default}.
    """
    return os.environ.get(f"LLMPROXY_LIVE_{provider.upper()}_MODEL", "").strip() or default


def against_fake() -> bool:
    """
    Whether the live tests run against the fake upstream instead.
    """
    return os.environ.get("LLMPROXY_LIVE_AGAINST_FAKE", "") == "1"


def api_key(variable: str) -> str:
    """
    The value of C{variable}, or L{SkipTest} saying it is not set.  The
    value itself never goes into a message.
    """
    if against_fake():
        return "fake-" + variable.lower()
    value = os.environ.get(variable, "").strip()
    if not value:
        label = PROVIDER_KEYS[variable][0]
        raise SkipTest(f"{variable} not set: live {label} tests skipped")
    return value


class LiveTestCase(TestCase):
    """
    A real proxy process with no configuration (the providers' public base
    URLs), started after the key check so a skipped test costs nothing.

    @cvar key_variable: the environment variable the test needs, or C{None}.
    @cvar may_use_fake: whether L{against_fake} points this proxy at the fake
        upstream (C{False} for tests of the defaults themselves).
    @ivar key: its value.
    @ivar proxy: the running L{ProxyProcess}.
    @ivar http: treq over a non-persistent pool, for raw requests.
    """

    timeout = 180
    key_variable: str | None = None
    may_use_fake = True

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.key = api_key(self.key_variable) if self.key_variable else ""
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        config_paths: list[str] = []
        if against_fake() and self.may_use_fake:
            config_paths.append((yield self.fake_upstream_config()))
        self.proxy: ProxyProcess = yield ProxyProcess.start(reactor, config_paths)
        self.addCleanup(self.proxy.stop)

    @inlineCallbacks
    def fake_upstream_config(self) -> Any:
        """
        Start a fake upstream; return the path of a config that points the
        three providers at it.
        """
        self.fake = FakeUpstream(reactor)
        upstream = yield serve_fake(self, self.fake)
        return write_config(self, providers_yaml(upstream))

    def sdk_options(self, mount: str, api_key: str | None = None) -> dict[str, Any]:
        """
        The options of an C{openai} or C{anthropic} client of the proxy:
        its base URL (the proxy's URL and C{mount}), C{api_key} or else the
        test's own key, L{SDK_RETRIES} retries and a timeout of
        L{SDK_TIMEOUT}.
        """
        return {
            "base_url": self.proxy.url + mount,
            "api_key": api_key or self.key,
            "max_retries": SDK_RETRIES,
            "timeout": SDK_TIMEOUT,
        }

    def in_thread(self, function: Callable[[], T]) -> Deferred[T]:
        """
        Run a synchronous SDK call in a worker thread.
        """
        result: Deferred[T] = deferToThread(function)
        return result
