"""
C{make soak} itself: a short run of the soak driver passes (the 30-minute
run is made by hand; its figures are in docs/performance.md).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from llmproxy.testing.proxy_process import REPO_ROOT
from tests.e2e.harness import reactor


class SoakTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_short_soak_passes(self) -> Any:
        """
        Eight seconds of the mix: every request has its access line, every
        forwarded one its record, and the report says so.
        """
        out, err, _ = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "bench.soak", "--seconds", "8", "--sample-seconds", "1", "--no-save"],
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            path=str(REPO_ROOT),
            reactor=reactor,
        )
        text = out.decode()
        self.assertIn("- [x] every request has its access line", text, text + err.decode())
        self.assertIn("- [x] every forwarded request has its cost record", text)
        self.assertIn("- [x] the proxy exited 0 on SIGTERM", text)
        for status in ("200", "429", "404", "502", "left"):
            self.assertIn(f" {status} ", text.split("Statuses seen by the clients:")[1][:400])
