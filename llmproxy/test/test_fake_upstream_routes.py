"""
Tests for L{llmproxy.testing.fake_upstream.routes}: which provider answers
a path, and the 404s and 400s the router gives itself.
"""

from __future__ import annotations

from llmproxy.test.test_fake_upstream import (
    ANTHROPIC_AUTH,
    CHAT,
    CONTENTS,
    GEMINI_AUTH,
    OPENAI_AUTH,
    FakeTestCase,
)


class RouteTests(FakeTestCase):
    def test_prefix_and_unknown_routes(self) -> None:
        """
        Routes match the end of the path; anything else is an OpenAI-shaped
        404 naming the path.
        """
        prefixed = self.post(b"/deep/prefix/v1/chat/completions", CHAT, OPENAI_AUTH)
        self.assertEqual(prefixed.status, 200)
        unknown = self.post(b"/v1/nothing/here", {}, OPENAI_AUTH)
        self.assertEqual(unknown.status, 404)
        self.assertEqual(unknown.json()["error"]["message"], "Invalid URL (POST /v1/nothing/here)")
        wrong_method = self.exchange(b"GET", b"/v1/chat/completions", OPENAI_AUTH).response()
        self.assertEqual(wrong_method.status, 404)

    def test_anthropic_models_by_version_header(self) -> None:
        listing = self.exchange(b"GET", b"/v1/models", ANTHROPIC_AUTH).response().json()
        self.assertFalse(listing["has_more"])
        self.assertEqual(listing["data"][0]["type"], "model")

    def test_percent_encoded_model(self) -> None:
        body = self.post(
            b"/v1beta/models/gemini%2D2.0-flash:generateContent", CONTENTS, GEMINI_AUTH
        ).json()
        self.assertEqual(body["modelVersion"], "gemini-2.0-flash")

    def test_bad_bodies(self) -> None:
        broken = self.post(b"/v1/chat/completions", b"{not json", OPENAI_AUTH)
        self.assertEqual(broken.status, 400)
        no_model = self.post(b"/v1/chat/completions", {"messages": []}, OPENAI_AUTH)
        self.assertEqual(no_model.status, 400)
        self.assertIn("model", no_model.json()["error"]["message"])
