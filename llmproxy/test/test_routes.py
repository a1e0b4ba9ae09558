"""
Tests for L{llmproxy.routes}: one reading of the raw target.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool

from llmproxy.config import ProviderConfig
from llmproxy.routes import MAX_USER_LENGTH, RouteTable
from llmproxy.upstream import build_upstream, pooled_agents


class MatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        clock = MemoryReactorClock()
        agent_for = pooled_agents(clock, HTTPConnectionPool(clock))
        self.table = RouteTable(
            {
                name: build_upstream(
                    ProviderConfig(name=name, kind="openai", base_url="http://x"), agent_for
                )
                for name in ("openai", "evil")
            }
        )

    def test_meta_user_never_selects_the_mount(self) -> None:
        """
        The user is one raw segment, decoded after the split: C{%2F} in it
        is part of the name, never a separator.
        """
        cases = [
            (b"/meta/x%2Fevil/openai/v1/models", "openai", "x/evil", b"/v1/models"),
            (b"/meta/x%2fevil/openai/v1/models", "openai", "x/evil", b"/v1/models"),
            (b"/meta/x%252Fevil/openai/v1/models", "openai", "x%2Fevil", b"/v1/models"),
            (b"/meta/x/evil/v1/models", "evil", "x", b"/v1/models"),
            (b"/meta/x/%6Fpenai/a%2Fb?k=1", "openai", "x", b"/a%2Fb"),
            (b"/openai/v1/files/a%2Fb", "openai", None, b"/v1/files/a%2Fb"),
        ]
        for raw, name, user, path in cases:
            target = self.table.match(raw)
            assert target is not None, raw
            self.assertEqual((target.name, target.user, target.path), (name, user, path), raw)

    def test_user_capped(self) -> None:
        target = self.table.match(b"/meta/" + b"u" * 15_000 + b"/openai/v1/models")
        assert target is not None
        self.assertEqual(target.user, "u" * MAX_USER_LENGTH)

    def test_no_route(self) -> None:
        for raw in (
            b"/meta//openai/v1",
            b"/meta/x%2Fopenai/v1",
            b"/meta/x",
            b"/openai%2Fv1/x",
            b"//openai/v1",
            b"relative/openai",
            b"/health",
        ):
            self.assertIsNone(self.table.match(raw), raw)
