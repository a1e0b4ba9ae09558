# trial's assertion methods are unannotated; calling them is fine.
# mypy: disallow-untyped-calls=False
"""
Tests for L{llmproxy.pricing} and L{llmproxy.records}: prices, costs and the cost record.

Expected costs are worked out by hand in each test, so a wrong formula
cannot agree with itself.
"""

from __future__ import annotations

from typing import Any, cast

import orjson
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from llmproxy import pricing
from llmproxy.config import (
    Config,
    ModelConfig,
    ModelPricing,
    Price,
    PriceTier,
    ProviderConfig,
)
from llmproxy.pricing import UNPRICED, Cost, PriceBook, UnpricedWarnings
from llmproxy.records import make_record, rfc3339
from llmproxy.usage import Usage

USD = 1e-9
"""Golden costs must agree to a billionth of a dollar."""


def price(
    input: float,
    output: float,
    cache_read: float | None = None,
    cache_write: float | None = None,
    reasoning: float | None = None,
) -> Price:
    """
    A L{Price} with the documented defaults for the optional kinds
    (C{cache_read} and C{cache_write} = C{input}, C{reasoning} = C{output}),
    as the config loader fills them in.
    """
    return Price(
        input=input,
        output=output,
        cache_read=input if cache_read is None else cache_read,
        cache_write=input if cache_write is None else cache_write,
        reasoning=output if reasoning is None else reasoning,
    )


def flat(p: Price, overrides: dict[str, ModelPricing] | None = None) -> ModelPricing:
    return ModelPricing(tiers=(PriceTier(threshold=0, price=p),), overrides=overrides or {})


def book(**providers: dict[str, ModelConfig]) -> PriceBook:
    return PriceBook.from_config(
        Config(
            providers={
                name: ProviderConfig(
                    name=name, kind="openai", base_url="http://127.0.0.1:1", models=m
                )
                for name, m in providers.items()
            }
        )
    )


GPT_4O = price(2.50, 10.00, cache_read=1.25)
O3 = price(2.00, 8.00, cache_read=0.50, reasoning=12.00)
SONNET = price(3.00, 15.00, cache_read=0.30, cache_write=3.75)
GEMINI_PRO_LOW = price(1.25, 10.00)
GEMINI_PRO_HIGH = price(2.50, 15.00)

BOOK = book(
    openai={
        "gpt-4o": ModelConfig(
            aliases=("gpt-4o-2024-08-06", "gpt-4o-2024-05-13"),
            pricing=flat(GPT_4O, overrides={"gpt-4o-2024-05-13": flat(price(5.00, 15.00))}),
        ),
        "o3": ModelConfig(pricing=flat(O3)),
        "gpt-4": ModelConfig(pricing=flat(price(30.00, 60.00))),
        "unpriced-model": ModelConfig(aliases=("unpriced-alias",)),
    },
    anthropic={
        "claude-sonnet-4-5": ModelConfig(pricing=flat(SONNET)),
        "claude-3-5-sonnet": ModelConfig(pricing=flat(SONNET)),
    },
    gemini={
        "gemini-2.5-pro": ModelConfig(
            pricing=ModelPricing(
                tiers=(
                    PriceTier(threshold=200_000, price=GEMINI_PRO_LOW),
                    PriceTier(threshold=0, price=GEMINI_PRO_HIGH),
                )
            )
        ),
        "gemini-2.5-flash": ModelConfig(pricing=flat(price(0.30, 2.50, cache_read=0.075))),
        "gemini-2.0-flash": ModelConfig(pricing=flat(price(0.10, 0.40))),
        "stepped": ModelConfig(
            pricing=ModelPricing(
                tiers=(
                    PriceTier(threshold=100, price=price(1.0, 2.0)),
                    PriceTier(threshold=1000, price=price(3.0, 4.0)),
                )
            )
        ),
    },
)


class CostTests(SynchronousTestCase):
    """
    L{PriceBook.cost} applies the right price with the cost formula of
    docs/cost-tracking.md ("Pricing rules").
    """

    def assertCost(
        self,
        cost: Cost,
        input_cost: float,
        output_cost: float,
        matched_model: str,
    ) -> None:
        self.assertTrue(cost.priced)
        self.assertEqual(cost.matched_model, matched_model)
        assert cost.input_cost is not None
        assert cost.output_cost is not None
        assert cost.total_cost is not None
        self.assertAlmostEqual(cost.input_cost, input_cost, delta=USD)
        self.assertAlmostEqual(cost.output_cost, output_cost, delta=USD)
        self.assertAlmostEqual(cost.total_cost, input_cost + output_cost, delta=USD)

    def test_simple(self) -> None:
        """
        Input and output tokens at their flat prices, per million tokens.
        """
        cost = BOOK.cost("openai", "gpt-4o", Usage(input_tokens=1000, output_tokens=500))
        # 1000 * 2.50 / 1e6 = 0.0025; 500 * 10.00 / 1e6 = 0.005
        self.assertCost(cost, 0.0025, 0.005, "gpt-4o")

    def test_noRoundingUp(self) -> None:
        """
        A tiny request costs exactly what it costs, not a rounded-up 0.0001.
        """
        cost = BOOK.cost("gemini", "gemini-2.0-flash", Usage(input_tokens=7, output_tokens=3))
        # 7 * 0.10 / 1e6 = 0.0000007; 3 * 0.40 / 1e6 = 0.0000012
        self.assertCost(cost, 0.0000007, 0.0000012, "gemini-2.0-flash")
        self.assertLess(cost.total_cost or 1.0, 0.000002)

    def test_cacheReadAndWrite(self) -> None:
        """
        Cache reads and writes are parts of C{input_tokens}, each priced on
        its own; only the uncached remainder pays the input price.
        """
        usage = Usage(
            input_tokens=10_000,
            cache_read_tokens=6_000,
            cache_write_tokens=2_000,
            output_tokens=1_000,
        )
        cost = BOOK.cost("anthropic", "claude-sonnet-4-5", usage)
        # uncached 2000 * 3.00 + 6000 * 0.30 + 2000 * 3.75 = 6000 + 1800 + 7500 = 15300 -> 0.0153
        # 1000 * 15.00 = 15000 -> 0.015
        self.assertCost(cost, 0.0153, 0.015, "claude-sonnet-4-5")

    def test_cacheReadDefaultPrice(self) -> None:
        """
        With C{cache_read} defaulted to C{input}, cached tokens cost the same
        as uncached ones.
        """
        usage = Usage(input_tokens=1_000_000, cache_read_tokens=400_000, output_tokens=0)
        cost = BOOK.cost("gemini", "gemini-2.0-flash", usage)
        self.assertCost(cost, 0.10, 0.0, "gemini-2.0-flash")

    def test_reasoningPricedSeparately(self) -> None:
        """
        Reasoning tokens are part of C{output_tokens} and pay the reasoning
        price; the rest pays the output price.
        """
        usage = Usage(input_tokens=2_000, output_tokens=3_000, reasoning_tokens=2_000)
        cost = BOOK.cost("openai", "o3", usage)
        # 2000 * 2.00 = 4000 -> 0.004; 1000 * 8.00 + 2000 * 12.00 = 32000 -> 0.032
        self.assertCost(cost, 0.004, 0.032, "o3")

    def test_reasoningDefaultPrice(self) -> None:
        """
        With C{reasoning} defaulted to C{output}, reasoning tokens cost the
        same as other output.
        """
        usage = Usage(input_tokens=0, output_tokens=1_000, reasoning_tokens=600)
        cost = BOOK.cost("openai", "gpt-4o", usage)
        self.assertCost(cost, 0.0, 0.01, "gpt-4o")

    def test_everyKind(self) -> None:
        """
        All five kinds in one request.
        """
        usage = Usage(
            input_tokens=1_500_000,
            cache_read_tokens=500_000,
            cache_write_tokens=250_000,
            output_tokens=300_000,
            reasoning_tokens=100_000,
        )
        p = price(2.0, 8.0, cache_read=0.5, cache_write=2.5, reasoning=12.0)
        cost = book(x={"m": ModelConfig(pricing=flat(p))}).cost("x", "m", usage)
        # 750000 * 2.0 + 500000 * 0.5 + 250000 * 2.5 = 1.5 + 0.25 + 0.625 = 2.375
        # 200000 * 8.0 + 100000 * 12.0 = 1.6 + 1.2 = 2.8
        self.assertCost(cost, 2.375, 2.8, "m")

    def test_inconsistentCountsClamped(self) -> None:
        """
        Cache tokens beyond the input, or reasoning beyond the output, never
        make a term negative.
        """
        usage = Usage(
            input_tokens=100, cache_read_tokens=300, output_tokens=10, reasoning_tokens=50
        )
        cost = BOOK.cost("openai", "o3", usage)
        # uncached max(100 - 300, 0) = 0; 300 * 0.50 = 150 -> 0.00015
        # plain output max(10 - 50, 0) = 0; 50 * 12.00 = 600 -> 0.0006
        self.assertCost(cost, 0.00015, 0.0006, "o3")

    def test_zeroUsageIsZeroNotNull(self) -> None:
        """
        A priced model with no tokens costs $0, which is known, so not null.
        """
        cost = BOOK.cost("openai", "gpt-4o", Usage())
        self.assertCost(cost, 0.0, 0.0, "gpt-4o")

    def test_tierBelowAndAtThreshold(self) -> None:
        """
        The first tier whose threshold is at least the input tokens applies;
        the threshold itself is inside the tier.
        """
        for input_tokens in (1, 200_000):
            cost = BOOK.cost("gemini", "gemini-2.5-pro", Usage(input_tokens=input_tokens))
            self.assertCost(cost, input_tokens * 1.25 / 1e6, 0.0, "gemini-2.5-pro")

    def test_tierCatchAll(self) -> None:
        """
        Above every threshold, the catch-all (C{threshold: 0}) tier applies.
        """
        usage = Usage(input_tokens=200_001, output_tokens=1_000)
        cost = BOOK.cost("gemini", "gemini-2.5-pro", usage)
        # 200001 * 2.50 = 500002.5 -> 0.5000025; 1000 * 15.00 -> 0.015
        self.assertCost(cost, 0.5000025, 0.015, "gemini-2.5-pro")

    def test_tiersWithoutCatchAll(self) -> None:
        """
        Without a catch-all, the tier with the largest threshold applies
        above every threshold.
        """
        cases = [(50, 1.0, 2.0), (100, 1.0, 2.0), (101, 3.0, 4.0), (5_000, 3.0, 4.0)]
        for input_tokens, p_in, p_out in cases:
            usage = Usage(input_tokens=input_tokens, output_tokens=10)
            cost = BOOK.cost("gemini", "stepped", usage)
            self.assertCost(cost, input_tokens * p_in / 1e6, 10 * p_out / 1e6, "stepped")

    def test_tierOnlyCatchAllAfterThresholds(self) -> None:
        """
        The catch-all is never picked while a threshold tier fits.
        """
        pricing = ModelPricing(
            tiers=(
                PriceTier(threshold=10, price=price(1.0, 1.0)),
                PriceTier(threshold=20, price=price(2.0, 2.0)),
                PriceTier(threshold=0, price=price(3.0, 3.0)),
            )
        )
        b = book(x={"m": ModelConfig(pricing=pricing)})
        got = [b.cost("x", "m", Usage(input_tokens=n)).input_cost for n in (10, 15, 21)]
        self.assertEqual(got, [10 * 1.0 / 1e6, 15 * 2.0 / 1e6, 21 * 3.0 / 1e6])

    def test_alias(self) -> None:
        """
        An alias is priced like its model, and C{matched_model} names the
        model.
        """
        usage = Usage(input_tokens=1000, output_tokens=500)
        cost = BOOK.cost("openai", "gpt-4o-2024-08-06", usage)
        self.assertCost(cost, 0.0025, 0.005, "gpt-4o")

    def test_overrideForAlias(self) -> None:
        """
        An alias with an override uses the override's price.
        """
        usage = Usage(input_tokens=1000, output_tokens=500)
        cost = BOOK.cost("openai", "gpt-4o-2024-05-13", usage)
        # 1000 * 5.00 -> 0.005; 500 * 15.00 -> 0.0075
        self.assertCost(cost, 0.005, 0.0075, "gpt-4o")

    def test_overrideDoesNotLeakToModel(self) -> None:
        """
        The model's own name keeps the model's price when an alias has an
        override.
        """
        cost = BOOK.cost("openai", "gpt-4o", Usage(input_tokens=1000))
        self.assertCost(cost, 0.0025, 0.0, "gpt-4o")

    def test_datedNameFallsBackToBaseName(self) -> None:
        """
        A dated or versioned name that is not priced itself falls back to its
        priced base name, and C{matched_model} says which.
        """
        cases = [
            ("openai", "gpt-4o-2024-11-20", "gpt-4o"),
            ("openai", "gpt-4-0613", "gpt-4"),
            ("openai", "gpt-4-0125-preview", "gpt-4"),
            ("openai", "o3-2025-04-16", "o3"),
            ("anthropic", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
            ("anthropic", "claude-3-5-sonnet-latest", "claude-3-5-sonnet"),
            ("gemini", "gemini-2.5-pro-preview-05-06", "gemini-2.5-pro"),
            ("gemini", "gemini-2.5-pro-exp-03-25", "gemini-2.5-pro"),
            ("gemini", "gemini-2.0-flash-001", "gemini-2.0-flash"),
            ("gemini", "gemini-2.0-flash-exp", "gemini-2.0-flash"),
            ("gemini", "gemini-2.5-flash-preview-09-2025", "gemini-2.5-flash"),
        ]
        for provider, model, base in cases:
            cost = BOOK.cost(provider, model, Usage(input_tokens=1))
            self.assertEqual(
                (model, cost.matched_model, cost.input_cost),
                (model, base, BOOK.cost(provider, base, Usage(input_tokens=1)).input_cost),
            )

    def test_longestPricedBaseNameWins(self) -> None:
        """
        Suffixes are cut one at a time, so a priced intermediate name beats a
        shorter one.
        """
        b = book(
            gemini={
                "gemini-2.5-pro": ModelConfig(pricing=flat(price(1.0, 1.0))),
                "gemini-2.5-pro-preview": ModelConfig(pricing=flat(price(2.0, 2.0))),
            }
        )
        cost = b.cost("gemini", "gemini-2.5-pro-preview-05-06", Usage(input_tokens=1_000_000))
        self.assertEqual((cost.matched_model, cost.input_cost), ("gemini-2.5-pro-preview", 2.0))

    def test_noFuzzyMatching(self) -> None:
        """
        Names that only look like a priced one stay unpriced: a different
        model variant, a non-date number, an unknown suffix.
        """
        for provider, model in [
            ("openai", "gpt-4o-mini"),
            ("openai", "gpt-4o-realtime-preview-2024-12-17"),
            ("openai", "gpt-4o-2048"),
            ("openai", "gpt-4o-2024-13-01"),
            ("openai", "gpt-4o-13-2025"),
            ("openai", "gpt4o"),
            ("openai", "GPT-4O"),
            ("gemini", "gemini-2.5-flash-preview-tts"),
            ("gemini", "gemini-2.5-pro-vision"),
            ("anthropic", "claude-sonnet-4"),
        ]:
            self.assertEqual((model, BOOK.cost(provider, model, Usage())), (model, UNPRICED))

    def test_geminiModelsPrefix(self) -> None:
        """
        Gemini's C{models/} prefix is ignored, also before a fallback.
        """
        usage = Usage(input_tokens=1_000_000, cache_read_tokens=1_000_000)
        for model in ("models/gemini-2.5-flash", "models/gemini-2.5-flash-001"):
            cost = BOOK.cost("gemini", model, usage)
            self.assertCost(cost, 0.075, 0.0, "gemini-2.5-flash")

    def test_geminiModelsPrefixInConfig(self) -> None:
        """
        A price configured under a C{models/} name prices the bare name too.
        """
        b = book(gemini={"models/gemini-2.5-flash": ModelConfig(pricing=flat(price(1.0, 1.0)))})
        cost = b.cost("gemini", "gemini-2.5-flash", Usage(input_tokens=1_000_000))
        self.assertEqual((cost.matched_model, cost.input_cost), ("models/gemini-2.5-flash", 1.0))

    def test_unpriced(self) -> None:
        """
        An unknown model, a model without pricing (and its alias), an unknown
        provider and a missing model name are unpriced: all three costs
        C{None}, never 0.
        """
        for provider, model in [
            ("openai", "text-davinci-003"),
            ("openai", "unpriced-model"),
            ("openai", "unpriced-alias"),
            ("nowhere", "gpt-4o"),
            ("openai", None),
            ("openai", ""),
            ("openai", "models/"),
        ]:
            cost = BOOK.cost(provider, model, Usage(input_tokens=10, output_tokens=10))
            self.assertEqual(
                (cost.input_cost, cost.output_cost, cost.total_cost, cost.matched_model),
                (None, None, None, None),
            )
            self.assertFalse(cost.priced)

    def test_pricesArePerProvider(self) -> None:
        """
        A model priced under one provider is not priced under another.
        """
        self.assertEqual(BOOK.cost("anthropic", "gpt-4o", Usage()), UNPRICED)

    def test_emptyTiersUnpriced(self) -> None:
        """
        A pricing without any tier prices nothing.
        """
        b = book(x={"m": ModelConfig(pricing=ModelPricing(tiers=()))})
        self.assertEqual(b.cost("x", "m", Usage(input_tokens=1)), UNPRICED)

    def test_nameConflicts(self) -> None:
        """
        A model's own name beats another model's alias, and the first model
        listed keeps a shared alias.
        """
        b = book(
            x={
                "a": ModelConfig(aliases=("b", "shared"), pricing=flat(price(1.0, 1.0))),
                "b": ModelConfig(aliases=("shared",), pricing=flat(price(2.0, 2.0))),
            }
        )
        usage = Usage(input_tokens=1_000_000)
        self.assertEqual(b.cost("x", "b", usage), Cost(2.0, 0.0, 2.0, "b"))
        self.assertEqual(b.cost("x", "shared", usage), Cost(1.0, 0.0, 1.0, "a"))

    def test_defaultConfigPricesNothing(self) -> None:
        """
        The built-in default config has no price table.
        """
        self.assertEqual(
            PriceBook.from_config(Config()).cost("openai", "gpt-4o", Usage()), UNPRICED
        )


class UnpricedWarningsTests(SynchronousTestCase):
    """
    L{UnpricedWarnings} logs once per unpriced model.
    """

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.patch(pricing, "log", Logger(observer=cast(ILogObserver, self.events.append)))

    def test_oncePerModel(self) -> None:
        warnings = UnpricedWarnings()
        got = [
            warnings.warn_once("openai", "m1"),
            warnings.warn_once("openai", "m1"),
            warnings.warn_once("openai", "m2"),
            warnings.warn_once("anthropic", "m1"),
            warnings.warn_once("openai", None),
            warnings.warn_once("openai", None),
        ]
        self.assertEqual(got, [True, False, True, True, True, False])
        self.assertEqual(len(self.events), 4)
        self.assertEqual({e["log_level"] for e in self.events}, {LogLevel.warn})
        self.assertEqual((self.events[0]["provider"], self.events[0]["model"]), ("openai", "m1"))

    def test_bounded(self) -> None:
        """
        Past its limit it stops remembering (and logging) new names.
        """
        warnings = UnpricedWarnings(limit=2)
        got = [warnings.warn_once("p", m) for m in ("a", "b", "c", "a")]
        self.assertEqual(got, [True, True, False, False])
        self.assertEqual(len(self.events), 2)


FIELDS = [
    "timestamp",
    "request_id",
    "provider",
    "model",
    "matched_model",
    "endpoint",
    "user_id",
    "key_id",
    "is_streaming",
    "status",
    "complete",
    "finish_reason",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "total_tokens",
    "input_cost",
    "output_cost",
    "total_cost",
    "duration_ms",
    "ttfb_ms",
    "upstream",
    "attempts",
]
"""The cost record's fields, in the order docs/cost-tracking.md lists them."""

NOW = 1735787045.678  # 2025-01-02T03:04:05.678Z


class CostRecordTests(SynchronousTestCase):
    """
    L{make_record} and L{llmproxy.records.CostRecord.to_json} produce the
    documented cost record.
    """

    usage = Usage(
        model="claude-sonnet-4-5-20250929",
        input_tokens=10_000,
        output_tokens=1_000,
        cache_read_tokens=6_000,
        cache_write_tokens=2_000,
        reasoning_tokens=100,
        finish_reason="end_turn",
        reported=True,
    )

    def record(self, **kw: Any) -> dict[str, Any]:
        args: dict[str, Any] = dict(
            now=NOW,
            request_id="req-1",
            provider="anthropic",
            model="claude-sonnet-4-5-20250929",
            endpoint="/anthropic/v1/messages",
            user_id="alice",
            key_id="k-3f2a",
            is_streaming=True,
            status=200,
            complete=True,
            usage=self.usage,
            cost=BOOK.cost("anthropic", "claude-sonnet-4-5-20250929", self.usage),
            duration_ms=1234.5678912,
            ttfb_ms=321.0004999,
            upstream="anthropic/api.anthropic.com",
            attempts=2,
        )
        args.update(kw)
        data = make_record(**args).to_json()
        self.assertNotIn(b"\n", data)
        parsed: dict[str, Any] = orjson.loads(data)
        return parsed

    def test_fieldsInOrder(self) -> None:
        self.assertEqual(list(self.record()), FIELDS)

    def test_values(self) -> None:
        rec = self.record()
        self.assertEqual(
            rec,
            {
                "timestamp": "2025-01-02T03:04:05.678Z",
                "request_id": "req-1",
                "provider": "anthropic",
                "model": "claude-sonnet-4-5-20250929",
                "matched_model": "claude-sonnet-4-5",
                "endpoint": "/anthropic/v1/messages",
                "user_id": "alice",
                "key_id": "k-3f2a",
                "is_streaming": True,
                "status": 200,
                "complete": True,
                "finish_reason": "end_turn",
                "input_tokens": 10_000,
                "output_tokens": 1_000,
                "cache_read_tokens": 6_000,
                "cache_write_tokens": 2_000,
                "reasoning_tokens": 100,
                "total_tokens": 11_000,
                "input_cost": rec["input_cost"],
                "output_cost": rec["output_cost"],
                "total_cost": rec["total_cost"],
                "duration_ms": 1234.568,
                "ttfb_ms": 321.0,
                "upstream": "anthropic/api.anthropic.com",
                "attempts": 2,
            },
        )
        self.assertAlmostEqual(rec["input_cost"], 0.0153, delta=USD)
        self.assertAlmostEqual(rec["output_cost"], 0.015, delta=USD)
        self.assertAlmostEqual(rec["total_cost"], 0.0303, delta=USD)
        for name in ("input_cost", "output_cost", "total_cost", "duration_ms", "ttfb_ms"):
            self.assertIsInstance(rec[name], float)

    def test_nulls(self) -> None:
        """
        Unpriced costs, a missing user, key, model, finish reason and TTFB are
        JSON nulls, not zeros or empty strings.
        """
        rec = self.record(
            model=None,
            user_id=None,
            key_id=None,
            usage=Usage(),
            cost=UNPRICED,
            ttfb_ms=None,
            status=502,
            complete=False,
            is_streaming=False,
        )
        for name in (
            "model",
            "matched_model",
            "user_id",
            "key_id",
            "finish_reason",
            "input_cost",
            "output_cost",
            "total_cost",
            "ttfb_ms",
        ):
            self.assertIsNone(rec[name], name)
        self.assertEqual(
            [
                rec[n]
                for n in ("status", "complete", "is_streaming", "input_tokens", "total_tokens")
            ],
            [502, False, False, 0, 0],
        )

    def test_timestamp(self) -> None:
        """
        RFC 3339, UTC, milliseconds truncated (never rounded into the next
        second), C{Z}.
        """
        self.assertEqual(rfc3339(0.0), "1970-01-01T00:00:00.000Z")
        self.assertEqual(rfc3339(NOW), "2025-01-02T03:04:05.678Z")
        self.assertEqual(rfc3339(1735787045.9999), "2025-01-02T03:04:05.999Z")
        self.assertEqual(rfc3339(1735787045.0), "2025-01-02T03:04:05.000Z")

    def test_timestamp_across_seconds(self) -> None:
        """
        The remembered second never leaks into another one, forwards or back.
        """
        for now, text in [
            (1735787045.5, "2025-01-02T03:04:05.500Z"),
            (1735787046.25, "2025-01-02T03:04:06.250Z"),
            (1735787045.75, "2025-01-02T03:04:05.750Z"),
            (1735787045.75, "2025-01-02T03:04:05.750Z"),
            (1735873445.0, "2025-01-03T03:04:05.000Z"),
        ]:
            self.assertEqual(rfc3339(now), text)
