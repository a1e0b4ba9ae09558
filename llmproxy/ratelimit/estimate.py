# -*- test-case-name: llmproxy.test.test_ratelimit -*-
"""
Input-token estimates, made before a request is forwarded.

The limiter reserves tokens before the provider has said how many a request
uses; the reservation is corrected to the real count afterwards
(L{llmproxy.ratelimit.IRateLimiter.reconcile}).  A good estimate keeps the
correction small; a cheap one keeps the proxy fast, so this is arithmetic on
sizes the caller already has, never a tokenizer.
"""

from __future__ import annotations

import math

from llmproxy.config import Estimation

_FALLBACK_RATIO = 4.0
"""Used if a configured ratio is not positive, so a bad value cannot divide by 0."""


def estimate_tokens(
    *, text_chars: int | None, body_bytes: int, provider: str, estimation: Estimation
) -> int:
    """
    Estimate a request's input tokens.

    Contract with the caller: C{text_chars} is the number of characters of
    prompt text the provider module found in the JSON body, and C{None} when
    the body is not JSON or is larger than C{estimation.max_sample_bytes}
    (the caller does not parse it then, which bounds the cost of sampling).
    With text, the estimate is C{ceil(text_chars / ratio)} where the ratio is
    C{provider_chars_per_token[provider]} if set, else C{chars_per_token};
    without, C{ceil(body_bytes / bytes_per_token)}.

    @param body_bytes: the size of the request body as received.
    @param provider: the provider's configured name (the URL prefix).
    """
    if text_chars is not None:
        ratio = estimation.provider_chars_per_token.get(provider) or estimation.chars_per_token
        size = text_chars
    else:
        ratio = estimation.bytes_per_token
        size = body_bytes
    if ratio <= 0:
        ratio = _FALLBACK_RATIO
    return math.ceil(max(0, size) / ratio)
