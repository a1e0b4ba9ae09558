"""
Tests for L{llmproxy.config}: loading, merging, expansion and strict
validation of YAML configuration files, and the shipped configs.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, get_args, get_origin, get_type_hints

import attrs
from twisted.trial.unittest import SynchronousTestCase

import llmproxy
from llmproxy.config import (
    PUBLIC_BASE_URLS,
    Config,
    ConfigError,
    Limits,
    ModelPricing,
    Price,
    PriceTier,
    ProviderConfig,
    load_config,
    parse_config,
    reference_keys,
)

CONFIGS = os.path.join(os.path.dirname(llmproxy.__file__), "..", "configs")


class _FilesMixin(SynchronousTestCase):
    """
    Writes YAML files into a fresh directory and loads them.
    """

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def write(self, name: str, text: str) -> str:
        """
        Write C{text} (dedented) to C{name} under the test directory.

        @return: the file's path.
        """
        path = os.path.join(self.directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as stream:
            stream.write(textwrap.dedent(text))
        return path

    def load(self, text: str, environ: Mapping[str, str] | None = None) -> Config:
        return load_config([self.write("config.yml", text)], environ or {})

    def errors(self, paths: Sequence[str], environ: Mapping[str, str] | None = None) -> list[str]:
        """
        Load C{paths}, which must fail.

        @return: the error messages.
        """
        error = self.assertRaises(ConfigError, load_config, paths, environ or {})
        self.assertEqual(str(error), "\n".join(error.errors))
        errors: list[str] = error.errors
        return errors

    def assertOneError(
        self,
        text: str,
        key: str,
        expected: str,
        environ: Mapping[str, str] | None = None,
    ) -> str:
        """
        Loading C{text} fails with exactly one error, which names the file,
        the dotted C{key} and contains C{expected}.

        @return: that error.
        """
        path = self.write("config.yml", text)
        errors = self.errors([path], environ)
        self.assertEqual(len(errors), 1, errors)
        self.assertTrue(errors[0].startswith(f"{path}: {key}: "), errors[0])
        self.assertIn(expected, errors[0])
        return errors[0]


class DefaultsTests(SynchronousTestCase):
    def test_no_files(self) -> None:
        """
        Without any file the built-in defaults apply: the three providers
        at their public base URLs, no limits, no cost sink.
        """
        config = load_config([], {})
        self.assertEqual(config, Config())
        self.assertEqual(
            {name: (p.kind, p.base_url) for name, p in config.providers.items()},
            {name: (name, url) for name, url in PUBLIC_BASE_URLS.items()},
        )
        self.assertFalse(config.features.rate_limiting.enabled)
        self.assertFalse(config.features.cost_tracking.enabled)

    def test_empty_mapping(self) -> None:
        """
        An empty mapping validates to the defaults too.
        """
        self.assertEqual(parse_config({}, "test"), Config())

    def test_empty_file(self) -> None:
        """
        An empty YAML file is an empty mapping.
        """
        path = self.mktemp()
        with open(path, "w"):
            pass
        self.assertEqual(load_config([path], {}), Config())

    def test_builtins_always_present(self) -> None:
        """
        Configuring one provider keeps the other built-ins; C{enabled:
        false} is how one is turned off.
        """
        config = parse_config({"providers": {"openai": {"enabled": False}}}, "test")
        self.assertEqual(sorted(config.providers), ["anthropic", "gemini", "openai"])
        self.assertFalse(config.providers["openai"].enabled)
        self.assertEqual(config.providers["openai"].base_url, PUBLIC_BASE_URLS["openai"])


class ErrorMessageTests(_FilesMixin):
    """
    Every error names the file and the dotted key path.
    """

    def test_spec_example(self) -> None:
        """
        The message has the form C{<file>: <key.path>: <expected>, got <value>}.
        """
        path = self.write(
            "dev.yml", "features:\n  rate_limiting:\n    limits:\n      requests_per_minute: ten\n"
        )
        self.assertEqual(
            self.errors([path]),
            [
                f"{path}: features.rate_limiting.limits.requests_per_minute: "
                "expected an integer >= 0, got 'ten'"
            ],
        )

    def test_unknown_top_level_key(self) -> None:
        self.assertOneError("sever: {}\n", "sever", "unknown key (did you mean 'server'?)")

    def test_unknown_nested_key(self) -> None:
        self.assertOneError(
            "providers:\n  openai:\n    timeouts: {idle_secnds: 5}\n",
            "providers.openai.timeouts.idle_secnds",
            "unknown key (did you mean 'idle_seconds'?)",
        )

    def test_unknown_key_in_list_item(self) -> None:
        self.assertOneError(
            """\
            features:
              cost_tracking:
                transports: [{type: file, file: {path: x.jsonl}, format: json}]
            """,
            "features.cost_tracking.transports[0].format",
            "unknown key",
        )

    def test_non_string_key(self) -> None:
        self.assertOneError("server: {1: 2}\n", "server.1", "unknown key")

    def test_wrong_type(self) -> None:
        self.assertOneError(
            "server:\n  max_body_bytes: big\n",
            "server.max_body_bytes",
            "expected an integer > 0, got 'big'",
        )

    def test_section_not_a_mapping(self) -> None:
        self.assertOneError("logging: json\n", "logging", "expected a mapping, got 'json'")

    def test_bool_is_not_an_integer(self) -> None:
        self.assertOneError(
            "features:\n  rate_limiting:\n    limits: {tokens_per_day: true}\n",
            "features.rate_limiting.limits.tokens_per_day",
            "expected an integer >= 0, got True",
        )

    def test_bool_is_not_a_number(self) -> None:
        self.assertOneError(
            "providers:\n  openai:\n    timeouts: {total_seconds: false}\n",
            "providers.openai.timeouts.total_seconds",
            "expected a number >= 0, got False",
        )

    def test_integer_is_not_a_bool(self) -> None:
        self.assertOneError(
            "features:\n  metrics: {enabled: 1}\n",
            "features.metrics.enabled",
            "expected true or false, got 1",
        )

    def test_negative_limit(self) -> None:
        self.assertOneError(
            "features:\n  rate_limiting:\n    limits: {requests_per_day: -1}\n",
            "features.rate_limiting.limits.requests_per_day",
            "expected an integer >= 0, got -1",
        )

    def test_negative_timeout(self) -> None:
        self.assertOneError(
            "providers:\n  gemini:\n    timeouts: {total_seconds: -0.5}\n",
            "providers.gemini.timeouts.total_seconds",
            "expected a number >= 0, got -0.5",
        )

    def test_zero_where_positive_required(self) -> None:
        self.assertOneError(
            "providers:\n  gemini:\n    timeouts: {idle_seconds: 0}\n",
            "providers.gemini.timeouts.idle_seconds",
            "expected a number > 0, got 0",
        )

    def test_not_finite(self) -> None:
        self.assertOneError(
            "server:\n  drain_timeout_seconds: .inf\n",
            "server.drain_timeout_seconds",
            "expected a number >= 0, got inf",
        )

    def test_collects_every_error(self) -> None:
        """
        All errors of a file are reported at once, in file order.
        """
        path = self.write(
            "config.yml",
            """\
            server: {max_body_bytes: -5, listen: tcp:9002}
            logging: {format: xml, level: INFO}
            features: {metrics: {enabled: yes please}}
            """,
        )
        errors = self.errors([path])
        self.assertEqual(
            [error.split(": ")[1] for error in errors],
            [
                "server.max_body_bytes",
                "server.listen",
                "logging.format",
                "logging.level",
                "features.metrics.enabled",
            ],
        )

    def test_bad_kind(self) -> None:
        self.assertOneError(
            "providers:\n  groq: {kind: groq, base_url: 'https://api.groq.com/openai'}\n",
            "providers.groq.kind",
            "expected one of 'openai', 'anthropic', 'gemini', got 'groq'",
        )

    def test_custom_provider_needs_kind_and_base_url(self) -> None:
        path = self.write("config.yml", "providers:\n  local: {enabled: true}\n")
        self.assertEqual(
            self.errors([path]),
            [
                f"{path}: providers.local.kind: expected one of 'openai', 'anthropic', "
                "'gemini' (required for a provider that is not built in), got nothing",
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
                "expected a provider name other than health, metrics and meta",
            )

    def test_choices(self) -> None:
        for text, key, expected in [
            (
                "logging: {format: xml}",
                "logging.format",
                "expected one of 'text', 'json', got 'xml'",
            ),
            ("logging: {level: warning}", "logging.level", "got 'warning'"),
            (
                "features: {rate_limiting: {backend: etcd}}",
                "features.rate_limiting.backend",
                "expected one of 'memory', 'redis', got 'etcd'",
            ),
            (
                "features: {rate_limiting: {fail_mode: shut}}",
                "features.rate_limiting.fail_mode",
                "expected one of 'open', 'closed', got 'shut'",
            ),
        ]:
            self.assertOneError(text + "\n", key, expected)

    def test_redis_url(self) -> None:
        for url in ("http://h:6379", "redis://", "redis://h:port", "redis://h/x", "redis://h?db=1"):
            self.assertOneError(
                f"features:\n  rate_limiting:\n    redis: {{url: '{url}'}}\n",
                "features.rate_limiting.redis.url",
                "expected a redis:// or rediss:// URL with a host",
            )
        for url in ("redis://h", "rediss://:pw@h:6380/4", "redis://127.0.0.1:6379/0"):
            config = self.load(f"features:\n  rate_limiting:\n    redis: {{url: '{url}'}}\n")
            self.assertEqual(config.features.rate_limiting.redis.url, url)

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

    def test_long_values_are_shortened(self) -> None:
        error = self.assertRaises(
            ConfigError, parse_config, {"logging": {"format": "x" * 500}}, "s"
        )
        self.assertLess(len(error.errors[0]), 200)
        self.assertTrue(error.errors[0].endswith("..."))


class URLTests(_FilesMixin):
    def base_url(self, url: str) -> str:
        config = self.load(f"providers:\n  openai: {{base_url: '{url}'}}\n")
        return config.providers["openai"].base_url

    def test_normalised(self) -> None:
        """
        A trailing slash is stripped; a port and a path prefix are kept.
        """
        self.assertEqual(self.base_url("https://api.openai.com/"), "https://api.openai.com")
        self.assertEqual(
            self.base_url("http://127.0.0.1:8000/v1/prefix/"), "http://127.0.0.1:8000/v1/prefix"
        )
        self.assertEqual(self.base_url("HTTPS://[::1]:443"), "https://[::1]:443")

    def test_rejected(self) -> None:
        for url, problem in [
            ("ftp://example.com", "scheme must be http or https"),
            ("example.com", "scheme must be http or https"),
            ("https://", "no host"),
            ("https:///v1", "no host"),
            ("https://example.com/v1?key=x", "no query or fragment"),
            ("https://example.com/#top", "no query or fragment"),
            ("https://user:pw@example.com", "credentials"),
            ("https://example.com:99999", "out of range"),
            ("https://exa mple.com", "whitespace"),
            ("", "whitespace"),
        ]:
            error = self.assertOneError(
                f"providers:\n  openai: {{base_url: '{url}'}}\n",
                "providers.openai.base_url",
                "expected an http(s) URL",
            )
            self.assertIn(problem, error)
            self.assertIn(f"got {url!r}", error)


class FileErrorTests(_FilesMixin):
    def test_yaml_syntax_error(self) -> None:
        """
        A YAML syntax error names the file and the line.
        """
        path = self.write("bad.yml", "server:\n  listen: [tcp:9002\nlogging: {}\n")
        [error] = self.errors([path])
        self.assertTrue(error.startswith(f"{path}: line "), error)
        self.assertIn("invalid YAML", error)

    def test_yaml_error_line(self) -> None:
        path = self.write("bad.yml", "server: {}\nlogging:\n  format: text\n   level: info\n")
        [error] = self.errors([path])
        self.assertTrue(error.startswith(f"{path}: line 4, column "), error)

    def test_duplicate_key(self) -> None:
        """
        A key given twice in one mapping is an error, not silently the last.
        """
        path = self.write("dup.yml", "logging:\n  level: info\n  level: debug\n")
        [error] = self.errors([path])
        self.assertTrue(error.startswith(f"{path}: line 3, column 3: "), error)
        self.assertIn("duplicate key 'level'", error)

    def test_yaml_merge_keys_are_not_duplicates(self) -> None:
        config = self.load(
            """\
            providers:
              openai:
                timeouts: &t {connect_seconds: 5, idle_seconds: 7}
              anthropic:
                timeouts:
                  <<: *t
                  idle_seconds: 9
            """
        )
        self.assertEqual(config.providers["anthropic"].timeouts.connect_seconds, 5.0)
        self.assertEqual(config.providers["anthropic"].timeouts.idle_seconds, 9.0)

    def test_top_level_not_a_mapping(self) -> None:
        path = self.write("list.yml", "- a\n- b\n")
        self.assertEqual(
            self.errors([path]), [f"{path}: (top level): expected a mapping, got ['a', 'b']"]
        )

    def test_missing_file(self) -> None:
        path = os.path.join(self.directory, "absent.yml")
        [error] = self.errors([path])
        self.assertTrue(error.startswith(f"{path}: cannot read the file"), error)

    def test_bad_extends_path(self) -> None:
        """
        An C{extends} that names no file is reported against the file that
        has the C{extends} key.
        """
        path = self.write("dev.yml", "extends: nothere.yml\n")
        [error] = self.errors([path])
        self.assertTrue(error.startswith(f"{path}: extends: "), error)
        self.assertIn("got 'nothere.yml'", error)

    def test_extends_not_a_string(self) -> None:
        path = self.write("dev.yml", "extends: [a.yml]\n")
        self.assertEqual(
            self.errors([path]),
            [f"{path}: extends: expected the path of a YAML file, got ['a.yml']"],
        )

    def test_extends_cycle(self) -> None:
        a = self.write("a.yml", "extends: b.yml\n")
        b = self.write("b.yml", "extends: a.yml\n")
        [error] = self.errors([a])
        self.assertTrue(error.startswith(f"{b}: extends: "), error)
        self.assertIn(f"cycle {a} -> {b} -> {a}", error)

    def test_extends_itself(self) -> None:
        a = self.write("a.yml", "extends: ./a.yml\n")
        [error] = self.errors([a])
        self.assertTrue(error.startswith(f"{a}: extends: "), error)
        self.assertIn("cycle", error)

    def test_errors_across_files(self) -> None:
        """
        Problems in several files are all reported.
        """
        a = self.write("a.yml", "server: [\n")
        b = self.write("b.yml", "logging: {level: ${NOPE}}\n")
        errors = self.errors([a, b])
        self.assertEqual([error.split(":")[0] for error in errors], [a, b])

    def test_error_names_the_file_that_set_the_key(self) -> None:
        """
        After merging, a bad value is reported against the file it came
        from, not the last file loaded.
        """
        base = self.write("base.yml", "logging: {level: loud}\nserver: {max_body_bytes: 1}\n")
        dev = self.write("dev.yml", "extends: base.yml\nserver: {max_body_bytes: -1}\n")
        self.assertEqual(
            self.errors([dev]),
            [
                f"{base}: logging.level: expected one of 'debug', 'info', 'warn', 'error', "
                "'critical', got 'loud'",
                f"{dev}: server.max_body_bytes: expected an integer > 0, got -1",
            ],
        )

    def test_missing_key_names_the_file_of_its_parent(self) -> None:
        base = self.write("base.yml", "providers:\n  local: {base_url: 'http://h'}\n")
        dev = self.write("dev.yml", "extends: base.yml\nlogging: {level: debug}\n")
        [error] = self.errors([dev])
        self.assertTrue(error.startswith(f"{base}: providers.local.kind: "), error)


class MergeTests(_FilesMixin):
    def test_mappings_merge_key_by_key(self) -> None:
        self.write(
            "base.yml",
            """\
            server: {max_body_bytes: 100, drain_timeout_seconds: 5}
            providers:
              openai:
                timeouts: {connect_seconds: 3, idle_seconds: 4}
            """,
        )
        dev = self.write(
            "dev.yml",
            """\
            extends: base.yml
            server: {drain_timeout_seconds: 6}
            providers:
              openai:
                timeouts: {idle_seconds: 40}
            """,
        )
        config = load_config([dev], {})
        self.assertEqual(config.server.max_body_bytes, 100)
        self.assertEqual(config.server.drain_timeout_seconds, 6.0)
        timeouts = config.providers["openai"].timeouts
        self.assertEqual((timeouts.connect_seconds, timeouts.idle_seconds), (3.0, 40.0))

    def test_lists_replace(self) -> None:
        self.write(
            "base.yml", "server: {listen: ['tcp:1', 'tcp:2'], cors: {allow_origins: [a, b]}}\n"
        )
        dev = self.write("dev.yml", "extends: base.yml\nserver: {listen: ['tcp:3']}\n")
        config = load_config([dev], {})
        self.assertEqual(config.server.listen, ("tcp:3",))
        self.assertEqual(config.server.cors.allow_origins, ("a", "b"))

    def test_scalars_replace(self) -> None:
        self.write("base.yml", "logging: {level: debug, format: json}\n")
        dev = self.write("dev.yml", "extends: base.yml\nlogging: {level: error}\n")
        config = load_config([dev], {})
        self.assertEqual((config.logging.level, config.logging.format), ("error", "json"))

    def test_pricing_list_replaces_mapping(self) -> None:
        """
        A tier list replaces a price mapping wholesale, and the other way
        round; two price mappings merge key by key.
        """
        self.write(
            "base.yml",
            """\
            providers:
              openai:
                models:
                  m1: {pricing: {input: 1, output: 2}}
                  m2: {pricing: {input: 1, output: 2}}
                  m3: {pricing: [{threshold: 0, input: 1, output: 2}]}
            """,
        )
        dev = self.write(
            "dev.yml",
            """\
            extends: base.yml
            providers:
              openai:
                models:
                  m1: {pricing: [{threshold: 0, input: 5, output: 6}]}
                  m2: {pricing: {output: 3}}
                  m3: {pricing: {input: 7, output: 8}}
            """,
        )
        models = load_config([dev], {}).providers["openai"].models

        def prices(name: str) -> tuple[float, float]:
            pricing = models[name].pricing
            assert pricing is not None
            return (pricing.tiers[0].price.input, pricing.tiers[0].price.output)

        self.assertEqual(prices("m1"), (5.0, 6.0))
        self.assertEqual(prices("m2"), (1.0, 3.0))
        self.assertEqual(prices("m3"), (7.0, 8.0))

    def test_later_paths_merge_over_earlier(self) -> None:
        a = self.write("a.yml", "logging: {level: debug, format: json}\n")
        b = self.write("b.yml", "logging: {level: warn}\n")
        self.assertEqual(load_config([a, b], {}).logging.level, "warn")
        self.assertEqual(load_config([a, b], {}).logging.format, "json")
        self.assertEqual(load_config([b, a], {}).logging.level, "debug")

    def test_extends_is_relative_to_its_file(self) -> None:
        self.write("shared/base.yml", "logging: {level: critical}\n")
        self.write("shared/mid.yml", "extends: base.yml\nlogging: {format: json}\n")
        top = self.write("envs/prod/top.yml", "extends: ../../shared/mid.yml\n")
        config = load_config([top], {})
        self.assertEqual((config.logging.level, config.logging.format), ("critical", "json"))

    def test_diamond_is_not_a_cycle(self) -> None:
        """
        Two files may extend the same base.
        """
        self.write("base.yml", "logging: {level: debug}\n")
        a = self.write("a.yml", "extends: base.yml\n")
        b = self.write("b.yml", "extends: base.yml\nlogging: {format: json}\n")
        config = load_config([a, b], {})
        self.assertEqual((config.logging.level, config.logging.format), ("debug", "json"))

    def test_same_file_twice(self) -> None:
        a = self.write("a.yml", "logging: {level: debug}\n")
        self.assertEqual(load_config([a, a], {}).logging.level, "debug")


class EnvironmentTests(_FilesMixin):
    def test_variable(self) -> None:
        config = self.load("logging: {level: '${LEVEL}'}\n", {"LEVEL": "warn"})
        self.assertEqual(config.logging.level, "warn")

    def test_default(self) -> None:
        text = "server: {listen: ['tcp:${PORT:-9002}:interface=127.0.0.1']}\n"
        self.assertEqual(self.load(text).server.listen, ("tcp:9002:interface=127.0.0.1",))
        self.assertEqual(
            self.load(text, {"PORT": "8080"}).server.listen, ("tcp:8080:interface=127.0.0.1",)
        )
        self.assertEqual(self.load(text, {"PORT": ""}).server.listen[0][:9], "tcp:9002:")

    def test_several_and_nested(self) -> None:
        """
        References expand inside strings, in lists and nested mappings,
        several per string.
        """
        config = self.load(
            """\
            server:
              cors: {allow_origins: ['https://${HOST}', '${SCHEME:-http}://${HOST}:${P:-1}']}
            providers:
              local:
                kind: openai
                base_url: 'http://${HOST}:${P:-11434}/v1'
            """,
            {"HOST": "example.org", "P": "81"},
        )
        self.assertEqual(
            config.server.cors.allow_origins, ("https://example.org", "http://example.org:81")
        )
        self.assertEqual(config.providers["local"].base_url, "http://example.org:81/v1")

    def test_values_are_plain_strings(self) -> None:
        config = self.load("server: {listen: ['${L}']}\n", {"L": "tcp:1"})
        self.assertIs(type(config.server.listen[0]), str)

    def test_escape(self) -> None:
        config = self.load("server: {listen: ['$${NOT}', 'a$b']}\n")
        self.assertEqual(config.server.listen, ("${NOT}", "a$b"))

    def test_missing_variable(self) -> None:
        """
        An unset variable without a default is an error naming the key.
        """
        path = self.write("config.yml", "server:\n  listen: ['tcp:${PORT}']\n")
        self.assertEqual(
            self.errors([path]),
            [
                f"{path}: server.listen[0]: expected environment variable PORT to be set "
                "(or ${PORT:-default}), got 'tcp:${PORT}'"
            ],
        )

    def test_empty_variable_is_set(self) -> None:
        config = self.load("server: {cors: {allow_origins: ['a${EMPTY}']}}\n", {"EMPTY": ""})
        self.assertEqual(config.server.cors.allow_origins, ("a",))

    def test_malformed_reference(self) -> None:
        self.assertOneError(
            "server: {listen: ['${1X}']}\n", "server.listen[0]", "expected ${NAME} or"
        )

    def test_numbers_and_booleans_from_environment(self) -> None:
        """
        A reference may fill a numeric or boolean key; a literal string
        still may not.
        """
        text = """\
            features:
              rate_limiting:
                enabled: ${RL:-false}
                limits: {requests_per_minute: '${RPM:-60}'}
                estimation: {chars_per_token: '${CPT}'}
            """
        config = self.load(text, {"RL": "true", "CPT": "3.5"})
        self.assertIs(config.features.rate_limiting.enabled, True)
        self.assertEqual(config.features.rate_limiting.limits.requests_per_minute, 60)
        self.assertEqual(config.features.rate_limiting.estimation.chars_per_token, 3.5)
        self.assertOneError(
            text,
            "features.rate_limiting.limits.requests_per_minute",
            "expected an integer >= 0, got 'lots'",
            {"RPM": "lots", "CPT": "1"},
        )
        self.assertOneError(
            "features: {rate_limiting: {limits: {requests_per_minute: '60'}}}\n",
            "features.rate_limiting.limits.requests_per_minute",
            "got '60'",
        )

    def test_keys_are_not_expanded(self) -> None:
        self.assertOneError("'${X}': 1\n", "${X}", "unknown key", {"X": "server"})

    def test_extends_is_expanded(self) -> None:
        self.write("prod.yml", "logging: {level: error}\n")
        top = self.write("top.yml", "extends: '${ENV:-dev}.yml'\n")
        self.assertEqual(load_config([top], {"ENV": "prod"}).logging.level, "error")


def _price(
    input: float,
    output: float,
    cache_read: float | None = None,
    cache_write: float | None = None,
    reasoning: float | None = None,
) -> Price:
    return Price(
        input=input,
        output=output,
        cache_read=input if cache_read is None else cache_read,
        cache_write=input if cache_write is None else cache_write,
        reasoning=output if reasoning is None else reasoning,
    )


class PricingTests(_FilesMixin):
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
            ModelPricing(tiers=(PriceTier(threshold=0, price=_price(2.0, 8.0)),)),
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
                PriceTier(threshold=200000, price=_price(2.0, 12.0)),
                PriceTier(threshold=1000000, price=_price(3.0, 16.0, cache_read=1.0)),
                PriceTier(threshold=0, price=_price(4.0, 18.0)),
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
                PriceTier(threshold=100, price=_price(1.0, 1.0)),
                PriceTier(threshold=0, price=_price(2.0, 3.0)),
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
        self.assertEqual(pricing.tiers, (PriceTier(0, _price(2.5, 10.0, cache_read=1.25)),))
        self.assertEqual(
            pricing.overrides,
            {
                "m-old": ModelPricing(tiers=(PriceTier(0, _price(5.0, 15.0)),)),
                "m-new": ModelPricing(tiers=(PriceTier(0, _price(1.0, 2.0)),)),
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


class RateLimitOverrideTests(_FilesMixin):
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


class CustomProviderTests(_FilesMixin):
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


class ShippedConfigTests(SynchronousTestCase):
    """
    The configs in the repository load cleanly.
    """

    def test_base(self) -> None:
        config = load_config([os.path.join(CONFIGS, "base.yml")], {})
        self.assertFalse(config.features.rate_limiting.enabled)
        self.assertFalse(config.features.cost_tracking.enabled)
        self.assertTrue(config.features.metrics.enabled)
        for name, url in PUBLIC_BASE_URLS.items():
            self.assertEqual(config.providers[name].base_url, url)
            self.assertTrue(config.providers[name].models, name)
        openai = config.providers["openai"].models
        gpt4o = openai["gpt-4o"].pricing
        assert gpt4o is not None
        self.assertEqual(gpt4o.tiers, (PriceTier(0, _price(2.5, 10.0, cache_read=1.25)),))
        self.assertIn("gpt-4o-2024-05-13", gpt4o.overrides)
        for model in ("gpt-4o-mini", "gpt-4.1", "o3", "o4-mini", "text-embedding-3-small"):
            self.assertIsNotNone(openai[model].pricing, model)
        gemini = config.providers["gemini"].models["gemini-2.5-pro"].pricing
        assert gemini is not None
        self.assertEqual([tier.threshold for tier in gemini.tiers], [200000, 0])
        sonnet = config.providers["anthropic"].models["claude-sonnet-4-5"]
        self.assertIn("claude-sonnet-4-5-20250929", sonnet.aliases)
        assert sonnet.pricing is not None
        self.assertEqual(sonnet.pricing.tiers[0].price.cache_write, 3.75)

    def test_dev(self) -> None:
        config = load_config([os.path.join(CONFIGS, "dev.yml")], {})
        self.assertEqual(config.server.listen, ("tcp:9002:interface=127.0.0.1",))
        self.assertEqual((config.logging.format, config.logging.level), ("text", "info"))
        self.assertTrue(config.features.rate_limiting.enabled)
        self.assertEqual(config.features.rate_limiting.backend, "memory")
        self.assertEqual(config.features.rate_limiting.limits, Limits())
        self.assertTrue(config.features.cost_tracking.enabled)
        base = load_config([os.path.join(CONFIGS, "base.yml")], {})
        self.assertEqual(config.providers, base.providers)

    def test_dev_port(self) -> None:
        config = load_config([os.path.join(CONFIGS, "dev.yml")], {"PORT": "9100"})
        self.assertEqual(config.server.listen, ("tcp:9100:interface=127.0.0.1",))

    def test_every_shipped_config(self) -> None:
        names = sorted(name for name in os.listdir(CONFIGS) if name.endswith(".yml"))
        self.assertIn("dev.yml", names)
        for name in names:
            load_config([os.path.join(CONFIGS, name)], {})


def _model_keys(cls: Any, prefix: str) -> list[str]:
    """
    The dotted keys of the attrs model below C{cls}: attrs values recurse,
    mappings of attrs values recurse through a C{<>} placeholder, anything
    else is a leaf.
    """
    keys = []
    hints = get_type_hints(cls)
    for field in attrs.fields(cls):
        if cls is ProviderConfig and field.name == "name":
            continue  # the mapping key, not a YAML key
        kind = hints[field.name]
        key = f"{prefix}{field.name}"
        if attrs.has(kind):
            keys.extend(_model_keys(kind, key + "."))
        elif get_origin(kind) is Mapping and attrs.has(get_args(kind)[1]):
            keys.extend(_model_keys(get_args(kind)[1], key + ".<>."))
        else:
            keys.append(key)
    return keys


def _matches(pattern: str, key: str) -> bool:
    """
    Whether a reference key (with C{<name>} placeholders) covers a model key
    (with C{<>} placeholders).
    """
    left, right = pattern.split("."), key.split(".")
    return len(left) == len(right) and all(
        a == b or (a.startswith("<") and (b == "<>" or not b.startswith("<")))
        for a, b in zip(left, right, strict=True)
    )


class ReferenceKeysTests(SynchronousTestCase):
    def test_every_model_field_is_documented(self) -> None:
        documented = [key for key, _, _ in reference_keys()]
        for key in _model_keys(Config, ""):
            # A list of mappings is documented by its items' keys (transports[].type).
            self.assertTrue(
                any(
                    _matches(pattern, key) or pattern.startswith(key + "[]")
                    for pattern in documented
                ),
                f"{key} undocumented",
            )

    def test_every_documented_key_exists(self) -> None:
        """
        Each reference key is a model field, or one of the keys that YAML
        has and the model represents differently.
        """
        model = _model_keys(Config, "")
        yaml_only = ("extends", ".pricing.", ".pricing[]", ".transports[]")
        for key, default, meaning in reference_keys():
            self.assertTrue(meaning)
            self.assertTrue(default)
            if any(marker in key or key == marker for marker in yaml_only):
                continue
            self.assertTrue(any(_matches(key, field) for field in model), key)

    def test_defaults_come_from_the_model(self) -> None:
        rows = {key: default for key, default, _ in reference_keys()}
        self.assertEqual(rows["server.max_body_bytes"], "33554432")
        self.assertEqual(rows["server.cors.allow_origins"], '["*"]')
        self.assertEqual(rows["providers.<name>.timeouts.first_byte_seconds"], "600")
        self.assertEqual(rows["features.rate_limiting.redis.url"], "redis://127.0.0.1:6379/0")
        self.assertEqual(rows["features.metrics.enabled"], "true")
