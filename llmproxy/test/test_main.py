"""
Tests for L{llmproxy.__main__}: C{check-config}, C{new-key} and C{version}.
"""

from __future__ import annotations

import hashlib
import io
import os
import re

import orjson
import yaml
from twisted.trial.unittest import SynchronousTestCase

from llmproxy.__main__ import main
from llmproxy.auth import Keyring
from llmproxy.config import parse_config
from llmproxy.identity import presented

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

    def test_new_key(self) -> None:
        """
        A fresh key is printed once with the YAML entry that accepts it; the
        entry holds its SHA-256, which a keyring built from it recognises.
        """
        status, out, err = self.run_main("new-key", "--id", "team-a")
        self.assertEqual((status, err), (0, ""))
        keys = re.findall(r"^llmp-[A-Za-z0-9_-]{43}$", out, re.MULTILINE)
        self.assertEqual(len(keys), 1)
        key = keys[0]
        self.assertEqual(out.count(key), 1)
        entry = yaml.safe_load(out.split("(SIGHUP):\n", 1)[1])
        self.assertEqual(
            entry, [{"id": "team-a", "hash": "sha256:" + hashlib.sha256(key.encode()).hexdigest()}]
        )
        config = parse_config({"auth": {"mode": "keys", "keys": entry}}, "test")
        found = Keyring(config.auth).recognise(presented(key.encode()), "openai", None, 0.0)
        self.assertEqual(getattr(found, "id", None), "team-a")
        _, again, _ = self.run_main("new-key", "--id", "team-a")
        self.assertNotIn(key, again)

    def test_new_key_usage(self) -> None:
        for argv in (("new-key",), ("new-key", "team-a"), ("new-key", "--id", "a b")):
            status, out, err = self.run_main(*argv)
            self.assertEqual((status, out), (2, ""))
            self.assertTrue(err)

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
