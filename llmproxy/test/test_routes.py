"""
Tests for L{llmproxy.routes}: one reading of a request target for routing,
forwarding, records and logs.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.inspection import has_dot_segment
from llmproxy.routes import MAX_USER_LENGTH, RouteTable, Target
from llmproxy.upstream import Upstream

OPENAI = cast(Upstream, object())
EVIL = cast(Upstream, object())


class RouteTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.routes = RouteTable({"openai": OPENAI, "evil": EVIL})

    def match(self, target: bytes) -> tuple[Any, ...] | None:
        found = self.routes.match(target)
        if found is None:
            return None
        self.assertIsInstance(found, Target)
        return (found.name, found.user, found.path, found.query)

    def test_mount(self) -> None:
        self.assertEqual(
            self.match(b"/openai/v1/files/a%2Fb?x=1&key=k"),
            ("openai", None, b"/v1/files/a%2Fb", b"x=1&key=k"),
        )
        self.assertEqual(self.match(b"/openai"), ("openai", None, b"/", b""))
        self.assertEqual(self.match(b"/openai/"), ("openai", None, b"/", b""))
        self.assertEqual(self.match(b"/open%61i/v1"), ("openai", None, b"/v1", b""))

    def test_meta(self) -> None:
        self.assertEqual(
            self.match(b"/meta/alice/openai/v1/models"), ("openai", "alice", b"/v1/models", b"")
        )
        self.assertEqual(
            self.match(b"/meta/caf%C3%A9/openai/v1"), ("openai", "caf\u00e9", b"/v1", b"")
        )

    def test_encoded_separators_stay_in_their_segment(self) -> None:
        """
        A C{%2F} in the user is part of the user: it never moves the request
        to another mount, and the path forwarded is the one after the mount.
        """
        self.assertEqual(
            self.match(b"/meta/x%2Fevil/openai/v1/chat"), ("openai", "x/evil", b"/v1/chat", b"")
        )
        self.assertEqual(
            self.match(b"/meta/x%2F..%2Fevil/openai/v1"), ("openai", "x/../evil", b"/v1", b"")
        )
        self.assertIsNone(self.match(b"/openai%2Fv1/chat"))

    def test_user_is_one_raw_segment(self) -> None:
        """
        The user is one raw segment, decoded after the split: C{%2F} in it
        (either case, or double-encoded) is part of the name, never a
        separator, and the mount after it is decoded on its own.
        """
        cases = [
            (b"/meta/x%2fevil/openai/v1/models", ("openai", "x/evil", b"/v1/models", b"")),
            (b"/meta/x%252Fevil/openai/v1/models", ("openai", "x%2Fevil", b"/v1/models", b"")),
            (b"/meta/x/evil/v1/models", ("evil", "x", b"/v1/models", b"")),
            (b"/meta/x/%6Fpenai/a%2Fb?k=1", ("openai", "x", b"/a%2Fb", b"k=1")),
        ]
        for raw, expected in cases:
            self.assertEqual(self.match(raw), expected, raw)
        for raw in (b"/meta//openai/v1", b"/meta/x%2Fopenai/v1", b"/meta/x", b"//openai/v1"):
            self.assertIsNone(self.match(raw), raw)

    def test_user_capped(self) -> None:
        found = self.match(b"/meta/" + b"u" * 20_000 + b"/openai/v1")
        assert found is not None
        self.assertEqual(len(found[1]), MAX_USER_LENGTH)

    def test_no_route(self) -> None:
        for target in (
            b"",
            b"openai/v1",
            b"/",
            b"/nope/v1",
            b"/meta",
            b"/meta/alice",
            b"/meta//openai/v1",
            b"/meta/alice/nope/v1",
            b"//openai/v1",
            b"/health",
        ):
            self.assertIsNone(self.match(target), target)


class DotSegmentTests(SynchronousTestCase):
    def test_dot_segments(self) -> None:
        for path in (
            b"/v1/../x",
            b"/v1/./x",
            b"/v1/%2e%2E/x",
            b"/v1%2F..%2Fx",
            b"/v1\\..\\x",
            b"/..",
        ):
            self.assertTrue(has_dot_segment(path), path)
        for path in (b"/v1/x", b"/v1/.x", b"/v1/x..", b"/v1/...", b"/"):
            self.assertFalse(has_dot_segment(path), path)
