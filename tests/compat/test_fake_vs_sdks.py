"""
The official SDKs (C{openai}, C{anthropic}, C{google-genai}) pointed
directly at the fake upstream: every shape the fake produces must parse, and
every error status must raise the SDK's own exception with the message.

A failure here is a bug in the fake (or a change in an SDK), never in the
proxy: the proxy is not involved.  The scenarios are those of
L{tests.compat.scenarios}, which L{tests.compat.test_sdks_through_proxy}
runs again through the proxy.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from llmproxy.testing.fake_upstream import FakeUpstream
from tests.compat.scenarios import AnthropicScenarios, GeminiScenarios, OpenAIScenarios
from tests.e2e.harness import reactor, serve_fake


class _Direct(TestCase):
    """
    A fake upstream listening on loopback; every provider's API is the fake
    itself.
    """

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.fake = FakeUpstream(reactor)
        self.upstream_url: str = yield serve_fake(self, self.fake)

    def provider_url(self, provider: str) -> str:
        return self.upstream_url


class OpenAITests(OpenAIScenarios, _Direct):
    pass


class AnthropicTests(AnthropicScenarios, _Direct):
    pass


class GeminiTests(GeminiScenarios, _Direct):
    pass
