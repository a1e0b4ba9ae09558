"""
README.md's configuration reference agrees with L{llmproxy.config}: the key
table is exactly what L{render_reference_table} produces, and the example
error messages are the ones the loader prints.
"""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import SynchronousTestCase

import llmproxy
from llmproxy.config import ConfigError, load_config, render_reference_table

README = os.path.join(os.path.dirname(llmproxy.__file__), "..", "README.md")


def _between(text: str, start: str, end: str) -> str:
    """
    The text between two marker lines, which must each occur once.
    """
    if text.count(start) != 1 or text.count(end) != 1:
        raise AssertionError(f"expected one {start!r} and one {end!r}")
    return text.split(start, 1)[1].split(end, 1)[0]


class ReadmeConfigReferenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        with open(README, encoding="utf-8") as stream:
            self.section = _between(
                stream.read(),
                "<!-- section:config-reference:start -->\n",
                "<!-- section:config-reference:end -->",
            )

    def test_table_is_generated(self) -> None:
        """
        The table between the C{config-table} markers is the output of
        L{render_reference_table}, byte for byte.
        """
        table = _between(self.section, "<!-- config-table:start -->\n", "<!-- config-table:end -->")
        self.assertEqual(table, render_reference_table())

    def test_example_errors(self) -> None:
        """
        The example messages are what loading such a file prints.
        """
        block = re.search(r"```text\n(.*?)```", self.section, re.DOTALL)
        assert block is not None
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
