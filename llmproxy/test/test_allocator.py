"""
Tests for L{llmproxy.allocator}: after tuning, parsing a large body again
reuses memory instead of faulting in fresh pages.
"""

from __future__ import annotations

import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.allocator import tune_allocator

# Parses a 5 MB request body ten times and prints the minor page faults of
# the last five parses; with "tune" it tunes the allocator first.
PROBE = """
import sys, orjson
from llmproxy.allocator import tune_allocator
if sys.argv[1] == "tune":
    assert tune_allocator()
body = b'{"model":"m","messages":[{"role":"user","content":"' + b"x" * 5_000_000 + b'"}]}'
def faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])
for _ in range(5):
    orjson.loads(body)
before = faults()
for _ in range(5):
    orjson.loads(body)
print(faults() - before)
"""


class TuneAllocatorTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not tune_allocator():
            raise self.skipTest("not glibc: nothing to tune")

    def _faults(self, mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout.strip())

    def test_large_parses_reuse_memory(self) -> None:
        """
        Untuned, each 5 MB parse faults in over a thousand fresh pages;
        tuned, the parses after the first few reuse what they had.
        """
        untuned = self._faults("plain")
        tuned = self._faults("tune")
        self.assertGreater(untuned, 5 * 1000)
        self.assertLess(tuned, untuned / 4)
