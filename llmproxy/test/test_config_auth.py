"""
Tests for L{llmproxy.config.auth}: the C{auth} section, from YAML files,
with good values and bad ones (each error naming the key).
"""

from __future__ import annotations

import datetime

from llmproxy.config import Budget, Limits
from llmproxy.config.auth import glob_problem, parse_time
from llmproxy.test.test_config import FilesMixin

HASH = "sha256:" + "ab" * 32
OTHER = "sha256:" + "CD" * 32


class AuthSectionTests(FilesMixin):
    def test_defaults(self) -> None:
        auth = self.load("{}\n").auth
        self.assertEqual((auth.mode, auth.keys, dict(auth.credentials)), ("passthrough", (), {}))
        self.assertIsNone(auth.alerts.webhook_url)

    def test_full(self) -> None:
        config = self.load(
            f"""
            features:
              rate_limiting:
                limits: {{requests_per_minute: 60, tokens_per_day: 1000}}
            auth:
              mode: mixed
              keys:
                - id: team-a
                  hash: '{HASH}'
                  user: alice
                  providers: [openai]
                  models: ['gpt-4o*', 'o[134]-mini']
                  limits: {{requests_per_minute: 5}}
                  budget: {{daily_usd: 1.5, monthly_usd: 20, alert_at: [1, 0.5, 0.5]}}
                  expires_at: 2027-01-01T00:00:00Z
                - {{id: team.b, hash: '{OTHER}', budget: {{daily_usd: 0, unpriced: allow}}}}
              credentials:
                openai: {{Authorization: 'Bearer ${{OPENAI_API_KEY}}'}}
              budgets:
                per_user:
                  bob: {{monthly_usd: 3, reserve_output_tokens: 256}}
              alerts: {{webhook_url: 'https://hooks.example/budget?token=x'}}
            """,
            {"OPENAI_API_KEY": "sk-from-env"},
        )
        auth = config.auth
        first, second = auth.keys
        self.assertEqual(first.id, "team-a")
        self.assertEqual(first.hash, bytes.fromhex("ab" * 32))
        self.assertEqual(second.hash, bytes.fromhex("cd" * 32))
        self.assertEqual((first.user, first.providers), ("alice", ("openai",)))
        self.assertEqual(first.models, ("gpt-4o*", "o[134]-mini"))
        # Keys left out inherit features.rate_limiting.limits, as per_key does.
        self.assertEqual(first.limits, Limits(requests_per_minute=5, tokens_per_day=1000))
        self.assertEqual(first.budget, Budget(daily_usd=1.5, monthly_usd=20.0, alert_at=(0.5, 1.0)))
        self.assertEqual(
            first.expires_at, datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC).timestamp()
        )
        self.assertEqual(second.budget, Budget(daily_usd=0.0, unpriced="allow"))
        self.assertIsNone(second.limits)
        self.assertEqual(
            dict(auth.credentials), {"openai": {"Authorization": "Bearer sk-from-env"}}
        )
        self.assertEqual(
            auth.budgets.per_user["bob"], Budget(monthly_usd=3.0, reserve_output_tokens=256)
        )
        self.assertEqual(auth.alerts.webhook_url, "https://hooks.example/budget?token=x")
        # Secrets stay out of the configuration's repr.
        self.assertNotIn("sk-from-env", repr(config))
        self.assertNotIn("token=x", repr(config))

    def test_bad_mode(self) -> None:
        self.assertOneError(
            "auth: {mode: open}\n",
            "auth.mode",
            "expected one of 'passthrough', 'keys', 'mixed', got 'open'",
        )

    def test_bad_hash(self) -> None:
        for bad in ("'ab12'", f"'{HASH[7:]}'", f"'sha1:{'ab' * 32}'", f"'{HASH}0'", "42"):
            self.assertOneError(
                f"auth: {{keys: [{{id: a, hash: {bad}}}]}}\n",
                "auth.keys[0].hash",
                "expected 'sha256:' and 64 hex digits",
            )

    def test_missing_id_and_hash(self) -> None:
        path = self.write("config.yml", "auth: {keys: [{user: a}]}\n")
        self.assertEqual(
            self.errors([path]),
            [
                f"{path}: auth.keys[0].id: expected the key's id, got nothing",
                f"{path}: auth.keys[0].hash: expected the key's hash, got nothing",
            ],
        )

    def test_bad_id(self) -> None:
        for bad in ("'a b'", "'-a'", "'a/b'", "'" + "a" * 65 + "'"):
            self.assertOneError(
                f"auth: {{keys: [{{id: {bad}, hash: '{HASH}'}}]}}\n",
                "auth.keys[0].id",
                "expected a key id",
            )

    def test_duplicates(self) -> None:
        self.assertOneError(
            f"auth: {{keys: [{{id: a, hash: '{HASH}'}}, {{id: a, hash: '{OTHER}'}}]}}\n",
            "auth.keys[1].id",
            "expected an id no other key has ([0] has it), got 'a'",
        )
        # The same digest in upper case is the same key.
        upper = "sha256:" + HASH[7:].upper()
        self.assertOneError(
            f"auth: {{keys: [{{id: a, hash: '{HASH}'}}, {{id: b, hash: '{upper}'}}]}}\n",
            "auth.keys[1].hash",
            "expected a hash no other key has ([0] has it)",
        )

    def test_bad_globs(self) -> None:
        for bad, problem in (
            ("'gpt-[4'", "without its closing"),
            ("''", "empty"),
            ("' a'", "whitespace"),
        ):
            self.assertOneError(
                f"auth: {{keys: [{{id: a, hash: '{HASH}', models: [{bad}]}}]}}\n",
                "auth.keys[0].models[0]",
                problem,
            )
        self.assertOneError(
            f"auth: {{keys: [{{id: a, hash: '{HASH}', models: 'gpt-*'}}]}}\n",
            "auth.keys[0].models",
            "expected a list of non-empty strings",
        )

    def test_unknown_provider(self) -> None:
        self.assertOneError(
            f"auth: {{keys: [{{id: a, hash: '{HASH}', providers: [openai, grok]}}]}}\n",
            "auth.keys[0].providers[1]",
            "expected the name of a configured provider, got 'grok'",
        )
        self.assertOneError(
            "auth: {credentials: {grok: {Authorization: x}}}\n",
            "auth.credentials.grok",
            "expected the name of a configured provider",
        )

    def test_bad_credentials(self) -> None:
        self.assertOneError(
            "auth: {credentials: {openai: {Host: example.com}}}\n",
            "auth.credentials.openai.Host",
            "expected a header name a credential can travel in",
        )
        self.assertOneError(
            "auth: {credentials: {openai: {'bad header': x}}}\n",
            "auth.credentials.openai.bad header",
            "expected a header name",
        )
        self.assertOneError(
            "auth: {credentials: {openai: {x-api-key: 42}}}\n",
            "auth.credentials.openai.x-api-key",
            "expected a non-empty header value on one line, got 42",
        )
        self.assertOneError(
            'auth: {credentials: {openai: {x-api-key: "a\\nb"}}}\n',
            "auth.credentials.openai.x-api-key",
            "on one line",
        )

    def test_negative_budgets(self) -> None:
        for key in ("daily_usd", "monthly_usd"):
            self.assertOneError(
                f"auth: {{budgets: {{per_user: {{bob: {{{key}: -1}}}}}}}}\n",
                f"auth.budgets.per_user.bob.{key}",
                "expected a number >= 0, got -1",
            )
            self.assertOneError(
                f"auth: {{keys: [{{id: a, hash: '{HASH}', budget: {{{key}: ten}}}}]}}\n",
                f"auth.keys[0].budget.{key}",
                "expected a number >= 0, got 'ten'",
            )
        self.assertOneError(
            f"auth: {{keys: [{{id: a, hash: '{HASH}', budget: {{reserve_output_tokens: 0}}}}]}}\n",
            "auth.keys[0].budget.reserve_output_tokens",
            "expected an integer > 0",
        )
        self.assertOneError(
            f"auth: {{keys: [{{id: a, hash: '{HASH}', budget: {{unpriced: maybe}}}}]}}\n",
            "auth.keys[0].budget.unpriced",
            "expected one of 'deny', 'allow'",
        )

    def test_bad_alert_at(self) -> None:
        self.assertOneError(
            "auth: {budgets: {per_user: {bob: {alert_at: [0.5, 1.5]}}}}\n",
            "auth.budgets.per_user.bob.alert_at[1]",
            "expected a fraction > 0 and <= 1, got 1.5",
        )
        self.assertOneError(
            "auth: {budgets: {per_user: {bob: {alert_at: 0.8}}}}\n",
            "auth.budgets.per_user.bob.alert_at",
            "expected a list of fractions",
        )

    def test_bad_limits(self) -> None:
        self.assertOneError(
            f"auth: {{keys: [{{id: a, hash: '{HASH}', limits: {{requests_per_minute: -1}}}}]}}\n",
            "auth.keys[0].limits.requests_per_minute",
            "expected an integer >= 0, got -1",
        )

    def test_limits_in_two_places(self) -> None:
        self.assertOneError(
            "features: {rate_limiting: {overrides: {per_key: {a: {requests_per_minute: 1}}}}}\n"
            f"auth: {{keys: [{{id: a, hash: '{HASH}', limits: {{requests_per_minute: 2}}}}]}}\n",
            "auth.keys[0].limits",
            "features.rate_limiting.overrides.per_key.a",
        )

    def test_bad_expires_at(self) -> None:
        self.assertOneError(
            f"auth: {{keys: [{{id: a, hash: '{HASH}', expires_at: tomorrow}}]}}\n",
            "auth.keys[0].expires_at",
            "expected an ISO 8601 time",
        )

    def test_bad_webhook(self) -> None:
        for bad in ("'ftp://h/x'", "'http://'", "'not a url'", "7"):
            self.assertOneError(
                f"auth: {{alerts: {{webhook_url: {bad}}}}}\n",
                "auth.alerts.webhook_url",
                "expected an http(s) URL",
            )

    def test_unknown_keys(self) -> None:
        self.assertOneError(
            "auth: {modes: keys}\n", "auth.modes", "unknown key (did you mean 'mode'?)"
        )
        self.assertOneError(
            f"auth: {{keys: [{{id: a, hash: '{HASH}', budgit: {{}}}}]}}\n",
            "auth.keys[0].budgit",
            "unknown key (did you mean 'budget'?)",
        )


class HelperTests(FilesMixin):
    def test_glob_problem(self) -> None:
        for good in ("*", "gpt-4o", "gpt-4?-*", "o[134]-mini", "[!x]*", "[]]", "a[!]]b"):
            self.assertIsNone(glob_problem(good), good)
        for bad in ("", " a", "[", "a[bc", "[!"):
            self.assertIsNotNone(glob_problem(bad), bad)

    def test_parse_time(self) -> None:
        midnight = datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC).timestamp()
        self.assertEqual(parse_time("2027-01-01"), midnight)
        self.assertEqual(parse_time(datetime.date(2027, 1, 1)), midnight)
        self.assertEqual(parse_time("2027-01-01T00:00:00"), midnight)
        self.assertEqual(parse_time("2027-01-01T01:00:00+01:00"), midnight)
        self.assertEqual(parse_time(datetime.datetime(2027, 1, 1)), midnight)
        self.assertIsNone(parse_time("soon"))
        self.assertIsNone(parse_time(3))
