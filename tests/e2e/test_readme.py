"""
Every curl command and SDK snippet in the README and in the manual
(C{docs/*.md}), executed against the fake upstream through a proxy running in
this process.

The documents are the source.  A fenced block is run when the line before it
marks it: C{<!-- run:curl -->} before a C{sh} block of curl commands, and
C{<!-- snippet:NAME -->} before an SDK snippet.  A block that talks to the
proxy (it calls curl, or names C{localhost:9002} or C{LLMPROXY_URL}) without
a marker fails the parsing tests, so no example can be published untested.
The README's snippets must be copies of the manual's (C{docs/sdks.md}), which
holds every one.

Each runs as a user would run it, in a child process: curl with
C{http://localhost:9002} replaced by the test proxy's URL and the key
variables by made-up keys, the Python snippets with this interpreter and
C{LLMPROXY_URL} / C{*_API_KEY} in a minimal environment, the Node snippet
with C{node} after C{npm install openai} into a temporary directory (skipped,
saying why, when node, npm or the registry is unavailable).  A command passes
when it exits 0, got a 200 with the fake's answer, and its request reached
the fake upstream with the user's key.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from llmproxy.testing.fake_upstream import ReceivedRequest, fake_text, text_pieces
from tests.e2e.harness import ProxyTestCase, reactor

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SDK_PAGE = DOCS / "sdks.md"
README_URL = "http://localhost:9002"
CURL = "/usr/bin/curl"

FAKE_KEYS = {
    "OPENAI_API_KEY": "sk-readme-openai",
    "ANTHROPIC_API_KEY": "sk-ant-readme",
    "GEMINI_API_KEY": "AIza-readme-gemini",
}
"""The made-up key each variable stands for in a test run."""

_PROVIDER_KEY = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
}

_MARKER = re.compile(r"<!-- (run:curl|snippet:[\w-]+) -->")
_OPENING = re.compile(r"^\s*```(\w*)\s*$")
_TALKS_TO_PROXY = re.compile(r"\bcurl\b|localhost:9002|LLMPROXY_URL")
_VARIABLE = re.compile(r"\$\{?([A-Z][A-Z0-9_]*)\}?")

SNIPPET_LANGUAGES = frozenset({"python", "js"})
"""What an SDK snippet may be written in (the runners below know these)."""


def documents() -> list[Path]:
    """
    Every Markdown file whose examples are run: the README and the manual.
    """
    return [README, *sorted(DOCS.glob("*.md"))]


@attrs.frozen
class Block:
    """
    One fenced code block of a document.

    @ivar marker: what the comment on the line before it says (C{run:curl},
        C{snippet:NAME}), or C{None} when there is none.
    @ivar line: the line number of its opening fence, from 1.
    """

    marker: str | None
    language: str
    code: str
    line: int


@attrs.frozen
class Snippet:
    name: str
    language: str
    code: str


@attrs.frozen
class Examples:
    """
    The runnable examples of one document.
    """

    snippets: list[Snippet]
    curl_commands: list[str]


@attrs.frozen
class Expectation:
    """
    What a snippet's request looks like at the fake upstream.

    @ivar provider: its key variable is set for it and its key must arrive.
    @ivar upstream_path: the path the fake must receive.
    @ivar headers: header lines (lower-case name, value) that must arrive too.
    """

    provider: str
    upstream_path: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


SNIPPETS: Mapping[str, Expectation] = {
    "python-openai": Expectation("openai", b"/v1/chat/completions"),
    "python-anthropic": Expectation("anthropic", b"/v1/messages"),
    "python-google-genai": Expectation(
        "gemini", b"/v1beta/models/gemini-2.5-flash:generateContent"
    ),
    "node-openai": Expectation("openai", b"/v1/chat/completions"),
    "python-openai-user": Expectation(
        "openai", b"/v1/chat/completions", ((b"x-user-id", b"alice"),)
    ),
}
"""Every snippet the SDK page must have, and where its request goes."""

README_SNIPPETS = ("python-openai", "python-anthropic", "python-google-genai", "node-openai")
"""The snippets the README shows, copied from the SDK page."""


def fenced_blocks(text: str) -> list[Block]:
    """
    Every fenced code block of a Markdown text, with the marker comment on
    the line before it; L{ValueError} for a fence that is never closed.
    """
    lines = text.split("\n")
    blocks = []
    index = 0
    while index < len(lines):
        opening = _OPENING.match(lines[index])
        if opening is None:
            index += 1
            continue
        start = index
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            index += 1
        if index == len(lines):
            raise ValueError(f"line {start + 1}: a fenced block is never closed")
        marker = _MARKER.fullmatch(lines[start - 1].strip()) if start else None
        code = "\n".join(lines[start + 1 : index]) + "\n"
        blocks.append(Block(marker.group(1) if marker else None, opening.group(1), code, start + 1))
        index += 1
    return blocks


def curl_commands(code: str) -> list[str]:
    """
    The shell commands of a C{run:curl} block: continuation lines joined,
    comments and blank lines dropped.
    """
    joined = code.replace("\\\n", " ")
    return [
        line.strip()
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def examples(text: str) -> Examples:
    """
    The marked examples of one document; L{ValueError} for a block that
    talks to the proxy without a marker (it would never be run), or a
    marker on a block of the wrong kind.
    """
    snippets = []
    commands = []
    for block in fenced_blocks(text):
        where = f"line {block.line}"
        if block.marker is None:
            if _TALKS_TO_PROXY.search(block.code):
                raise ValueError(
                    f"{where}: a block that talks to the proxy needs <!-- run:curl --> "
                    "or <!-- snippet:NAME --> on the line before it, so that it is tested"
                )
        elif block.marker == "run:curl":
            if block.language != "sh":
                raise ValueError(f"{where}: run:curl marks a ```sh block")
            found = curl_commands(block.code)
            if not found or any(not command.startswith("curl ") for command in found):
                raise ValueError(f"{where}: a run:curl block holds only curl commands")
            commands.extend(found)
        else:
            if block.language not in SNIPPET_LANGUAGES:
                raise ValueError(f"{where}: a snippet is ```python or ```js")
            name = block.marker.removeprefix("snippet:")
            snippets.append(Snippet(name, block.language, block.code))
    marked = sum(block.marker is not None for block in fenced_blocks(text))
    markers = sum(bool(_MARKER.fullmatch(line.strip())) for line in text.split("\n"))
    if markers != marked:
        raise ValueError("a run:curl or snippet marker is not on the line just before a fence")
    return Examples(snippets, commands)


def curl_argv(command: str, proxy_url: str) -> list[str]:
    """
    One README command as curl's arguments, aimed at C{proxy_url}, with each
    key variable replaced by its made-up key.
    """

    def key(match: re.Match[str]) -> str:
        return FAKE_KEYS[match.group(1)]

    argv = shlex.split(_VARIABLE.sub(key, command.replace(README_URL, proxy_url)))
    if argv[0] != "curl":
        raise ValueError(f"not a curl command: {command}")
    return argv[1:]


def provider_of(url: str) -> tuple[str, str] | None:
    """
    The provider a proxy URL addresses and the path the upstream gets
    (C{/meta/<user>/} removed), or C{None} for the proxy's own routes.
    """
    path = "/" + url.split("://", 1)[1].split("/", 1)[1].split("?", 1)[0]
    segments = path.split("/")
    if segments[1] == "meta":
        segments = ["", *segments[3:]]
    if segments[1] in _PROVIDER_KEY:
        return segments[1], "/" + "/".join(segments[2:])
    return None


def has_key(received: ReceivedRequest, key: str) -> bool:
    """
    Whether C{key} arrived in any header (SDKs differ in which one).
    """
    return any(key.encode() in value for _, value in received.headers)


def process_env(proxy_url: str, **extra: str) -> dict[str, str]:
    """
    A minimal environment: no inherited keys or base URLs can leak in.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LLMPROXY_URL": proxy_url}
    env["HOME"] = os.environ.get("HOME", "/tmp")
    env.update(FAKE_KEYS)
    env.update(extra)
    return env


def document_examples() -> dict[Path, Examples]:
    """
    The examples of every document, by path.
    """
    found = {}
    for path in documents():
        try:
            found[path] = examples(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(f"{path.relative_to(ROOT)}: {error}") from None
    return found


def all_curl_commands(found: Mapping[Path, Examples]) -> list[str]:
    """
    Every curl command of every document, each once, in document order.
    """
    return list(dict.fromkeys(c for e in found.values() for c in e.curl_commands))


class ParsingTests(SynchronousTestCase):
    """
    The documents have what the runners below expect, and nothing they
    would not run.
    """

    def setUp(self) -> None:
        self.found = document_examples()

    def snippets(self, path: Path) -> dict[str, Snippet]:
        snippets = self.found[path].snippets
        named = {s.name: s for s in snippets}
        self.assertEqual(len(named), len(snippets), f"{path.name}: a snippet name is used twice")
        return named

    def test_documents(self) -> None:
        """
        The README and the pages run by the e2e tests are all read.
        """
        self.assertIn(README, self.found)
        self.assertIn(SDK_PAGE, self.found)
        self.assertIn(DOCS / "requests.md", self.found)

    def test_sdk_page_has_every_snippet(self) -> None:
        snippets = self.snippets(SDK_PAGE)
        self.assertEqual(sorted(snippets), sorted(SNIPPETS))
        self.assertEqual(snippets["node-openai"].language, "js")
        for name in SNIPPETS:
            if name.startswith("python-"):
                self.assertEqual(snippets[name].language, "python")

    def test_snippets_are_copies(self) -> None:
        """
        The README shows its snippets as the SDK page has them, and no other
        page has a snippet the SDK page lacks or words differently.
        """
        reference = self.snippets(SDK_PAGE)
        self.assertEqual(sorted(self.snippets(README)), sorted(README_SNIPPETS))
        for path in self.found:
            for name, snippet in self.snippets(path).items():
                self.assertEqual(snippet, reference.get(name), f"{path.name}: {name}")

    def test_every_snippet_has_a_runner(self) -> None:
        for name in SNIPPETS:
            method = "test_" + name.replace("-", "_")
            self.assertTrue(hasattr(ReadmeTests, method), f"{name}: no {method}")

    def test_curl_commands(self) -> None:
        """
        The README has a command for each provider; the requests page has
        those, C{/health} and a C{/meta/<user>/} request.
        """
        for path, extra in ((README, set()), (DOCS / "requests.md", {"/health", "/meta"})):
            targets = set()
            for command in self.found[path].curl_commands:
                self.assertIn(README_URL, command)
                [url] = [a for a in curl_argv(command, README_URL) if a.startswith(README_URL)]
                target = provider_of(url)
                path_part = url.removeprefix(README_URL)
                targets.add(target[0] if target else path_part)
                if path_part.startswith("/meta/"):
                    targets.add("/meta")
            self.assertLessEqual(set(_PROVIDER_KEY) | extra, targets, path.name)

    def test_curl_argv(self) -> None:
        argv = curl_argv(
            'curl -s http://localhost:9002/x -H "Authorization: Bearer $OPENAI_API_KEY"',
            "http://127.0.0.1:1",
        )
        self.assertEqual(
            argv, ["-s", "http://127.0.0.1:1/x", "-H", "Authorization: Bearer sk-readme-openai"]
        )

    def test_unmarked_blocks_refused(self) -> None:
        """
        A block that talks to the proxy must be marked; other blocks need not.
        """
        for code in (
            "curl -s http://example.com/health",
            "client = OpenAI(base_url='http://localhost:9002/openai/v1')",
            "const url = process.env.LLMPROXY_URL;",
        ):
            text = f"Text.\n\n```sh\n{code}\n```\n"
            self.assertRaises(ValueError, examples, text)
            indented = f"- item\n\n  ```sh\n  {code}\n  ```\n"
            self.assertRaises(ValueError, examples, indented)
        self.assertEqual(examples("```sh\nmake test\n```\n"), Examples([], []))

    def test_markers_checked(self) -> None:
        wrong = (
            "<!-- run:curl -->\n```python\ncurl -s http://localhost:9002/health\n```\n",
            "<!-- run:curl -->\n```sh\nmake test\n```\n",
            "<!-- snippet:x -->\n```sh\nls\n```\n",
            "<!-- snippet:x -->\n\n```python\nprint()\n```\n",
            "<!-- run:curl -->\n```sh\ncurl http://localhost:9002/health\n",
        )
        for text in wrong:
            self.assertRaises(ValueError, examples, text)
        found = examples(
            "<!-- run:curl -->\n```sh\n# health\ncurl -s \\\n  http://localhost:9002/health\n```\n"
            "<!-- snippet:x -->\n```python\nprint()\n```\n"
        )
        self.assertEqual(
            found,
            Examples(
                [Snippet("x", "python", "print()\n")], ["curl -s    http://localhost:9002/health"]
            ),
        )

    def test_provider_of(self) -> None:
        self.assertEqual(
            provider_of("http://h:1/meta/alice/openai/v1/chat?x=1"), ("openai", "/v1/chat")
        )
        self.assertEqual(
            provider_of("http://h:1/gemini/v1beta/m:g?alt=sse"), ("gemini", "/v1beta/m:g")
        )
        self.assertIsNone(provider_of("http://h:1/health"))


class ReadmeTests(ProxyTestCase):
    timeout = 120

    def setUp(self) -> Any:
        self.found = document_examples()
        self.snippets = {s.name: s for s in self.found[SDK_PAGE].snippets}
        return super().setUp()

    def workdir(self) -> Path:
        path = Path(self.mktemp()).resolve()
        path.mkdir(parents=True)
        return path

    @inlineCallbacks
    def run_process(
        self, executable: str, args: Sequence[str], env: Mapping[str, str], path: Path
    ) -> Any:
        """
        Run a child process; returns C{(stdout, stderr, exit code)}.
        """
        result = yield getProcessOutputAndValue(
            executable, list(args), env=dict(env), path=str(path), reactor=reactor
        )
        out, err, code = result
        return out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code

    def check_request(self, name: str, before: int) -> None:
        """
        The snippet's one request reached the fake upstream at the right
        path with the snippet user's key and the headers it sets.
        """
        expected = SNIPPETS[name]
        self.assertEqual(len(self.fake.received), before + 1, name)
        received = self.fake.received[-1]
        self.assertEqual(received.path, expected.upstream_path, name)
        key = FAKE_KEYS[_PROVIDER_KEY[expected.provider]]
        self.assertTrue(has_key(received, key), f"{name}: the key did not reach the upstream")
        for header, value in expected.headers:
            self.assertEqual(received.header_values(header), [value], name)

    @inlineCallbacks
    def run_python_snippet(self, name: str) -> Any:
        snippet = self.snippets[name]
        directory = self.workdir()
        script = directory / "snippet.py"
        script.write_text(snippet.code)
        before = len(self.fake.received)
        out, err, code = yield self.run_process(
            sys.executable, [str(script)], process_env(self.proxy_url), directory
        )
        self.assertEqual(code, 0, f"{name} failed:\n{out}\n{err}")
        self.assertIn(fake_text(), out, err)
        self.check_request(name, before)
        return out

    def test_python_openai(self) -> Deferred[Any]:
        return self.run_python_snippet("python-openai")

    @inlineCallbacks
    def test_python_anthropic(self) -> Any:
        out = yield self.run_python_snippet("python-anthropic")
        self.assertIn("output_tokens=3", out)

    def test_python_google_genai(self) -> Deferred[Any]:
        return self.run_python_snippet("python-google-genai")

    def test_python_openai_user(self) -> Deferred[Any]:
        return self.run_python_snippet("python-openai-user")

    @inlineCallbacks
    def test_node_openai(self) -> Any:
        node, npm = shutil.which("node"), shutil.which("npm")
        if node is None or npm is None:
            raise SkipTest("node or npm not installed: the Node snippet was not run")
        directory = self.workdir()
        env = process_env(self.proxy_url, npm_config_update_notifier="false")
        out, err, code = yield self.run_process(
            npm,
            ["install", "--no-audit", "--no-fund", "--prefer-offline", "openai"],
            env,
            directory,
        )
        if code != 0:
            tail = (err or out).strip().splitlines()[-3:]
            raise SkipTest(f"npm install openai failed (registry unavailable?): {tail}")
        script = directory / "snippet.mjs"
        script.write_text(self.snippets["node-openai"].code)
        before = len(self.fake.received)
        out, err, code = yield self.run_process(node, [str(script)], env, directory)
        self.assertEqual(code, 0, f"node-openai failed:\n{out}\n{err}")
        self.assertEqual(out.strip(), fake_text())
        self.check_request("node-openai", before)

    @inlineCallbacks
    def test_curl_commands(self) -> Any:
        if not os.access(CURL, os.X_OK):
            raise SkipTest(f"{CURL} not installed: the curl commands were not run")
        directory = self.workdir()
        for command in all_curl_commands(self.found):
            argv = curl_argv(command, self.proxy_url)
            [url] = [arg for arg in argv if arg.startswith(self.proxy_url)]
            before = len(self.fake.received)
            out, err, code = yield self.run_process(
                CURL, [*argv, "-w", "\n%{http_code}"], process_env(self.proxy_url), directory
            )
            self.assertEqual(code, 0, f"{command}\n{err}")
            body, _, status = out.rpartition("\n")
            self.assertEqual(status, "200", f"{command}\n{body}")
            target = provider_of(url)
            if target is None:
                self.assertEqual(len(self.fake.received), before, command)
                continue
            provider, upstream_path = target
            self.assertEqual(len(self.fake.received), before + 1, command)
            received = self.fake.received[-1]
            self.assertEqual(received.path, upstream_path.encode(), command)
            self.assertTrue(has_key(received, FAKE_KEYS[_PROVIDER_KEY[provider]]), command)
            self.assertIn(text_pieces(3)[1], body, command)
