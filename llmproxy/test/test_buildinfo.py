"""
Tests for L{llmproxy.buildinfo}: the commit of a checkout, read without git.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from llmproxy.buildinfo import _git_commit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class GitCommitTests(SynchronousTestCase):
    def checkout(self) -> Path:
        root = Path(self.mktemp())
        (root / ".git" / "refs" / "heads").mkdir(parents=True)
        (root / "pkg" / "sub").mkdir(parents=True)
        (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
        return root

    def test_loose_ref(self) -> None:
        root = self.checkout()
        (root / ".git" / "refs" / "heads" / "main").write_text(COMMIT + "\n")
        self.assertEqual(_git_commit(root / "pkg" / "sub"), COMMIT)

    def test_packed_ref(self) -> None:
        root = self.checkout()
        (root / ".git" / "packed-refs").write_text(f"# pack-refs\n{COMMIT} refs/heads/main\n")
        self.assertEqual(_git_commit(root / "pkg"), COMMIT)

    def test_detached_head(self) -> None:
        root = self.checkout()
        (root / ".git" / "HEAD").write_text(COMMIT + "\n")
        self.assertEqual(_git_commit(root), COMMIT)

    def test_no_checkout(self) -> None:
        root = self.checkout()
        self.assertIsNone(_git_commit(root))
