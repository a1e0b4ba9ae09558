# -*- test-case-name: llmproxy.test.test_auth -*-
"""
Recognising the keys the proxy issues (C{auth.keys}) and deciding what a
key may do.

A L{Keyring} is built from one configuration, so a reload swaps the whole
set of keys at once for new requests (a request keeps the keyring of the
runtime it started with). It is asked once per request, by the admission
phase, with the credential the client presented; it answers with the
L{ProxyKey} the request runs under, L{None} when the client's credential
passes through, or a L{KeyRefusal}.

Keys are compared by their SHA-256: the table is keyed by digest (an
attacker timing the lookup learns about digests of guesses, not about any
key), and the entry found is confirmed with a constant-time comparison.
"""

from __future__ import annotations

import fnmatch
import hmac
import re
from collections.abc import Iterable

from attrs import frozen

from llmproxy.config import AuthConfig, ProxyKey
from llmproxy.credentials import CredentialSwap
from llmproxy.identity import Presented


@frozen
class KeyRefusal:
    """
    Why a request may not use the proxy.

    @ivar status: 401 (no valid key) or 403 (the key may not do this).
    @ivar reason: the C{reason} label of C{llmproxy_auth_failures_total}:
        C{missing_key}, C{unknown_key}, C{expired_key},
        C{provider_not_allowed}, C{model_not_allowed}.
    @ivar message: for the error body; it never repeats the key.
    """

    status: int
    reason: str
    message: str


def model_matcher(patterns: Iterable[str]) -> re.Pattern[str]:
    """
    One regular expression matching any of the glob C{patterns}, case
    sensitively (C{*}, C{?}, C{[...]}, C{[!...]}).
    """
    return re.compile("|".join(f"(?:{fnmatch.translate(pattern)})" for pattern in patterns))


class Keyring:
    """
    The proxy keys of one configuration.

    @ivar mode: C{auth.mode}.
    @ivar swap: the provider credentials sent in place of a proxy key.
    """

    __slots__ = ("_by_digest", "_models", "mode", "swap")

    def __init__(self, auth: AuthConfig) -> None:
        self.mode: str = auth.mode
        self.swap = CredentialSwap(auth.credentials)
        self._by_digest: dict[bytes, ProxyKey] = {key.hash: key for key in auth.keys}
        self._models: dict[str, re.Pattern[str]] = {
            key.id: model_matcher(key.models) for key in auth.keys if key.models is not None
        }

    @property
    def active(self) -> bool:
        """
        Whether requests are checked at all (C{passthrough} checks none).
        """
        return self.mode != "passthrough"

    def recognise(
        self, presented: Presented | None, provider: str, model: str | None, now: float
    ) -> ProxyKey | KeyRefusal | None:
        """
        The proxy key a request runs under.

        @param presented: the client's credential.
        @param provider: the mount the request addresses.
        @param model: the model it names, if any.
        @param now: POSIX time, for expiry.
        @return: the key; L{None} when the client's credential passes
            through (C{passthrough}, or an unknown credential in C{mixed}
            mode that does not look like a proxy key); or a refusal.
        """
        if self.mode == "passthrough":
            return None
        key = None
        if presented is not None:
            found = self._by_digest.get(presented.digest)
            if found is not None and hmac.compare_digest(found.hash, presented.digest):
                key = found
        if key is None:
            if self.mode == "mixed" and (presented is None or not presented.proxy_form):
                return None
            if presented is None:
                return KeyRefusal(
                    401, "missing_key", "Missing API key: send a key issued by this proxy."
                )
            return KeyRefusal(401, "unknown_key", "Invalid API key.")
        if key.expires_at is not None and now >= key.expires_at:
            return KeyRefusal(401, "expired_key", f"API key {key.id} has expired.")
        if key.providers is not None and provider not in key.providers:
            return KeyRefusal(
                403, "provider_not_allowed", f"Key {key.id} may not use provider {provider}."
            )
        matcher = self._models.get(key.id)
        if matcher is not None and model is not None and not _allowed(matcher, model):
            return KeyRefusal(
                403, "model_not_allowed", f"Key {key.id} may not use model {model!r}."
            )
        return key


def _allowed(matcher: re.Pattern[str], model: str) -> bool:
    """
    Whether C{model} matches, with or without Gemini's C{models/} prefix.
    """
    if matcher.fullmatch(model) is not None:
        return True
    bare = model.removeprefix("models/")
    return bare != model and matcher.fullmatch(bare) is not None
