"""
Tests for L{llmproxy.testing.fake_upstream.dialects}: each provider's
error shapes (as a response and in a stream) and credential checks.
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


class DialectTests(FakeTestCase):
    def test_status_in_each_provider_shape(self) -> None:
        openai = self.post(
            b"/v1/chat/completions",
            CHAT,
            [(b"x-fake-status", b"429"), (b"x-fake-retry-after", b"3")],
        )
        self.assertEqual(openai.status, 429)
        self.assertEqual(openai.header(b"retry-after"), b"3")
        self.assertEqual(set(openai.json()["error"]), {"message", "type", "param", "code"})
        self.assertEqual(openai.json()["error"]["code"], "rate_limit_exceeded")

        anthropic = self.post(
            b"/v1/messages",
            MESSAGES,
            [(b"x-fake-status", b"529"), (b"x-fake-error-message", b"busy")],
        )
        self.assertEqual(anthropic.status, 529)
        body = anthropic.json()
        self.assertEqual(body["error"], {"type": "overloaded_error", "message": "busy"})
        self.assertEqual(body["request_id"].encode(), anthropic.header(b"request-id"))

        gemini = self.post(
            b"/v1beta/models/m:generateContent", CONTENTS, [(b"x-fake-status", b"503")]
        )
        self.assertEqual(gemini.status, 503)
        self.assertEqual(
            gemini.json()["error"],
            {
                "code": 503,
                "message": "The service is temporarily overloaded.",
                "status": "UNAVAILABLE",
            },
        )

    def test_stream_error_events(self) -> None:
        """
        Each provider's in-stream error event ends the response properly.
        """
        openai = self.post(
            b"/v1/chat/completions",
            {**CHAT, "stream": True},
            [*OPENAI_AUTH, (b"x-fake-error-after", b"2")],
        )
        self.assertTrue(openai.complete)
        events = sse_events(openai.body)
        self.assertEqual(len(events), 3)
        self.assertEqual(events[-1][1]["error"]["type"], "server_error")

        anthropic = self.post(
            b"/v1/messages",
            {**MESSAGES, "stream": True},
            [*ANTHROPIC_AUTH, (b"x-fake-error-after", b"1")],
        )
        name, data = sse_events(anthropic.body)[-1]
        self.assertEqual((name, data["error"]["type"]), ("error", "overloaded_error"))

        gemini = self.post(
            b"/v1beta/models/m:streamGenerateContent?alt=sse",
            CONTENTS,
            [*GEMINI_AUTH, (b"x-fake-error-after", b"1")],
        )
        events = sse_events(gemini.body, b"\r\n\r\n")
        self.assertEqual(events[-1][1]["error"]["status"], "INTERNAL")

    def test_openai_auth(self) -> None:
        missing = self.post(b"/v1/chat/completions", CHAT)
        self.assertEqual(missing.status, 401)
        self.assertEqual(missing.json()["error"]["type"], "invalid_request_error")
        wrong = self.post(b"/v1/chat/completions", CHAT, [(b"Authorization", b"Bearer invalid-x")])
        self.assertEqual(wrong.status, 401)
        self.assertEqual(wrong.json()["error"]["code"], "invalid_api_key")
        azure = self.post(b"/v1/chat/completions", CHAT, [(b"api-key", b"azure-key")])
        self.assertEqual(azure.status, 200)
        self.fake.require_auth = False
        self.assertEqual(self.post(b"/v1/chat/completions", CHAT).status, 200)

    def test_anthropic_auth_and_version(self) -> None:
        missing = self.post(b"/v1/messages", MESSAGES, [(b"anthropic-version", b"2023-06-01")])
        self.assertEqual(missing.status, 401)
        body = missing.json()
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"]["type"], "authentication_error")
        self.assertTrue(missing.header(b"request-id"))
        bearer = self.post(
            b"/v1/messages",
            MESSAGES,
            [(b"Authorization", b"Bearer oauth"), (b"anthropic-version", b"2023-06-01")],
        )
        self.assertEqual(bearer.status, 200)
        no_version = self.post(b"/v1/messages", MESSAGES, [(b"x-api-key", b"k")])
        self.assertEqual(no_version.status, 400)
        self.assertIn("anthropic-version", no_version.json()["error"]["message"])
        wrong = self.post(
            b"/v1/messages", MESSAGES, [(b"x-api-key", b"invalid"), ANTHROPIC_AUTH[1]]
        )
        self.assertEqual(wrong.status, 401)

    def test_gemini_auth(self) -> None:
        target = b"/v1beta/models/gemini-2.0-flash:generateContent"
        missing = self.post(target, CONTENTS)
        self.assertEqual(missing.status, 403)
        self.assertEqual(missing.json()["error"]["status"], "PERMISSION_DENIED")
        wrong = self.post(target + b"?key=invalid", CONTENTS)
        self.assertEqual(wrong.status, 400)
        self.assertEqual(wrong.json()["error"]["status"], "INVALID_ARGUMENT")
        self.assertEqual(self.post(target + b"?key=good", CONTENTS).status, 200)
