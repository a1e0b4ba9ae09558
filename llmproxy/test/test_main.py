"""
Tests for L{llmproxy.__main__}: C{check-config} and C{version}.
"""

from __future__ import annotations

import io
import os

import orjson
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.__main__ import main

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


class MainTests(SynchronousTestCase):
    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main(list(argv), out, err)
        return status, out.getvalue(), err.getvalue()

    def test_check_config_ok(self) -> None:
        status, out, err = self.run_main("check-config", os.path.join(CONFIGS, "dev.yml"))
        self.assertEqual((status, err), (0, ""))
        self.assertTrue(out.startswith("ok: "), out)
        self.assertIn("anthropic, ", out)

    def test_check_config_errors(self) -> None:
        """
        Every error is printed, each naming the file and the key; status 1.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("server: {max_body_bytes: -1}\nlogging: {level: loud}\n")
        status, out, err = self.run_main("check-config", path)
        self.assertEqual((status, out), (1, ""))
        self.assertIn(f"{path}: server.max_body_bytes:", err)
        self.assertIn(f"{path}: logging.level:", err)

    def test_usage(self) -> None:
        for argv in ((), ("check-config",), ("frobnicate",)):
            status, out, err = self.run_main(*argv)
            self.assertEqual((status, out), (2, ""))
            self.assertIn("usage:", err)

    def test_version(self) -> None:
        status, out, _ = self.run_main("version")
        self.assertEqual(status, 0)
        self.assertEqual(
            set(orjson.loads(out)), {"version", "commit", "built_at", "python", "twisted"}
        )
