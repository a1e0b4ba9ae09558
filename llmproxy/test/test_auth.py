"""
Tests for L{llmproxy.auth} (recognising proxy keys) and
L{llmproxy.credentials} (swapping them for the provider's credential).
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from llmproxy import identity
from llmproxy.auth import KeyRefusal, Keyring
from llmproxy.config import AuthConfig, ProxyKey
from llmproxy.credentials import CredentialSwap, without_query_key

KEY = b"llmp-team-a-0123456789abcdef"
OTHER = b"llmp-team-b-0123456789abcdef"


def proxy_key(secret: bytes = KEY, **fields: Any) -> ProxyKey:
    return ProxyKey(id=fields.pop("id", "team-a"), hash=hashlib.sha256(secret).digest(), **fields)


def keyring(mode: str = "keys", *keys: ProxyKey) -> Keyring:
    return Keyring(AuthConfig(mode=mode, keys=keys or (proxy_key(),)))  # type: ignore[arg-type]


class KeyringTests(SynchronousTestCase):
    def recognise(
        self, ring: Keyring, secret: bytes | None, provider: str = "openai", model: str | None = "m"
    ) -> ProxyKey | KeyRefusal | None:
        return ring.recognise(identity.presented(secret), provider, model, 1000.0)

    def test_known_key(self) -> None:
        found = self.recognise(keyring(), KEY)
        self.assertEqual(found, proxy_key())

    def test_keys_mode_refuses(self) -> None:
        ring = keyring()
        missing = self.recognise(ring, None)
        self.assertEqual((missing.status, missing.reason), (401, "missing_key"))  # type: ignore[union-attr]
        for secret in (OTHER, b"sk-real-provider-key", KEY + b"x", KEY[:-1]):
            refused = self.recognise(ring, secret)
            assert isinstance(refused, KeyRefusal)
            self.assertEqual((refused.status, refused.reason), (401, "unknown_key"))
            self.assertNotIn(secret.decode(), refused.message)

    def test_mixed_mode(self) -> None:
        """
        An unknown credential passes through, unless it has the proxy's key
        form: a proxy key that is wrong or revoked must never reach a
        provider.
        """
        ring = keyring("mixed")
        self.assertEqual(self.recognise(ring, KEY), proxy_key())
        self.assertIsNone(self.recognise(ring, b"sk-real-provider-key"))
        self.assertIsNone(self.recognise(ring, None))
        refused = self.recognise(ring, OTHER)
        assert isinstance(refused, KeyRefusal)
        self.assertEqual(refused.reason, "unknown_key")

    def test_passthrough(self) -> None:
        ring = keyring("passthrough")
        self.assertFalse(ring.active)
        self.assertIsNone(self.recognise(ring, KEY))

    def test_expired(self) -> None:
        ring = keyring("keys", proxy_key(expires_at=1000.0))
        refused = ring.recognise(identity.presented(KEY), "openai", None, 1000.0)
        assert isinstance(refused, KeyRefusal)
        self.assertEqual((refused.status, refused.reason), (401, "expired_key"))
        self.assertEqual(
            ring.recognise(identity.presented(KEY), "openai", None, 999.9),
            proxy_key(expires_at=1000.0),
        )

    def test_providers(self) -> None:
        ring = keyring("keys", proxy_key(providers=("openai",)))
        self.assertIsInstance(self.recognise(ring, KEY, "openai"), ProxyKey)
        refused = self.recognise(ring, KEY, "anthropic")
        assert isinstance(refused, KeyRefusal)
        self.assertEqual((refused.status, refused.reason), (403, "provider_not_allowed"))

    def test_models(self) -> None:
        ring = keyring("keys", proxy_key(models=("gpt-4o*", "o[13]-mini", "gemini-?.?-flash")))
        for allowed in (
            "gpt-4o",
            "gpt-4o-mini",
            "o1-mini",
            "gemini-2.0-flash",
            "models/gemini-2.5-flash",
            None,
        ):
            self.assertIsInstance(self.recognise(ring, KEY, model=allowed), ProxyKey, allowed)
        for denied in (
            "gpt-4",
            "GPT-4o",
            "o2-mini",
            "o1-mini-2024",
            "gemini-2.0-flash-lite",
            "x/gpt-4o",
        ):
            refused = self.recognise(ring, KEY, model=denied)
            assert isinstance(refused, KeyRefusal), denied
            self.assertEqual((refused.status, refused.reason), (403, "model_not_allowed"))

    def test_many_keys(self) -> None:
        keys = [proxy_key(b"llmp-%d" % n, id=f"k{n}") for n in range(500)]
        ring = keyring("keys", *keys)
        self.assertEqual(self.recognise(ring, b"llmp-321"), keys[321])


class PresentedTests(SynchronousTestCase):
    def test_presented(self) -> None:
        presented = identity.presented(KEY)
        assert presented is not None
        self.assertEqual(presented.digest, hashlib.sha256(KEY).digest())
        self.assertTrue(presented.proxy_form)
        self.assertNotIn(presented.digest.hex(), repr(presented))
        other = identity.presented(b"sk-x")
        assert other is not None
        self.assertFalse(other.proxy_form)
        self.assertIsNone(identity.presented(None))


class CredentialSwapTests(SynchronousTestCase):
    def test_apply(self) -> None:
        swap = CredentialSwap(
            {
                "openai": {"Authorization": "Bearer sk-real"},
                "gemini": {"x-goog-api-key": "AIza-real"},
            }
        )
        outgoing = Headers(
            {
                b"authorization": [b"Bearer llmp-x"],
                b"x-api-key": [b"llmp-x"],
                b"x-goog-api-key": [b"llmp-x"],
                b"api-key": [b"llmp-x"],
                b"anthropic-version": [b"2023-06-01"],
            }
        )
        swap.apply(outgoing, "gemini")
        self.assertEqual(
            sorted(outgoing.getAllRawHeaders()),
            [(b"Anthropic-Version", [b"2023-06-01"]), (b"X-Goog-Api-Key", [b"AIza-real"])],
        )
        swap.apply(outgoing, "openai")
        self.assertEqual(outgoing.getRawHeaders(b"authorization"), [b"Bearer sk-real"])
        self.assertIsNone(outgoing.getRawHeaders(b"x-goog-api-key"))
        # A mount without a configured credential gets none of the client's.
        swap.apply(outgoing, "anthropic")
        self.assertEqual(
            list(outgoing.getAllRawHeaders()), [(b"Anthropic-Version", [b"2023-06-01"])]
        )

    def test_repr_hides_secrets(self) -> None:
        swap = CredentialSwap({"openai": {"Authorization": "Bearer sk-real"}})
        self.assertNotIn("sk-real", repr(swap))
        self.assertEqual(list(swap.secrets()), ["Bearer sk-real"])

    def test_without_query_key(self) -> None:
        self.assertEqual(without_query_key(b"alt=sse&key=llmp-x"), b"alt=sse")
        self.assertEqual(without_query_key(b"key=a&alt=sse&%6Bey=b&key"), b"alt=sse")
        self.assertEqual(without_query_key(b"monkey=1&keys=2"), b"monkey=1&keys=2")
        self.assertEqual(without_query_key(b""), b"")
