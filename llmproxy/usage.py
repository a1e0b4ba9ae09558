"""
The normalised usage of one request, the same meaning for every provider.
"""

from __future__ import annotations

from attrs import frozen


@frozen
class Usage:
    """
    Token usage as reported by the provider, normalised.

    @ivar input_tokens: every prompt token the model read, cached ones included.
    @ivar cache_read_tokens: part of C{input_tokens} served from cache.
    @ivar cache_write_tokens: part of C{input_tokens} written to cache.
    @ivar output_tokens: every generated token, reasoning included.
    @ivar reasoning_tokens: part of C{output_tokens}.
    @ivar reported: C{True} once the provider said anything about usage; a
        record with C{reported=False} carries zeros that mean "unknown".
    """

    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    finish_reason: str | None = None
    upstream_request_id: str | None = None
    reported: bool = False

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens
