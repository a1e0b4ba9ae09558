"""
Tests for L{llmproxy.logs}: no credential reaches the output, whatever the route.
"""

from __future__ import annotations

import io

import orjson
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.logs import JSONObserver, LevelHolder, TextObserver, make_observer, redact

SECRETS = [
    "sk-proj-abcdefghijklmnopqrstuvwxyz0123",
    "sk-ant-api03-SECRETSECRETSECRET",
    "AIzaSyD-secretsecretsecretsecret12",
    "plain-opaque-token-42",
]


class RedactTests(SynchronousTestCase):
    def test_bearer(self) -> None:
        text = redact("Authorization: Bearer plain-opaque-token-42")
        self.assertNotIn("plain-opaque-token-42", text)
        self.assertIn("Bearer [REDACTED]", text)

    def test_api_key_headers(self) -> None:
        for header in ("x-api-key", "X-Goog-Api-Key", "authorization"):
            text = redact(f"{header}: plain-opaque-token-42")
            self.assertNotIn("plain-opaque-token-42", text, header)

    def test_raw_header_repr(self) -> None:
        text = redact("Headers({b'x-api-key': [b'plain-opaque-token-42']})")
        self.assertNotIn("plain-opaque-token-42", text)

    def test_query_key(self) -> None:
        text = redact("/gemini/v1beta/models/m:generateContent?alt=sse&key=plain-opaque-token-42")
        self.assertNotIn("plain-opaque-token-42", text)
        self.assertIn("alt=sse", text)

    def test_bare_provider_keys(self) -> None:
        for secret in SECRETS[:3]:
            self.assertNotIn(secret, redact(f"upstream said: invalid key {secret}"))

    def test_ordinary_text_untouched(self) -> None:
        text = "POST /openai/v1/chat/completions 200 12.5ms tokens=42"
        self.assertEqual(redact(text), text)


class ObserverTests(SynchronousTestCase):
    def _emit(self, observer: ILogObserver) -> None:
        log = Logger(namespace="test", observer=observer)
        log.info(
            "request {uri} with {headers}",
            uri="/gemini/x?key=" + SECRETS[2],
            headers={"authorization": "Bearer " + SECRETS[0], "x-api-key": SECRETS[1]},
        )
        log.failure(
            "boom", Failure(ValueError("bad x-api-key: " + SECRETS[3] + " Bearer " + SECRETS[3]))
        )

    def test_text_observer_redacts(self) -> None:
        stream = io.StringIO()
        self._emit(TextObserver(stream))
        output = stream.getvalue()
        self.assertIn("request /gemini/x?key=[REDACTED]", output)
        for secret in SECRETS:
            self.assertNotIn(secret, output)

    def test_json_observer_redacts_and_is_ndjson(self) -> None:
        stream = io.StringIO()
        self._emit(JSONObserver(stream))
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first = orjson.loads(lines[0])
        self.assertEqual(first["level"], "info")
        self.assertEqual(first["namespace"], "test")
        self.assertIn("[REDACTED]", first["message"])
        self.assertIn("traceback", orjson.loads(lines[1]))
        for secret in SECRETS:
            self.assertNotIn(secret, stream.getvalue())

    def test_json_fields_kept(self) -> None:
        stream = io.StringIO()
        log = Logger(namespace="llmproxy.access", observer=JSONObserver(stream))
        log.info("{method} {status}", method="POST", status=200, model="gpt-4o", cost=None)
        record = orjson.loads(stream.getvalue())
        self.assertEqual(record["message"], "POST 200")
        self.assertEqual((record["status"], record["model"], record["cost"]), (200, "gpt-4o", None))

    def test_level_filter_and_change(self) -> None:
        stream = io.StringIO()
        level = LevelHolder("warn")
        log = Logger(namespace="t", observer=make_observer("text", level, stream))
        log.info("hidden")
        log.warn("shown")
        level.set("debug")
        log.debug("now shown")
        output = stream.getvalue()
        self.assertNotIn("hidden", output)
        self.assertIn("shown", output)
        self.assertIn("now shown", output)

    def test_global_publisher_untouched(self) -> None:
        """
        Building observers does not register them anywhere by itself.
        """
        before = list(globalLogPublisher._observers)
        make_observer("json", LevelHolder("info"), io.StringIO())
        self.assertEqual(before, list(globalLogPublisher._observers))
        self.assertIs(LogLevel.info, LogLevel.levelWithName("info"))
