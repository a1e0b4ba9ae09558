"""
Item: hostile configuration files. A few hundred bytes of YAML aliases, or
YAML nested thousands deep, are configuration errors said in one line, at
check time and at reload, never minutes of work or a traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue

from llmproxy.testing.proxy_process import REPO_ROOT
from tests.abuse.harness import AbuseCase, proc_status
from tests.e2e.harness import reactor


def alias_bomb() -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 9) + "]" for n in range(1, 10)]
    return "\n".join(lines) + "\n"


DEEP = "server: " + "[" * 5000 + "]" * 5000 + "\n"


class ConfigAbuseTests(AbuseCase):
    @inlineCallbacks
    def test_check_config(self) -> Any:
        """
        C{check-config} on an alias bomb or a 5,000-deep file exits 1 with
        one line naming the file and the problem.
        """
        for name, text, expected in [
            ("bomb.yml", alias_bomb(), b"expands to more than 100000 values"),
            ("deep.yml", DEEP, b"nested too deeply"),
        ]:
            path = self.write(text, name)
            out, err, code = yield getProcessOutputAndValue(
                sys.executable,
                ["-m", "llmproxy", "check-config", path],
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                reactor=reactor,
            )
            self.assertEqual(code, 1, out + err)
            self.assertIn(path.encode() + b": invalid YAML: ", out + err)
            self.assertIn(expected, out + err)
            self.assertNotIn(b"Traceback", out + err)

    @inlineCallbacks
    def test_reload_refuses_and_keeps_serving(self) -> Any:
        """
        SIGHUP with an alias bomb (then a 5,000-deep file) in place: the
        reload fails at once with the reason logged, the running
        configuration keeps serving, and memory does not move.
        """
        proc = yield self.start_proxy(self.config())
        before = proc_status(proc.pid, "VmHWM")
        for text, expected in [
            (alias_bomb(), b"expands to more than 100000 values"),
            (DEEP, b"nested too deeply"),
        ]:
            failures = proc.output.count(b"configuration reload failed")
            self.write(text)
            proc.send_signal(signal.SIGHUP)

            def reported(before: int = failures) -> bool:
                output: bytes = proc.output
                return output.count(b"configuration reload failed") > before

            yield self.wait_for(reported)
            self.assertIn(expected, proc.output)
            status, _, _ = yield self.post(proc)
            self.assertEqual(status, 200)
        self.assertLess(proc_status(proc.pid, "VmHWM") - before, 20_000)
        self.assertNotIn(b"Traceback", proc.output)
