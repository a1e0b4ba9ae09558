"""
Tests for L{llmproxy.tap}: the twistd plugin's options.
"""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin, getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from llmproxy.config import Config
from llmproxy.service import describe_listen
from llmproxy.tap import Options


class PluginTests(SynchronousTestCase):
    def test_plugin_is_discoverable(self) -> None:
        """
        twistd finds an C{llmproxy} service maker in C{twisted.plugins}.
        """
        import twisted.plugins

        makers = [p for p in getPlugins(IServiceMaker, twisted.plugins) if p.tapname == "llmproxy"]
        self.assertEqual(len(makers), 1)
        verifyObject(IServiceMaker, makers[0])
        verifyObject(IPlugin, makers[0])
        self.assertIs(makers[0].options, Options)


class OptionsTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "c.yml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_defaults(self) -> None:
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["config"], [])
        self.assertIsInstance(options["settings"], Config)
        self.assertEqual(sorted(options["settings"].providers), ["anthropic", "gemini", "openai"])
        self.assertTrue(options["listen"])

    def test_repeatable_config_and_listen(self) -> None:
        first = self.write("server:\n  max_body_bytes: 1000\n")
        second = self.write("server:\n  drain_timeout_seconds: 5\n")
        options = Options()
        options.parseOptions(
            ["--config", first, "-c", second, "--listen", "tcp:0", "--listen", "unix:/tmp/x.sock"]
        )
        self.assertEqual(options["config"], [first, second])
        self.assertEqual(options["listen"], ["tcp:0", "unix:/tmp/x.sock"])
        server = options["settings"].server
        self.assertEqual((server.max_body_bytes, server.drain_timeout_seconds), (1000, 5))

    def test_bad_config_exits_1_with_key_path(self) -> None:
        path = self.write("server:\n  max_body_bytes: -1\n")
        err = io.StringIO()
        with redirect_stderr(err), self.assertRaises(SystemExit) as raised:
            Options().parseOptions(["--config", path])
        self.assertEqual(raised.exception.code, 1)
        self.assertIn("server.max_body_bytes", err.getvalue())
        self.assertIn(path, err.getvalue())

    def test_bad_listen_exits_1(self) -> None:
        err = io.StringIO()
        with redirect_stderr(err), self.assertRaises(SystemExit) as raised:
            Options().parseOptions(["--listen", "tcp:notaport"])
        self.assertEqual(raised.exception.code, 1)
        self.assertIn("tcp:notaport", err.getvalue())

    def test_workers(self) -> None:
        """
        C{--workers N} overrides C{server.workers}, which applies otherwise;
        a bad count is a usage error that names the option.
        """
        path = self.write("server:\n  workers: 3\n")
        options = Options()
        options.parseOptions(["--config", path])
        self.assertEqual(options["workers"], 3)
        options = Options()
        options.parseOptions(["--config", path, "--workers", "2"])
        self.assertEqual(options["workers"], 2)
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["workers"], 1)
        for bad in ("0", "-1", "two", "1.5", "257"):
            with self.assertRaises(UsageError) as raised:
                Options().parseOptions(["--workers", bad])
            self.assertIn("--workers: expected an integer from 1 to 256", str(raised.exception))


class ListenFallbackTests(SynchronousTestCase):
    def test_order(self) -> None:
        config = Config()
        self.assertEqual(describe_listen(config, ["tcp:1"], "2"), ["tcp:1"])
        self.assertEqual(describe_listen(config, [], "8080"), ["tcp:8080"])
        self.assertEqual(describe_listen(config, [], None), ["tcp:9002"])
        from attrs import evolve

        configured = evolve(config, server=evolve(config.server, listen=("tcp:7000",)))
        self.assertEqual(describe_listen(configured, [], "8080"), ["tcp:7000"])
