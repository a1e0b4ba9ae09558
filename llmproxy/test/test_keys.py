"""
Proxy keys on the request path, in memory (L{llmproxy.testing.memory}):
recognition, the credential swap, refusals in each provider's shape, a
key's user and limits, and keys added or revoked by a reload.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from llmproxy.config import Config
from llmproxy.test.test_call import ANTHROPIC, CHAT, CHAT_STREAM, MESSAGES, CallTestCase, config
from llmproxy.test.test_call import with_knobs as with_knobs
from llmproxy.testing.memory import MemoryProxy

KEY = b"llmp-team-a-8Jb3Qx0cWm1nE4rT6yU9iO2p"
OTHER_KEY = b"llmp-team-b-Zq7Wv5Xs3Ed1Rf9Tg7Yh5Uj3"
GEMINI_CHAT = orjson.dumps({"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]})
GEMINI_PATH = b"/gemini/v1beta/models/gemini-2.0-flash:generateContent"

CREDENTIALS = {
    "openai": {"Authorization": "Bearer sk-provider-openai-secret"},
    "anthropic": {"x-api-key": "sk-ant-provider-secret"},
    "gemini": {"x-goog-api-key": "AIza-provider-gemini-secret"},
}


def key_hash(secret: bytes) -> str:
    return "sha256:" + hashlib.sha256(secret).hexdigest()


def key_entry(secret: bytes = KEY, id: str = "team-a", **fields: Any) -> dict[str, Any]:
    return {"id": id, "hash": key_hash(secret), **fields}


def keys_config(*keys: dict[str, Any], mode: str = "keys", **sections: Any) -> Config:
    auth = {"mode": mode, "keys": list(keys) or [key_entry()], "credentials": CREDENTIALS}
    return config(auth=auth, **sections)


def bearer(secret: bytes) -> dict[bytes, list[bytes]]:
    return {b"authorization": [b"Bearer " + secret], b"content-type": [b"application/json"]}


class KeysTestCase(CallTestCase):
    def config(self) -> Config:
        return keys_config()

    def auth_failures(self, reason: str) -> float:
        value = self.proxy.state.metrics.registry.get_sample_value(
            "llmproxy_auth_failures_total", {"reason": reason}
        )
        return value or 0.0


class SwapTests(KeysTestCase):
    """
    A proxy key is swapped for the provider's credential: the upstream never
    sees it, in whatever header (or query) the SDK put it.
    """

    def test_openai(self) -> None:
        received = self.send(b"/openai/v1/chat/completions", bearer(KEY), CHAT)
        self.assertEqual(received.status, 200)
        [upstream] = self.proxy.fake.received
        self.assertEqual(
            upstream.header_values("authorization"), [b"Bearer sk-provider-openai-secret"]
        )
        self.assertNotIn(KEY, repr(upstream.headers).encode())
        [record] = self.proxy.sink.records
        self.assertEqual(record.key_id, "team-a")
        [line] = self.access
        self.assertEqual(line["key_id"], "team-a")

    def test_anthropic(self) -> None:
        headers = {**ANTHROPIC, b"x-api-key": [KEY], b"authorization": [b"Bearer " + KEY]}
        self.assertEqual(self.send(b"/anthropic/v1/messages", headers, MESSAGES).status, 200)
        [upstream] = self.proxy.fake.received
        self.assertEqual(upstream.header_values("x-api-key"), [b"sk-ant-provider-secret"])
        self.assertEqual(upstream.header_values("authorization"), [])
        self.assertEqual(upstream.header("anthropic-version"), b"2023-06-01")

    def test_gemini_header_and_query(self) -> None:
        headers = {b"content-type": [b"application/json"], b"x-goog-api-key": [KEY]}
        self.assertEqual(self.send(GEMINI_PATH, headers, GEMINI_CHAT).status, 200)
        query = GEMINI_PATH.replace(b":generateContent", b":streamGenerateContent")
        path = query + b"?alt=sse&key=" + KEY
        received = self.send(path, {b"content-type": [b"application/json"]}, GEMINI_CHAT)
        self.proxy.advance(0.1)
        self.assertEqual(received.status, 200)
        plain, streamed = self.proxy.fake.received
        for upstream in (plain, streamed):
            self.assertEqual(
                upstream.header_values("x-goog-api-key"), [b"AIza-provider-gemini-secret"]
            )
        self.assertEqual(streamed.query, b"alt=sse")
        self.assertEqual([r.key_id for r in self.proxy.sink.records], ["team-a", "team-a"])

    def test_stream(self) -> None:
        received = self.send(b"/openai/v1/chat/completions", bearer(KEY), CHAT_STREAM)
        self.proxy.advance(0.1)
        self.assertTrue(received.complete)
        self.assertEqual(
            self.proxy.fake.received[0].header("authorization"), b"Bearer sk-provider-openai-secret"
        )

    def test_key_user(self) -> None:
        """
        A key's user is the request's user when nothing else names one.
        """
        self.proxy.reload(keys_config(key_entry(user="alice")))
        self.send(b"/openai/v1/chat/completions", bearer(KEY), CHAT)
        self.send(b"/openai/v1/chat/completions", {**bearer(KEY), b"x-user-id": [b"bob"]}, CHAT)
        self.assertEqual([r.user_id for r in self.proxy.sink.records], ["alice", "bob"])
        self.assertEqual([line["user_id"] for line in self.access], ["alice", "bob"])

    def test_no_credential_configured(self) -> None:
        """
        A mount without C{auth.credentials} gets no credential at all: the
        proxy key is removed all the same.
        """
        auth = {"mode": "keys", "keys": [key_entry()]}
        self.proxy.reload(config(auth=auth))
        self.send(b"/openai/v1/chat/completions", bearer(KEY), CHAT)
        self.assertEqual(self.proxy.fake.received[0].header_values("authorization"), [])


class RefusalTests(KeysTestCase):
    """
    401 and 403 in each provider's error shape, from the proxy, with no
    cost record and nothing sent upstream.
    """

    def assertRefused(self, received: Any, status: int) -> Any:
        self.assertEqual(received.status, status)
        self.assertEqual(received.header(b"x-llm-proxy-error-source"), b"proxy")
        self.assertEqual(self.proxy.fake.received, [])
        self.assertEqual(self.proxy.sink.records, [])
        return self.json(received)

    def test_unknown_key_each_provider(self) -> None:
        body = self.assertRefused(
            self.send(b"/openai/v1/chat/completions", bearer(OTHER_KEY), CHAT), 401
        )
        self.assertEqual(body["error"]["type"], "authentication_error")
        self.assertEqual(body["error"]["code"], "invalid_api_key")
        self.assertNotIn(OTHER_KEY.decode(), body["error"]["message"])
        headers = {**ANTHROPIC, b"x-api-key": [OTHER_KEY]}
        body = self.assertRefused(self.send(b"/anthropic/v1/messages", headers, MESSAGES), 401)
        self.assertEqual(body["error"]["type"], "authentication_error")
        headers = {b"x-goog-api-key": [b"AIza-not-a-proxy-key"]}
        body = self.assertRefused(self.send(GEMINI_PATH, headers, GEMINI_CHAT), 401)
        self.assertEqual(body["error"]["status"], "UNAUTHENTICATED")
        self.assertEqual(self.auth_failures("unknown_key"), 3)

    def test_missing_key(self) -> None:
        headers = {b"content-type": [b"application/json"]}
        received = self.send(b"/openai/v1/chat/completions", headers, CHAT)
        self.assertRefused(received, 401)
        self.assertEqual(self.auth_failures("missing_key"), 1)

    def test_expired(self) -> None:
        self.proxy.reload(keys_config(key_entry(expires_at="1970-01-01T00:00:10Z")))
        self.proxy.clock.advance(10)
        body = self.assertRefused(self.send(b"/openai/v1/chat/completions", bearer(KEY), CHAT), 401)
        self.assertIn("expired", body["error"]["message"])
        self.assertEqual(self.auth_failures("expired_key"), 1)

    def test_model_not_allowed(self) -> None:
        self.proxy.reload(keys_config(key_entry(models=["gpt-4o", "claude-*"])))
        body = self.assertRefused(self.send(b"/openai/v1/chat/completions", bearer(KEY), CHAT), 403)
        self.assertEqual(body["error"]["type"], "permission_error")
        self.assertIn("gpt-4o-mini", body["error"]["message"])
        headers = {**ANTHROPIC, b"x-api-key": [KEY]}
        self.assertEqual(self.send(b"/anthropic/v1/messages", headers, MESSAGES).status, 200)
        self.assertEqual(self.auth_failures("model_not_allowed"), 1)

    def test_model_list_passes_globs(self) -> None:
        self.proxy.reload(keys_config(key_entry(models=["gpt-4o"])))
        received = self.send(b"/openai/v1/models", bearer(KEY), method=b"GET")
        self.assertEqual(received.status, 200)

    def test_provider_not_allowed(self) -> None:
        self.proxy.reload(keys_config(key_entry(providers=["anthropic"])))
        body = self.assertRefused(self.send(b"/openai/v1/chat/completions", bearer(KEY), CHAT), 403)
        self.assertIn("provider openai", body["error"]["message"])
        self.assertEqual(self.auth_failures("provider_not_allowed"), 1)


class MixedTests(KeysTestCase):
    def config(self) -> Config:
        return keys_config(mode="mixed")

    def test_mixed(self) -> None:
        """
        A proxy key is swapped; a provider key passes through as sent; a
        wrong proxy key is refused rather than sent to the provider.
        """
        self.send(b"/openai/v1/chat/completions", bearer(KEY), CHAT)
        self.send(b"/openai/v1/chat/completions", bearer(b"sk-client-own"), CHAT)
        refused = self.send(b"/openai/v1/chat/completions", bearer(OTHER_KEY), CHAT)
        self.assertEqual(refused.status, 401)
        first, second = self.proxy.fake.received
        self.assertEqual(first.header("authorization"), b"Bearer sk-provider-openai-secret")
        self.assertEqual(second.header("authorization"), b"Bearer sk-client-own")
        records = self.proxy.sink.records
        self.assertEqual(records[0].key_id, "team-a")
        self.assertNotEqual(records[1].key_id, "team-a")


class KeyLimitTests(KeysTestCase):
    """
    A key's own limits hold whether or not rate limiting is on.
    """

    def test_limits_without_rate_limiting(self) -> None:
        self.proxy = MemoryProxy(keys_config(key_entry(limits={"requests_per_minute": 1})))
        self.assertEqual(self.send(b"/openai/v1/chat/completions", bearer(KEY), CHAT).status, 200)
        limited = self.send(b"/openai/v1/chat/completions", bearer(KEY), CHAT)
        self.assertEqual(limited.status, 429)
        self.assertEqual(limited.header(b"x-ratelimit-scope"), b"key:team-a")

    def test_limits_with_rate_limiting(self) -> None:
        rates = {"rate_limiting": {"enabled": True, "limits": {"requests_per_minute": 10}}}
        self.proxy = MemoryProxy(
            keys_config(key_entry(limits={"requests_per_minute": 2}), features=rates)
        )
        statuses = [
            self.send(b"/openai/v1/chat/completions", bearer(KEY), CHAT).status for _ in range(3)
        ]
        self.assertEqual(statuses, [200, 200, 429])


class ReloadTests(KeysTestCase):
    """
    SIGHUP adds, changes and revokes keys for the next request; a request
    in flight keeps the keyring it was admitted with.
    """

    def test_add_and_revoke(self) -> None:
        self.assertEqual(
            self.send(b"/openai/v1/chat/completions", bearer(OTHER_KEY), CHAT).status, 401
        )
        self.proxy.reload(keys_config(key_entry(), key_entry(OTHER_KEY, id="team-b")))
        self.assertEqual(
            self.send(b"/openai/v1/chat/completions", bearer(OTHER_KEY), CHAT).status, 200
        )
        stream = self.send(
            b"/openai/v1/chat/completions",
            with_knobs(bearer(KEY), chunks="5", delay_ms="100"),
            CHAT_STREAM,
        )
        self.proxy.advance(0.1)
        self.proxy.reload(keys_config(key_entry(OTHER_KEY, id="team-b")))
        self.assertEqual(self.send(b"/openai/v1/chat/completions", bearer(KEY), CHAT).status, 401)
        self.proxy.advance(1.0)
        self.assertTrue(stream.complete)
        self.assertTrue(bytes(stream.body).endswith(b"data: [DONE]\n\n"))
        self.assertEqual([r.key_id for r in self.proxy.sink.records], ["team-b", "team-a"])
