"""
Tests for L{llmproxy.config.load}: reading YAML files, C{extends},
C{${VAR}} expansion, deep merge, and naming the file that set a key.
"""

from __future__ import annotations

import os

from llmproxy.config import load_config
from llmproxy.config.load import MAX_DEPTH, MAX_VALUES
from llmproxy.test.test_config import FilesMixin


class FileErrorTests(FilesMixin):
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

    def test_alias_bomb(self) -> None:
        """
        A few hundred bytes of nested YAML aliases that stand for billions
        of values are refused at once, not expanded.
        """
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 9) + "]" for n in range(1, 10)]
        path = self.write("bomb.yml", "\n".join(lines) + "\n")
        [error] = self.errors([path])
        expected = f"expands to more than {MAX_VALUES} values (through YAML aliases?)"
        self.assertEqual(error, f"{path}: invalid YAML: {expected}")

    def test_merge_keys_counted(self) -> None:
        """
        Merge keys (C{<<}) may not expand mappings past the limit either.
        """
        entries = ", ".join(f"k{n}: {n}" for n in range(MAX_VALUES // 2 + 1))
        path = self.write("merge.yml", f"base: &b {{{entries}}}\nx: {{<<: *b}}\ny: {{<<: *b}}\n")
        [error] = self.errors([path])
        self.assertIn(f"expand past {MAX_VALUES} entries", error)

    def test_too_deep(self) -> None:
        """
        Nesting deeper than the limit is a configuration error, also where
        it is deep enough to exhaust the YAML parser's recursion.
        """
        for depth, expected in [
            (MAX_DEPTH + 1, f"nested deeper than {MAX_DEPTH} levels"),
            (5000, "nested too deeply"),
        ]:
            path = self.write(f"deep{depth}.yml", "a: " + "[" * depth + "]" * depth + "\n")
            [error] = self.errors([path])
            self.assertIn(expected, error)
        path = self.write("ok.yml", "a: " + "[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2) + "\n")
        [error] = self.errors([path])
        self.assertIn("unknown key", error)

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


class MergeTests(FilesMixin):
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


class EnvironmentTests(FilesMixin):
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
