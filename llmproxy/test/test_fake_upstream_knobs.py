"""
Tests for L{llmproxy.testing.fake_upstream.knobs}: strict parsing,
instance defaults, and the knobs that change what is sent rather than when.
"""

from __future__ import annotations

from llmproxy.test.test_fake_upstream import (
    ANTHROPIC_AUTH,
    CHAT,
    CONTENTS,
    GEMINI_AUTH,
    MESSAGES,
    OPENAI_AUTH,
    FakeTestCase,
    sse_events,
)
from llmproxy.testing.fake_upstream import fake_text


class KnobTests(FakeTestCase):
    def test_unknown_and_bad_knobs(self) -> None:
        typo = self.post(b"/v1/chat/completions", CHAT, [*OPENAI_AUTH, (b"x-fake-chunk", b"2")])
        self.assertEqual(typo.status, 400)
        self.assertIn("x-fake-chunk", typo.json()["error"]["message"])
        bad = self.post(b"/v1/messages", MESSAGES, [*ANTHROPIC_AUTH, (b"x-fake-hang", b"always")])
        self.assertEqual(bad.status, 400)
        self.assertIn("x-fake-hang", bad.json()["error"]["message"])

    def test_defaults_and_header_override(self) -> None:
        self.fake.defaults["x-fake-chunks"] = "5"
        self.fake.defaults["x-fake-model"] = "from-defaults"
        body = self.post(b"/v1/chat/completions", CHAT, OPENAI_AUTH).json()
        self.assertEqual(body["choices"][0]["message"]["content"], fake_text(5))
        self.assertEqual(body["model"], "from-defaults")
        body = self.post(
            b"/v1/chat/completions", CHAT, [*OPENAI_AUTH, (b"x-fake-chunks", b"1")]
        ).json()
        self.assertEqual(body["choices"][0]["message"]["content"], fake_text(1))

    def test_usage_omitted(self) -> None:
        off = [(b"x-fake-usage", b"0")]
        chat = self.post(b"/v1/chat/completions", CHAT, OPENAI_AUTH + off).json()
        self.assertNotIn("usage", chat)
        stream = self.post(
            b"/v1/chat/completions",
            {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
            OPENAI_AUTH + off,
        )
        self.assertTrue(
            all(d == "[DONE]" or d["usage"] is None for _, d in sse_events(stream.body))
        )
        gemini = self.post(b"/v1beta/models/m:generateContent", CONTENTS, GEMINI_AUTH + off)
        self.assertNotIn("usageMetadata", gemini.json())
        anthropic = self.post(b"/v1/messages", MESSAGES, ANTHROPIC_AUTH + off)
        self.assertNotIn("usage", anthropic.json())

    def test_cookies_and_extra_headers(self) -> None:
        response = self.post(
            b"/v1/chat/completions",
            CHAT,
            [
                *OPENAI_AUTH,
                (b"x-fake-set-cookie", b"a=1; Path=/"),
                (b"x-fake-set-cookie", b"b=2"),
                (b"x-fake-header", b"X-Extra: one"),
                (b"x-fake-header", b"X-Extra: two"),
                (b"x-fake-header", b"Keep-Alive: timeout=5"),
            ],
        )
        self.assertEqual(response.header_values(b"set-cookie"), [b"a=1; Path=/", b"b=2"])
        self.assertEqual(response.header_values(b"x-extra"), [b"one", b"two"])
        self.assertEqual(response.header(b"keep-alive"), b"timeout=5")
