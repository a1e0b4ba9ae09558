# -*- test-case-name: llmproxy.test.test_metering -*-
"""
Prices and what a request cost.

Everything here is pure: no reactor, no I/O. The accounting phase asks a
L{PriceBook} what a request cost (L{llmproxy.accounting}).

Costs are exact floats in USD. Nothing is rounded and nothing is guessed: a
model without a price is I{unpriced} (all three costs C{None}), never $0 and
never priced like a model whose name merely looks similar.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from attrs import frozen
from twisted.logger import Logger

from llmproxy.config import Config, ModelPricing, Price
from llmproxy.usage import Usage

log = Logger()

PER_TOKENS = 1_000_000
"""Prices are USD per this many tokens."""

_GEMINI_PREFIX = "models/"

_VERSION_SUFFIX = re.compile(
    r"-(?:"
    r"(?:19|20)\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"  # -2024-08-06
    r"|(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"  # -20250929
    r"|(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"  # -05-06
    r"|(?:0[1-9]|1[0-2])-(?:19|20)\d\d"  # -09-2025
    r"|(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"  # -0613
    r"|0\d\d"  # -001 (Gemini model versions)
    r"|latest|preview|exp"
    r")$"
)
"""
One version-like suffix at the end of a model name. Dates are checked for a
plausible month and day, so C{-2048} or C{-1536} are not taken for dates.
"""


@frozen
class Cost:
    """
    What one request cost, in USD.

    @ivar input_cost: uncached input, cache reads and cache writes, each at
        its own price.
    @ivar output_cost: non-reasoning output and reasoning output, each at its
        own price.
    @ivar total_cost: C{input_cost + output_cost}.
    @ivar matched_model: the configured model (a key under
        C{providers.<name>.models}) whose pricing was applied; it differs from
        the response's model for an alias or a dated-name fallback. C{None}
        when unpriced.
    """

    input_cost: float | None
    output_cost: float | None
    total_cost: float | None
    matched_model: str | None

    @property
    def priced(self) -> bool:
        """
        C{True} if a price applied (even one that comes to $0).
        """
        return self.total_cost is not None


UNPRICED = Cost(input_cost=None, output_cost=None, total_cost=None, matched_model=None)
"""The cost of a request whose model has no price: unknown, not zero."""


@frozen
class _Entry:
    """
    A priced name: the configured model it belongs to and the pricing that
    applies to this exact name (an alias's override, or the model's own).
    """

    model: str
    pricing: ModelPricing


def _bare(name: str) -> str:
    """
    Gemini names models C{models/gemini-2.5-flash}; price them as
    C{gemini-2.5-flash}.
    """
    if name.startswith(_GEMINI_PREFIX):
        return name[len(_GEMINI_PREFIX) :]
    return name


def _tier_price(pricing: ModelPricing, input_tokens: int) -> Price | None:
    """
    The price of the first tier whose threshold is at least C{input_tokens}
    or is the catch-all C{0}. Tiers are sorted ascending with the catch-all
    last; if none matches (no catch-all, and more input than the largest
    threshold), the largest tier applies.
    """
    if not pricing.tiers:
        return None
    for tier in pricing.tiers:
        if tier.threshold == 0 or tier.threshold >= input_tokens:
            return tier.price
    return max(pricing.tiers, key=lambda tier: tier.threshold).price


def compute_cost(price: Price, usage: Usage, matched_model: str) -> Cost:
    """
    Apply one price to one request's usage.

    Token counts that contradict each other (cache tokens exceeding the
    input, reasoning exceeding the output) are clamped so that no term goes
    negative.
    """
    cached = usage.cache_read_tokens + usage.cache_write_tokens
    uncached_input = max(usage.input_tokens - cached, 0)
    plain_output = max(usage.output_tokens - usage.reasoning_tokens, 0)
    input_cost = (
        uncached_input * price.input
        + usage.cache_read_tokens * price.cache_read
        + usage.cache_write_tokens * price.cache_write
    ) / PER_TOKENS
    output_cost = (
        plain_output * price.output + usage.reasoning_tokens * price.reasoning
    ) / PER_TOKENS
    return Cost(
        input_cost=input_cost,
        output_cost=output_cost,
        total_cost=input_cost + output_cost,
        matched_model=matched_model,
    )


class PriceBook:
    """
    Every provider's price table, looked up by the model name a response
    carries.

    Lookup, per provider:
      1. the exact name (a C{models/} prefix is ignored): a configured model,
         or one of its aliases, priced by that alias's override when it has
         one, else by the model's own pricing;
      2. else, if the name ends in a version-like suffix (C{-2024-08-06},
         C{-20250929}, C{-05-06}, C{-09-2025}, C{-0613}, C{-001}, C{-latest},
         C{-preview}, C{-exp}), that suffix is cut off and step 1 is tried
         again, one suffix at a time, so the longest priced base name wins:
         C{gemini-2.5-pro-preview-05-06} tries C{gemini-2.5-pro-preview},
         then C{gemini-2.5-pro};
      3. else the model is unpriced.

    There is no fuzzy matching: C{gpt-4o-mini} is never priced as C{gpt-4o}.

    A book is immutable; a reload builds a new one.
    """

    def __init__(self, tables: Mapping[str, Mapping[str, _Entry]]) -> None:
        self._tables = tables

    @classmethod
    def from_config(cls, config: Config) -> PriceBook:
        """
        Build the book from every provider's C{models}. A model without
        C{pricing} contributes nothing, so it and its aliases are unpriced.
        When two models claim the same name, the one listed first keeps it,
        and a model's own name always beats another model's alias.
        """
        tables: dict[str, dict[str, _Entry]] = {}
        for provider in config.providers.values():
            table: dict[str, _Entry] = {}
            priced = [
                (name, model.aliases, model.pricing)
                for name, model in provider.models.items()
                if model.pricing is not None
            ]
            for name, _, pricing in priced:
                table.setdefault(_bare(name), _Entry(name, pricing))
            for name, aliases, pricing in priced:
                for alias in (*aliases, *pricing.overrides):
                    table.setdefault(
                        _bare(alias), _Entry(name, pricing.overrides.get(alias, pricing))
                    )
            tables[provider.name] = table
        return cls(tables)

    def _entry(self, provider: str, model: str) -> _Entry | None:
        table = self._tables.get(provider)
        if not table:
            return None
        name = _bare(model)
        while True:
            entry = table.get(name)
            if entry is not None:
                return entry
            shorter = _VERSION_SUFFIX.sub("", name, count=1)
            if shorter == name or not shorter:
                return None
            name = shorter

    def price(self, provider: str, model: str, input_tokens: int) -> Price | None:
        """
        The price a request for C{model} with C{input_tokens} of input would
        pay (its tier), looked up as L{cost} does; L{None} when unpriced.
        """
        entry = self._entry(provider, model)
        return None if entry is None else _tier_price(entry.pricing, input_tokens)

    def cost(self, provider: str, model: str | None, usage: Usage) -> Cost:
        """
        What C{usage} cost on C{provider} (the configured provider name) for
        C{model} (the model the response named, or the request's if the
        response named none).

        @return: L{UNPRICED} when the model has no price.
        """
        if model is None:
            return UNPRICED
        entry = self._entry(provider, model)
        if entry is None:
            return UNPRICED
        price = _tier_price(entry.pricing, usage.input_tokens)
        if price is None:
            return UNPRICED
        return compute_cost(price, usage, entry.model)


class UnpricedWarnings:
    """
    Logs one warning per unpriced (provider, model), so an unpriced model is
    noticed without a log line per request.

    The set of names already warned about is bounded: model names come from
    upstream responses, and a misbehaving upstream must not grow it without
    limit. Past the bound, further unpriced models are still counted in
    C{llmproxy_unpriced_requests_total} but not logged.
    """

    def __init__(self, limit: int = 1000) -> None:
        self._seen: set[tuple[str, str | None]] = set()
        self._limit = limit

    def warn_once(self, provider: str, model: str | None) -> bool:
        """
        Log a warning the first time C{(provider, model)} is seen.

        @return: whether a warning was logged.
        """
        key = (provider, model)
        if key in self._seen or len(self._seen) >= self._limit:
            return False
        self._seen.add(key)
        log.warn(
            "No price for model {model!r} of provider {provider}: its cost records carry "
            "null costs. Add it (or an alias) under providers.{provider}.models.",
            provider=provider,
            model=model,
        )
        return True
