"""
Tests for L{llmproxy.config} as a whole: the built-in defaults and the
shipped configs load; and the helpers the C{test_config_*} modules share.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence

from twisted.trial.unittest import SynchronousTestCase

import llmproxy
from llmproxy.config import (
    PUBLIC_BASE_URLS,
    Config,
    ConfigError,
    Limits,
    Price,
    PriceTier,
    load_config,
    parse_config,
)

CONFIGS = os.path.join(os.path.dirname(llmproxy.__file__), "..", "configs")


class FilesMixin(SynchronousTestCase):
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


def price(
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
        self.assertEqual(gpt4o.tiers, (PriceTier(0, price(2.5, 10.0, cache_read=1.25)),))
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
