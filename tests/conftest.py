"""Shared fixtures: the tiny test models, built once per session.

- ``model_dirs``: arch -> directory of a tiny random model (seed 0), for every entry of
  ``model_factory.ARCHITECTURES``.
- ``loaded_models``: arch -> ``(model, tokenizer)`` loaded from those directories with
  ``load_model`` (mlx-lm's ``TokenizerWrapper``). Keep all MLX work on the thread that runs
  the tests: MLX streams are thread-local.

``AGENTKV_HOME`` points at a session temp directory for every test, so nothing (the default
model included) is ever written under the user's home.

- ``daemon_factory`` (module scope): makes `Daemon`s, real daemon processes of a tiny model
  started with ``daemonctl start``, each in its own short temp directory; all are killed
  when the module ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentkv.daemon.engine.model_factory import ARCHITECTURES, build_model_dir, load_model
from agentkv.daemon.service.process import pid_alive

CLI_MODULE = "agentkv.daemon.service.cli"  # daemonctl, when the console script is absent


@pytest.fixture(scope="session", autouse=True)
def _isolated_agentkv_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("agentkv-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AGENTKV_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model_dir(root / arch, arch, seed=0) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def loaded_models(model_dirs: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    return {arch: load_model(path) for arch, path in model_dirs.items()}


# -- daemons (tests/test_daemon_*.py) ----------------------------------------------------


class Daemon:
    """An agentkv daemon run the way users run it: `daemonctl start`, detached, in a temp
    directory of its own under /tmp (ipc socket paths are limited to ~100 characters).

    Attributes:
        root: the temp directory; the store is `root/store`, the socket `root/run/d.sock`
            unless another `socket` is given.
        args: extra `daemonctl start` options (pool size, block size, ...).
        env: extra environment for every `daemonctl` run.
        pid: the daemon's pid once started.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        socket: str | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="akv", dir="/tmp"))
        self.store = self.root / "store"
        self.socket = socket or f"ipc://{self.root}/run/d.sock"
        self.model_dir = model_dir
        self.args = args
        self.env = env or {}
        self.pid: int | None = None

    def ctl(self, *args: str, socket: bool = True, timeout: float = 120.0):
        """Run `daemonctl ARGS [--socket S] --store D` as a subprocess; output captured."""
        cmd = [*daemonctl_command(), *args, "--store", str(self.store)]
        if socket:
            cmd += ["--socket", self.socket]
        env = {**os.environ, **self.env}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)

    def start(self, *extra: str, socket: bool = True) -> int:
        """`daemonctl start --json`; returns the daemon's pid."""
        proc = self.ctl(
            "start", "--model", str(self.model_dir), "--json", *self.args, *extra, socket=socket
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr + self.log()
        self.pid = json.loads(proc.stdout)["pid"]
        return self.pid

    def client(self, **kw):
        """A Client of this daemon (imported here: the client package never needs MLX)."""
        from agentkv.client import Client

        kw.setdefault("timeout", 30.0)
        return Client(self.socket, **kw)

    @staticmethod
    def turns(client, prompts: dict[str, Any], **kw) -> dict[str, Any]:
        """One turn per agent, submitted together through `client` and stepped to the end.

        Returns agent -> `Event` holding the turn's whole output (token ids and text of all
        its events, finish_reason and usage of the last).
        """
        uids = {client.submit(agent, prompt, **kw): agent for agent, prompt in prompts.items()}
        done: dict[str, Any] = {}
        deadline = time.monotonic() + 120.0
        merged = {uid: None for uid in uids}
        while len(done) < len(uids):
            assert time.monotonic() < deadline, f"turns not finished: {set(uids) - set(done)}"
            for event in client.step(timeout=1.0):
                assert event.uid in uids and event.agent_id == uids[event.uid], event
                assert uids[event.uid] not in done, f"event after the last one: {event}"
                m = merged[event.uid]
                if m is None:
                    merged[event.uid] = m = event
                else:
                    m.token_ids += event.token_ids
                    m.text += event.text
                    m.finish_reason, m.usage, m.error = (
                        event.finish_reason,
                        event.usage,
                        event.error,
                    )
                if m.finished:
                    done[uids[event.uid]] = m
        return done

    @staticmethod
    def holds_turns(context: list[int], turns: list[tuple[list[int], Any]], eos: set[int]) -> bool:
        """True if `context` is exactly these turns' prompts and outputs one after the other
        (prompt, `Event`): a turn that stopped at EOS has that EOS in the context, not in
        its token ids."""
        pos = 0
        for prompt, event in turns:
            for part in (prompt, event.token_ids):
                if context[pos : pos + len(part)] != part:
                    return False
                pos += len(part)
            if event.finish_reason == "stop":
                if pos >= len(context) or context[pos] not in eos:
                    return False
                pos += 1
        return pos == len(context)

    def alive(self) -> bool:
        """True while the daemon's process runs."""
        return self.pid is not None and pid_alive(self.pid)

    def wait_exit(self, timeout: float = 30.0) -> bool:
        """Wait for the process to be gone; True if it went."""
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.alive()

    def kill(self) -> None:
        """SIGKILL the daemon if it runs, and wait for it to be gone."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.wait_exit()

    def log(self) -> str:
        """The daemon's log file."""
        path = self.store / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""


def daemonctl_command() -> list[str]:
    """The `daemonctl` console script next to this Python, else `python -m` its module."""
    script = Path(sys.executable).with_name("daemonctl")
    return [str(script)] if script.exists() else [sys.executable, "-m", CLI_MODULE]


@pytest.fixture(scope="module")
def daemon_factory(model_dirs: dict[str, Path]) -> Iterator[Any]:
    """`make(arch="llama", *, socket=None, args=(), env=None)` -> a `Daemon` of a tiny model,
    not started yet. Every daemon made is killed, and its directory removed, at module end."""
    made: list[Daemon] = []

    def make(arch: str = "llama", **kw) -> Daemon:
        made.append(Daemon(model_dirs[arch], **kw))
        return made[-1]

    yield make
    for d in made:
        d.kill()
        shutil.rmtree(d.root, ignore_errors=True)
