"""
C{make env-check} and the key check of the live suites: keys are reported
and used, never shown.
"""

from __future__ import annotations

import io
import os

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.live import support
from tests.live.envcheck import report

SECRET = "sk-secret-value-1234"


class EnvCheckTests(SynchronousTestCase):
    def test_report_never_prints_values(self) -> None:
        out = io.StringIO()
        found = report({"OPENAI_API_KEY": SECRET, "GEMINI_API_KEY": "  "}, out)
        text = out.getvalue()
        self.assertEqual(found, 1)
        self.assertNotIn(SECRET, text)
        lines = {line.split()[0]: line for line in text.splitlines()[:3]}
        self.assertIn(" set ", lines["OPENAI_API_KEY"])
        self.assertIn("make test-openai runs", lines["OPENAI_API_KEY"])
        self.assertIn("not set", lines["GEMINI_API_KEY"])
        self.assertIn("not set", lines["ANTHROPIC_API_KEY"])
        self.assertIn("1 of 3 provider keys set", text)

    def test_missing_key_skips_with_its_name(self) -> None:
        self.patch(os, "environ", {"ANTHROPIC_API_KEY": ""})
        with self.assertRaises(SkipTest) as caught:
            support.api_key("ANTHROPIC_API_KEY")
        self.assertEqual(
            str(caught.exception), "ANTHROPIC_API_KEY not set: live Anthropic tests skipped"
        )

    def test_present_key_returned(self) -> None:
        self.patch(os, "environ", {"GEMINI_API_KEY": SECRET + "\n"})
        self.assertEqual(support.api_key("GEMINI_API_KEY"), SECRET)
