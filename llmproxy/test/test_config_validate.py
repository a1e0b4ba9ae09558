"""
Tests for L{llmproxy.config.validate}: each section's keys and the rules
that span keys (custom providers, pricing, rate limit overrides).
"""

from __future__ import annotations

import attrs

from llmproxy.config import (
    ConfigError,
    Limits,
    ModelPricing,
    Price,
    PriceTier,
    ProviderConfig,
    parse_config,
)
from llmproxy.test.test_config import FilesMixin, price


class SectionTests(FilesMixin):
    """
    Section-specific rules, each error naming the file and the key path.
    """

    def test_bad_kind(self) -> None:
        self.assertOneError(
            "providers:\n  groq: {kind: groq, base_url: 'https://api.groq.com/openai'}\n",
            "providers.groq.kind",
            "expected one of 'openai', 'anthropic', 'gemini', 'azure_openai', 'bedrock', "
            "'vertex', got 'groq'",
        )

    def test_custom_provider_needs_kind_and_base_url(self) -> None:
        path = self.write("config.yml", "providers:\n  local: {enabled: true}\n")
        self.assertEqual(
            self.errors([path]),
            [
                f"{path}: providers.local.kind: expected one of 'openai', 'anthropic', "
                "'gemini', 'azure_openai', 'bedrock', 'vertex' (required for a provider that "
                "is not built in), got nothing",
                f"{path}: providers.local.base_url: expected an http(s) URL (required for a "
                "provider that is not built in), got nothing",
            ],
        )

    def test_provider_names(self) -> None:
        """
        Provider names are URL path segments of lowercase letters, digits,
        C{_} and C{-}, and cannot shadow C{/health}, C{/metrics}, C{/meta}.
        """
        for name in ("Groq", "a/b", "a.b", "'a b'"):
            self.assertOneError(
                f"providers:\n  {name}: {{kind: openai, base_url: 'http://h'}}\n",
                f"providers.{name.strip(chr(39))}",
                "expected a provider name made of a-z, 0-9",
            )
        for name in ("health", "metrics", "meta"):
            self.assertOneError(
                f"providers:\n  {name}: {{kind: openai, base_url: 'http://h'}}\n",
                f"providers.{name}",
                "expected a provider name other than health, metrics, meta, status",
            )

    def test_listen(self) -> None:
        self.assertOneError(
            "server: {listen: 'tcp:9002'}\n",
            "server.listen",
            "expected a list of endpoint descriptions",
        )
        self.assertOneError(
            "server: {listen: ['tcp:1', '']}\n",
            "server.listen[1]",
            "expected a non-empty string, got ''",
        )
        config = self.load("server: {listen: ['tcp:1', 'unix:/tmp/s']}\n")
        self.assertEqual(config.server.listen, ("tcp:1", "unix:/tmp/s"))

    def test_workers(self) -> None:
        """
        C{server.workers} is a whole number of processes from 1 to 256.
        """
        for bad, expected in (
            ("0", "expected an integer > 0, got 0"),
            ("-2", "expected an integer > 0, got -2"),
            ("1.5", "expected an integer > 0, got 1.5"),
            ("'two'", "expected an integer > 0, got 'two'"),
            ("true", "expected an integer > 0, got True"),
            ("257", "expected an integer from 1 to 256, got 257"),
        ):
            self.assertOneError(f"server: {{workers: {bad}}}\n", "server.workers", expected)
        self.assertEqual(self.load("server: {workers: 4}\n").server.workers, 4)
        self.assertEqual(self.load("logging: {level: info}\n").server.workers, 1)

    def test_transports(self) -> None:
        self.assertOneError(
            "features: {cost_tracking: {transports: [{type: s3}]}}\n",
            "features.cost_tracking.transports[0].type",
            "expected 'file', got 's3'",
        )
        self.assertOneError(
            "features: {cost_tracking: {transports: [{type: file, file: {}}]}}\n",
            "features.cost_tracking.transports[0].file.path",
            "expected a non-empty string, got nothing",
        )
        self.assertOneError(
            "features: {cost_tracking: {transports: [{type: file}]}}\n",
            "features.cost_tracking.transports[0].file",
            "got nothing",
        )

    def test_cost_tracking_enabled_needs_a_transport(self) -> None:
        self.assertOneError(
            "features: {cost_tracking: {enabled: true}}\n",
            "features.cost_tracking.transports",
            "expected at least one transport when enabled is true, got nothing",
        )
        self.assertOneError(
            "features: {cost_tracking: {enabled: true, transports: []}}\n",
            "features.cost_tracking.transports",
            "expected at least one transport when enabled is true, got []",
        )

    def test_estimation(self) -> None:
        prefix = "features: {rate_limiting: {estimation: "
        for text, key, expected in [
            ("{chars_per_token: 0}", "chars_per_token", "expected a number > 0, got 0"),
            ("{bytes_per_token: -4}", "bytes_per_token", "expected a number > 0, got -4"),
            ("{max_sample_bytes: -1}", "max_sample_bytes", "expected an integer >= 0, got -1"),
            (
                "{provider_chars_per_token: {openai: 0}}",
                "provider_chars_per_token.openai",
                "expected a number > 0, got 0",
            ),
        ]:
            self.assertOneError(
                prefix + text + "}}\n", "features.rate_limiting.estimation." + key, expected
            )
        config = self.load(
            prefix + "{provider_chars_per_token: {anthropic: 3.5}, max_sample_bytes: 0}}}\n"
        )
        estimation = config.features.rate_limiting.estimation
        self.assertEqual(estimation.provider_chars_per_token, {"anthropic": 3.5})
        self.assertEqual(estimation.max_sample_bytes, 0)

    def test_protective_limits(self) -> None:
        """
        The limits that protect the proxy itself take positive numbers.
        """
        for key, bad in [
            ("max_connections", "0"),
            ("header_timeout_seconds", "0"),
            ("body_timeout_seconds", "-1"),
            ("min_body_rate_bytes_per_second", "1.5"),
            ("client_stall_timeout_seconds", "soon"),
        ]:
            error = self.assertOneError(f"server: {{{key}: {bad}}}\n", "server." + key, "expected")
            self.assertIn("> 0", error)
        for text, key, expected in [
            (
                "features: {rate_limiting: {max_tracked_scopes: 0}}\n",
                "features.rate_limiting.max_tracked_scopes",
                "expected an integer > 0, got 0",
            ),
            (
                "features: {rate_limiting: {max_tracked_scopes: many}}\n",
                "features.rate_limiting.max_tracked_scopes",
                "expected an integer > 0, got 'many'",
            ),
        ]:
            self.assertOneError(text, key, expected)
        config = self.load("features: {rate_limiting: {max_tracked_scopes: 10}}\n")
        self.assertEqual(config.features.rate_limiting.max_tracked_scopes, 10)
        prefix = "features: {rate_limiting: {redis: "
        for text, key, expected in [
            ("{outage_after_failures: 0}", "outage_after_failures", "expected an integer > 0"),
            ("{outage_limit_fraction: 0}", "outage_limit_fraction", "expected a number > 0"),
            ("{outage_limit_fraction: 1.5}", "outage_limit_fraction", "> 0 and <= 1, got 1.5"),
            ("{outage_limit_fraction: half}", "outage_limit_fraction", "got 'half'"),
        ]:
            self.assertOneError(
                prefix + text + "}}\n", "features.rate_limiting.redis." + key, expected
            )
        redis = self.load(prefix + "{outage_limit_fraction: 0.25}}}\n").features.rate_limiting.redis
        self.assertEqual((redis.outage_limit_fraction, redis.timeout_ms), (0.25, 250))

    def test_parse_config_source(self) -> None:
        """
        L{parse_config} names its C{source} in every message.
        """
        error = self.assertRaises(
            ConfigError, parse_config, {"server": {"listen": [1]}}, "<reload>"
        )
        self.assertEqual(
            error.errors, ["<reload>: server.listen[0]: expected a non-empty string, got 1"]
        )


class PricingTests(FilesMixin):
    def pricing(self, model: str) -> str:
        """
        YAML for an openai provider with one model, C{model}.
        """
        return "providers:\n  openai:\n    models:\n      m: " + model + "\n"

    def priced(self, model: str) -> ModelPricing:
        pricing = self.load(self.pricing(model)).providers["openai"].models["m"].pricing
        assert pricing is not None
        return pricing

    def test_defaults(self) -> None:
        """
        C{cache_read} and C{cache_write} default to C{input}, C{reasoning}
        to C{output}; a mapping is one catch-all tier.
        """
        self.assertEqual(
            self.priced("{pricing: {input: 2, output: 8}}"),
            ModelPricing(tiers=(PriceTier(threshold=0, price=price(2.0, 8.0)),)),
        )
        self.assertEqual(
            self.priced(
                "{pricing: {input: 3, output: 15, cache_read: 0.3, cache_write: 3.75, "
                "reasoning: 20}}"
            ).tiers,
            (PriceTier(threshold=0, price=Price(3.0, 15.0, 0.3, 3.75, 20.0)),),
        )

    def test_tiers_sorted_with_catch_all_last(self) -> None:
        pricing = self.priced(
            """
        pricing:
          - {threshold: 0, input: 4, output: 18}
          - {threshold: 1000000, input: 3, output: 16, cache_read: 1}
          - {threshold: 200000, input: 2, output: 12}
        """
        )
        self.assertEqual(
            pricing.tiers,
            (
                PriceTier(threshold=200000, price=price(2.0, 12.0)),
                PriceTier(threshold=1000000, price=price(3.0, 16.0, cache_read=1.0)),
                PriceTier(threshold=0, price=price(4.0, 18.0)),
            ),
        )

    def test_tiers_without_catch_all(self) -> None:
        """
        Without a catch-all the largest tier becomes it: requests above
        every threshold pay the largest tier's price.
        """
        pricing = self.priced(
            "{pricing: [{threshold: 500, input: 2, output: 3},"
            " {threshold: 100, input: 1, output: 1}]}"
        )
        self.assertEqual(
            pricing.tiers,
            (
                PriceTier(threshold=100, price=price(1.0, 1.0)),
                PriceTier(threshold=0, price=price(2.0, 3.0)),
            ),
        )

    def test_duplicate_thresholds(self) -> None:
        self.assertOneError(
            self.pricing(
                "{pricing: [{threshold: 0, input: 1, output: 1},"
                " {threshold: 0, input: 2, output: 2}]}"
            ),
            "providers.openai.models.m.pricing[1].threshold",
            "expected a threshold no other tier has (tier [0] has it), got 0",
        )

    def test_tier_errors(self) -> None:
        self.assertOneError(
            self.pricing("{pricing: []}"),
            "providers.openai.models.m.pricing",
            "expected at least one price tier",
        )
        self.assertOneError(
            self.pricing("{pricing: [{input: 1, output: 1}]}"),
            "providers.openai.models.m.pricing[0].threshold",
            "got nothing",
        )
        self.assertOneError(
            self.pricing("{pricing: [{threshold: -1, input: 1, output: 1}]}"),
            "providers.openai.models.m.pricing[0].threshold",
            "expected an integer >= 0, got -1",
        )
        self.assertOneError(
            self.pricing("{pricing: [{threshold: 0, input: 1, output: 1, overrides: {}}]}"),
            "providers.openai.models.m.pricing[0].overrides",
            "unknown key",
        )

    def test_price_errors(self) -> None:
        self.assertOneError(
            self.pricing("{pricing: {input: -1, output: 1}}"),
            "providers.openai.models.m.pricing.input",
            "expected a number >= 0, got -1",
        )
        self.assertOneError(
            self.pricing("{pricing: {input: 1}}"),
            "providers.openai.models.m.pricing.output",
            "expected a price in USD per 1M tokens, got nothing",
        )
        self.assertOneError(
            self.pricing("{pricing: {input: 1, output: '2'}}"),
            "providers.openai.models.m.pricing.output",
            "got '2'",
        )
        self.assertOneError(
            self.pricing("{pricing: 5}"),
            "providers.openai.models.m.pricing",
            "expected a price mapping {input, output, ...} or a list of tiers, got 5",
        )

    def test_overrides(self) -> None:
        pricing = self.priced(
            """
        aliases: [m-old, m-new]
        pricing:
          input: 2.5
          output: 10
          cache_read: 1.25
          overrides:
            m-old: {input: 5, output: 15}
            m-new: [{threshold: 0, input: 1, output: 2}]
        """
        )
        self.assertEqual(pricing.tiers, (PriceTier(0, price(2.5, 10.0, cache_read=1.25)),))
        self.assertEqual(
            pricing.overrides,
            {
                "m-old": ModelPricing(tiers=(PriceTier(0, price(5.0, 15.0)),)),
                "m-new": ModelPricing(tiers=(PriceTier(0, price(1.0, 2.0)),)),
            },
        )

    def test_override_must_name_an_alias(self) -> None:
        self.assertOneError(
            self.pricing(
                "{aliases: [a], pricing: {input: 1, output: 1,"
                " overrides: {b: {input: 1, output: 1}}}}"
            ),
            "providers.openai.models.m.pricing.overrides.b",
            "expected one of the model's aliases (a), got 'b'",
        )

    def test_no_nested_overrides(self) -> None:
        self.assertOneError(
            self.pricing(
                "{aliases: [a], pricing: {input: 1, output: 1, "
                "overrides: {a: {input: 1, output: 1, overrides: {}}}}}"
            ),
            "providers.openai.models.m.pricing.overrides.a.overrides",
            "unknown key",
        )

    def test_alias_used_twice(self) -> None:
        self.assertOneError(
            "providers:\n  openai:\n    models:\n      m: {}\n      n: {aliases: [x, m]}\n",
            "providers.openai.models.n.aliases[1]",
            "expected a name no other model of this provider uses ('m' does), got 'm'",
        )

    def test_unpriced(self) -> None:
        """
        A model without C{pricing}, or with C{pricing: null} (to unprice a
        model a base file priced), has no pricing.
        """
        models = (
            self.load(
                "providers:\n  openai:\n    models:\n"
                "      a: {aliases: [a1]}\n      b: {pricing: null}\n"
            )
            .providers["openai"]
            .models
        )
        self.assertIsNone(models["a"].pricing)
        self.assertEqual(models["a"].aliases, ("a1",))
        self.assertIsNone(models["b"].pricing)

    def test_model_name_must_be_a_string(self) -> None:
        self.assertOneError(
            "providers:\n  openai:\n    models:\n      4: {}\n",
            "providers.openai.models.4",
            "expected a non-empty string as the model name, got 4",
        )


class RateLimitOverrideTests(FilesMixin):
    def test_filled_from_limits(self) -> None:
        """
        Every override value is complete: keys it leaves out come from
        C{limits}.
        """
        config = self.load(
            """\
            features:
              rate_limiting:
                limits: {requests_per_minute: 10, tokens_per_minute: 1000, tokens_per_day: 5}
                overrides:
                  per_provider: {anthropic: {requests_per_minute: 2}}
                  per_model: {gpt-4o: {tokens_per_minute: 0}}
                  per_key: {k1: {}}
                  per_user: {alice: {requests_per_day: 7, tokens_per_day: 70}}
            """
        )
        overrides = config.features.rate_limiting.overrides
        self.assertEqual(overrides.per_provider, {"anthropic": Limits(2, 1000, 0, 5)})
        self.assertEqual(overrides.per_model, {"gpt-4o": Limits(10, 0, 0, 5)})
        self.assertEqual(overrides.per_key, {"k1": Limits(10, 1000, 0, 5)})
        self.assertEqual(overrides.per_user, {"alice": Limits(10, 1000, 7, 70)})

    def test_errors(self) -> None:
        prefix = "features:\n  rate_limiting:\n    overrides:\n      "
        self.assertOneError(
            prefix + "per_user: {bob: {requests_per_hour: 1}}\n",
            "features.rate_limiting.overrides.per_user.bob.requests_per_hour",
            "unknown key",
        )
        self.assertOneError(
            prefix + "per_key: {k: {tokens_per_day: -3}}\n",
            "features.rate_limiting.overrides.per_key.k.tokens_per_day",
            "expected an integer >= 0, got -3",
        )
        self.assertOneError(
            prefix + "per_team: {}\n",
            "features.rate_limiting.overrides.per_team",
            "unknown key",
        )
        self.assertOneError(
            prefix + "per_provider: {nope: {}}\n",
            "features.rate_limiting.overrides.per_provider.nope",
            "expected the name of a configured provider, got 'nope'",
        )

    def test_custom_provider_override(self) -> None:
        config = self.load(
            """\
            providers:
              local: {kind: openai, base_url: 'http://127.0.0.1:11434/v1'}
            features:
              rate_limiting:
                overrides: {per_provider: {local: {requests_per_day: 1}}}
            """
        )
        self.assertEqual(
            config.features.rate_limiting.overrides.per_provider, {"local": Limits(0, 0, 1, 0)}
        )


class CustomProviderTests(FilesMixin):
    def test_custom_provider(self) -> None:
        config = self.load(
            """\
            providers:
              groq:
                kind: openai
                base_url: https://api.groq.com/openai/
                inject_stream_usage: false
                timeouts: {first_byte_seconds: 30}
            """
        )
        self.assertEqual(
            config.providers["groq"],
            ProviderConfig(
                name="groq",
                kind="openai",
                base_url="https://api.groq.com/openai",
                inject_stream_usage=False,
                timeouts=attrs.evolve(config.providers["openai"].timeouts, first_byte_seconds=30.0),
            ),
        )
        self.assertEqual(list(config.providers)[:3], ["openai", "anthropic", "gemini"])


class ResilienceKeyTests(FilesMixin):
    """
    C{upstreams}, C{fallback}, C{retry}, C{stream_gate}, C{circuit_breaker}.
    """

    def test_upstreams(self) -> None:
        config = self.load(
            "providers:\n"
            "  openai:\n"
            "    upstreams:\n"
            "      - {base_url: 'http://a:8080/v1', headers: {Authorization: Bearer x}}\n"
            "      - {name: b, base_url: 'http://b', weight: 3, priority: 1,\n"
            "         models: {gpt-4o: gpt-4o-prod}}\n"
            "    retry: {max_attempts: 4}\n"
        )
        openai = config.providers["openai"]
        self.assertEqual([u.name for u in openai.upstreams], ["a:8080", "b"])
        self.assertEqual(openai.base_url, "http://a:8080/v1")
        self.assertEqual(openai.upstreams[1].models, {"gpt-4o": "gpt-4o-prod"})
        self.assertEqual((openai.retry.max_attempts, openai.retry.backoff_seconds), (4, 0.25))
        self.assertEqual(config.providers["anthropic"].upstreams[0].name, "api.anthropic.com")

    def test_bad_values(self) -> None:
        path = self.write(
            "config.yml",
            "providers:\n"
            "  openai:\n"
            "    base_url: 'http://z'\n"
            "    upstreams:\n"
            "      - {name: a, base_url: 'http://a', weight: 0, headers: {'bad name': x}}\n"
            "      - {name: a, base_url: 'http://a2', models: {m: ''}}\n"
            "      - {name: c}\n"
            "    fallback: [anthropic, nowhere, openai]\n"
            "    retry: {max_attempts: 0, backoff_seconds: -1}\n"
            "    stream_gate: {max_bytes: -5}\n"
            "    circuit_breaker: {failures: 0, cooldown_seconds: 0}\n",
        )
        errors = [error.split(": ", 1)[1] for error in self.errors([path])]
        expected = [
            "providers.openai.base_url: expected either base_url or upstreams, not both",
            "providers.openai.upstreams[0].weight: expected an integer > 0, got 0",
            "providers.openai.upstreams[0].headers.bad name: expected a header name",
            "providers.openai.upstreams[1].models.m: expected the model's name at this upstream",
            "providers.openai.upstreams[1].name: expected a name no other upstream",
            "providers.openai.upstreams[2].base_url: expected an http(s) URL (required)",
            "providers.openai.fallback[0]: expected a provider of kind 'openai', got 'anthropic'",
            "providers.openai.fallback[1]: expected the name of a configured provider",
            "providers.openai.fallback[2]: expected another provider than this one",
            "providers.openai.retry.max_attempts: expected an integer > 0, got 0",
            "providers.openai.retry.backoff_seconds: expected a number >= 0, got -1",
            "providers.openai.stream_gate.max_bytes: expected an integer >= 0, got -5",
            "providers.openai.circuit_breaker.failures: expected an integer > 0, got 0",
            "providers.openai.circuit_breaker.cooldown_seconds: expected a number > 0, got 0",
        ]
        for line in expected:
            self.assertTrue(any(error.startswith(line) for error in errors), (line, errors))
        self.assertEqual(len(errors), len(expected), errors)

    def test_empty_upstreams(self) -> None:
        self.assertOneError(
            "providers:\n  openai: {upstreams: []}\n",
            "providers.openai.upstreams",
            "expected a non-empty list of upstreams, got []",
        )
