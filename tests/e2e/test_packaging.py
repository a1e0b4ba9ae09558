"""
The wheel ships the twistd plugin: built from this checkout and installed
into a fresh virtual environment, C{twistd llmproxy} is found and serves.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig
from typing import Any

import orjson
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from llmproxy.testing.proxy_process import REPO_ROOT
from tests.e2e.harness import raw_exchange, raw_request, reactor, split_response


class EditableInstallTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def test_twistd_finds_plugin_outside_the_checkout(self) -> Any:
        """
        After C{make install} (an editable install in compat mode), the venv's
        twistd lists the plugin from any directory, with no PYTHONPATH.
        """
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        out, _, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", "import llmproxy, sys; sys.stdout.write(llmproxy.__file__)"],
            env=env,
            path=work,
            reactor=reactor,
        )
        if code != 0:
            raise SkipTest("llmproxy is not installed in this interpreter (run make install)")
        self.assertIn(str(REPO_ROOT).encode(), out, "expected the editable install")
        listing, _, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", "from twisted.scripts.twistd import run; run()", "--help"],
            env=env,
            path=work,
            reactor=reactor,
        )
        self.assertEqual(code, 0)
        self.assertIn(b"llmproxy", listing)


class WheelTests(TestCase):
    timeout = 240

    @inlineCallbacks
    def command(self, *args: str, cwd: str | None = None, env: dict[str, str] | None = None) -> Any:
        out, err, code = yield getProcessOutputAndValue(
            args[0],
            args[1:],
            env=env or dict(os.environ),
            path=cwd or str(REPO_ROOT),
            reactor=reactor,
        )
        if code != 0:
            self.fail(f"{' '.join(args)} exited {code}:\n{out.decode()}\n{err.decode()}")
        return out

    @inlineCallbacks
    def test_wheel_install_serves(self) -> Any:
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        dist = os.path.join(work, "dist")
        try:
            yield self.command(
                sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, str(REPO_ROOT)
            )
        except self.failureException as error:
            raise SkipTest(f"cannot build a wheel here (no package index?): {error}") from None
        wheels = glob.glob(os.path.join(dist, "llmproxy-*.whl"))
        self.assertEqual(len(wheels), 1, wheels)
        venv = os.path.join(work, "venv")
        yield self.command(sys.executable, "-m", "venv", "--without-pip", venv)
        python = os.path.join(venv, "bin", "python")
        # Dependencies come from this environment's site-packages as a plain
        # path (its .pth files, including the editable install's, are not
        # read), so only the wheel can provide llmproxy and its plugin.
        target = (
            (
                yield self.command(
                    python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
                )
            )
            .decode()
            .strip()
        )
        with open(os.path.join(target, "deps.pth"), "w") as f:
            f.write(sysconfig.get_paths()["purelib"] + "\n")
        yield self.command(
            sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheels[0]
        )
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PORT")}
        listing = yield self.command(
            python,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--help",
            cwd=work,
            env=env,
        )
        self.assertIn(b"llmproxy", listing)
        where = yield self.command(
            python,
            "-c",
            "import llmproxy, twisted.plugins.llmproxy_plugin as p;"
            "print(llmproxy.__file__, p.__file__)",
            cwd=work,
            env=env,
        )
        self.assertNotIn(str(REPO_ROOT).encode() + b"/llmproxy", where)
        self.assertIn(target.encode(), where)
        # And it serves.
        proto_out: list[bytes] = []
        started: Deferred[int] = Deferred()
        ended: Deferred[None] = Deferred()

        class P(ProcessProtocol):
            def outReceived(self, data: bytes) -> None:
                proto_out.append(data)
                joined = b"".join(proto_out)
                if b"port=" in joined and not started.called:
                    port = int(joined.split(b"port=", 1)[1].split(b")", 1)[0])
                    started.callback(port)

            errReceived = outReceived

            def processEnded(self, reason: Any) -> None:
                ended.callback(None)
                if not started.called:
                    started.errback(RuntimeError(b"".join(proto_out).decode()))

        transport = reactor.spawnProcess(
            P(),
            python,
            [
                python,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "llmproxy",
                "--listen",
                "tcp:0:interface=127.0.0.1",
            ],
            env=env,
            path=work,
        )
        try:
            port = yield started
            client = yield raw_exchange(port, raw_request(b"GET", b"/health"))
            status, _, body = split_response(client.received)
            self.assertEqual(status, 200)
            self.assertEqual(orjson.loads(body)["status"], "healthy")
        finally:
            transport.signalProcess("TERM")
            yield ended
