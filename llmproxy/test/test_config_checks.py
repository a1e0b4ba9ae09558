"""
Tests for L{llmproxy.config.checks} and L{llmproxy.config.errors}: every
error names the file and the dotted key path, and says what was expected
and what was found; single values (numbers, booleans, choices, URLs) are
parsed strictly.
"""

from __future__ import annotations

from llmproxy.config import ConfigError, parse_config
from llmproxy.test.test_config import FilesMixin


class ErrorMessageTests(FilesMixin):
    """
    Every error names the file and the dotted key path.
    """

    def test_message_form(self) -> None:
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

    def test_long_values_are_shortened(self) -> None:
        error = self.assertRaises(
            ConfigError, parse_config, {"logging": {"format": "x" * 500}}, "s"
        )
        self.assertLess(len(error.errors[0]), 200)
        self.assertTrue(error.errors[0].endswith("..."))


class URLTests(FilesMixin):
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
