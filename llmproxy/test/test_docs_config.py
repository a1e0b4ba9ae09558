# -*- test-case-name: llmproxy.test.test_docs_config -*-
"""
The manual's configuration page (C{docs/configuration.md}) agrees with
L{llmproxy.config}: the key table is exactly what L{render_reference_table}
produces, and the example error messages are the ones the loader prints.
Every configuration key the README or the manual names exists.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import llmproxy
from llmproxy.config import ConfigError, load_config, reference_keys, render_reference_table

ROOT = Path(llmproxy.__file__).resolve().parent.parent
CONFIGURATION_PAGE = ROOT / "docs" / "configuration.md"

_NAMED_KEY = re.compile(r"`((?:server|logging|providers|features|auth)\.(?!py`)[\w.<>\[\]-]+)")
"""
A dotted key from the top of the configuration, as the documents quote it
(not a module such as C{auth.py}).
"""


def _segments(key: str) -> list[str]:
    return key.rstrip(".").split(".")


def _names(documented: str, reference: str) -> bool:
    """
    Whether C{documented} is C{reference} or leads to it: a C{<placeholder>}
    stands for any name, and a list key may be quoted with or without C{[]}.
    """
    written, known = _segments(documented), _segments(reference)
    if len(written) > len(known):
        return False
    for part, pattern in zip(written, known, strict=False):
        if pattern.startswith("<") or part == pattern:
            continue
        if pattern.endswith("[]") and part == pattern[:-2]:
            continue
        return False
    return True


def _between(text: str, start: str, end: str) -> str:
    """
    The text between two marker lines, which must each occur once.
    """
    if text.count(start) != 1 or text.count(end) != 1:
        raise AssertionError(f"expected one {start!r} and one {end!r}")
    return text.split(start, 1)[1].split(end, 1)[0]


class ConfigurationPageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.page = CONFIGURATION_PAGE.read_text(encoding="utf-8")

    def test_table_is_generated(self) -> None:
        """
        The table between the C{config-table} markers is the output of
        L{render_reference_table}, byte for byte.
        """
        table = _between(self.page, "<!-- config-table:start -->\n", "<!-- config-table:end -->")
        self.assertEqual(table, render_reference_table())

    def test_example_errors(self) -> None:
        """
        The example messages, in the C{text} block after the
        C{config-errors} marker, are what loading such a file prints.
        """
        block = re.search(r"<!-- config-errors -->\n```text\n(.*?)```", self.page, re.DOTALL)
        assert block is not None, "no <!-- config-errors --> text block"
        expected = block.group(1).splitlines()
        directory = self.mktemp()
        os.makedirs(os.path.join(directory, "configs"))
        path = os.path.join(directory, "configs", "dev.yml")
        with open(path, "w") as stream:
            stream.write(
                "features:\n"
                "  rate_limiting:\n"
                "    limits: {requests_per_minute: ten}\n"
                "providers:\n"
                "  grok: {base_url: 'https://api.x.ai'}\n"
                "logging: {levle: info}\n"
            )
        error = self.assertRaises(ConfigError, load_config, [path], {})
        prefix = directory + os.sep
        self.assertEqual([line.replace(prefix, "", 1) for line in error.errors], expected)

    def test_named_keys_exist(self) -> None:
        """
        Every dotted key the README or a page of the manual quotes, such as
        C{`features.rate_limiting.fail_mode`} or C{`providers.<name>.kind`},
        is a key of the model (or leads to one).
        """
        known = [key for key, _, _ in reference_keys()]
        documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        unknown = []
        for path in documents:
            for documented in _NAMED_KEY.findall(path.read_text(encoding="utf-8")):
                if not any(_names(documented, reference) for reference in known):
                    unknown.append(f"{path.name}: {documented}")
        self.assertEqual(unknown, [])

    def test_names(self) -> None:
        self.assertTrue(
            _names("providers.openai.timeouts", "providers.<name>.timeouts.idle_seconds")
        )
        self.assertTrue(
            _names(
                "features.cost_tracking.transports",
                "features.cost_tracking.transports[].type",
            )
        )
        self.assertFalse(_names("server.listen.port", "server.listen"))
        self.assertFalse(_names("server.lisen", "server.listen"))
