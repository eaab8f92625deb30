"""Reliability faults a hostile new user found (issue 14), each against real daemons, real
sockets and real files:

- gc decides "the model serving this store" by the store's real identity (path, device,
  inode, host), never by a relative path resolved in another directory;
- a stale pidfile (a daemon killed with -9, its pid reused) never gets a process signalled,
  and `status` says "dead, pidfile left" (LSB 1); `start` cleans it up;
- `start` on a socket served by another store's (or another model's) daemon fails;
- a store on a read-only file system starts and restores (pidfile, lock, log elsewhere);
- a disk-full daemon says what is not durable: the turn's final event, `status`, a delete
  that could not be written, and `stop` (exit 1, agents and tokens behind);
- a pool that holds no block is a usage error (exit 2), not a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import Daemon, daemonctl_command

from agentkv.client import Client, StoreWriteFailed

ARGS = ("--block-size", "16", "--pool-blocks", "64")


def _ctl(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`daemonctl ARGS` run in `cwd` (relative --store/--socket resolve there)."""
    return subprocess.run(
        [*daemonctl_command(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def _kill(pid: int | None) -> None:
    with contextlib.suppress(ProcessLookupError, TypeError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def workdir():
    """A short temp directory under /tmp (ipc paths are limited to ~100 characters)."""
    root = Path(tempfile.mkdtemp(prefix="akvr", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


# -- 1: gc and the store's identity --------------------------------------------------------


def test_gc_never_takes_another_projects_daemon_for_its_store(model_dirs, workdir):
    """Two projects each have a store named `store`. B's daemon (model B) ran and stopped;
    A's daemon (model A) runs with `--store store`, relative. `gc --no-dry-run` in B, on
    A's socket, must keep B's agents: A's daemon serves another store."""
    a, b = workdir / "a", workdir / "b"
    a.mkdir(), b.mkdir()
    sock_b, sock_a = f"ipc://{workdir}/b.sock", f"ipc://{workdir}/a.sock"
    start_b = ["start", "--store", "store", "--socket", sock_b, *ARGS]
    assert _ctl(b, *start_b, "--model", str(model_dirs["gemma3_text"])).returncode == 0
    with Client(sock_b, timeout=30) as c:
        for agent in ("b1", "b2"):
            c.generate(agent, list(range(1, 40)), max_tokens=4)
    assert _ctl(b, "stop", "--store", "store", "--socket", sock_b).returncode == 0
    started = _ctl(
        a, "start", "--store", "store", "--socket", sock_a, *ARGS, "--json",
        "--model", str(model_dirs["llama"]),
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    pid_a = json.loads(started.stdout)["pid"]
    try:
        with Client(sock_a, timeout=30) as c:
            assert c.info["store"] == str((a / "store").resolve())  # absolute, always
            assert c.info["socket"] == sock_a
        gc = _ctl(b, "gc", "--store", "store", "--socket", sock_a, "--no-dry-run", "--json")
        assert gc.returncode == 0, gc.stderr
        report = json.loads(gc.stdout)
        assert report["foreign_agents"] == [] and report["foreign_blocks"] == [], report
        listed = _ctl(b, "agents", "--store", "store", "--socket", f"ipc://{b}/none.sock")
        assert listed.stdout.split() == ["b1", "b2"], listed.stdout + listed.stderr
    finally:
        _kill(pid_a)


def test_a_relative_socket_is_reported_absolute(model_dirs, workdir):
    """`--socket ipc://run/d.sock` given relative: the daemon binds and reports the
    absolute path, so `status` from another directory (with --store) finds it."""
    (workdir / "p").mkdir()
    started = _ctl(
        workdir / "p", "start", "--store", "s", "--socket", "ipc://d.sock", *ARGS, "--json",
        "--model", str(model_dirs["llama"]),
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    pid = json.loads(started.stdout)["pid"]
    try:
        assert json.loads(started.stdout)["socket"] == f"ipc://{workdir}/p/d.sock"
        status = _ctl(workdir, "status", "--store", "p/s", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        assert json.loads(status.stdout)["pid"] == pid
    finally:
        _kill(pid)


# -- 2: stale pidfiles ---------------------------------------------------------------------


def test_a_stale_pidfile_never_gets_a_process_signalled(daemon_factory):
    """kill -9 leaves the pidfile; its pid now belongs to an unrelated process (made so by
    writing that process's pid into it). `stop` must not signal it, `status` says dead
    with a pidfile (1), and `start` removes the stale files and starts."""
    d = daemon_factory(args=ARGS)
    d.start()
    d.kill()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (d.store / "daemon.pid").write_text(f"{bystander.pid}\n")
        status = d.ctl("status")
        assert status.returncode == 1, status.stdout + status.stderr
        assert "pidfile" in status.stdout and str(bystander.pid) in status.stdout
        stopped = d.ctl("stop", "--timeout", "1")
        assert stopped.returncode == 0, stopped.stderr
        assert "not running" in stopped.stdout and "stale" in stopped.stdout
        assert bystander.poll() is None  # never signalled
        assert not (d.store / "daemon.pid").exists()  # stop removed the stale file
        (d.store / "daemon.pid").write_text(f"{bystander.pid}\n")
        d.start()
        assert d.pid != bystander.pid and bystander.poll() is None
        assert int((d.store / "daemon.pid").read_text()) == d.pid
        assert d.ctl("status").returncode == 0
        assert d.ctl("stop").returncode == 0 and bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_status_after_kill_9_is_dead_with_pidfile(daemon_factory):
    """LSB: 1 "program is dead and /var/run pid file exists"; 3 once it is gone."""
    d = daemon_factory(args=ARGS)
    d.start()
    d.kill()
    assert (d.store / "daemon.pid").exists()
    status = d.ctl("status", "--json")
    assert status.returncode == 1, status.stdout
    assert json.loads(status.stdout) == {
        "running": False,
        "stale_pid": d.pid,
        "pidfile": str(d.store.resolve()),
    }
    assert d.ctl("stop").returncode == 0
    assert d.ctl("status").returncode == 3


# -- 3: start checks whose daemon answers ---------------------------------------------------


def test_start_refuses_a_socket_served_by_another_store_or_model(daemon_factory, model_dirs):
    d = daemon_factory(args=ARGS)
    d.start()
    other = d.root / "other-store"
    refused = subprocess.run(
        [*daemonctl_command(), "start", "--store", str(other), "--socket", d.socket, *ARGS],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "another daemon" in refused.stderr and str(d.store.resolve()) in refused.stderr
    assert not other.exists()
    wrong_model = d.ctl("start", "--model", str(model_dirs["gemma3_text"]), *ARGS)
    assert wrong_model.returncode == 1 and "model" in wrong_model.stderr, wrong_model.stderr
    same = d.ctl("start", "--model", str(model_dirs["llama"]), *ARGS, "--json")
    assert same.returncode == 0 and json.loads(same.stdout)["already"] is True


# -- 9: a read-only store ------------------------------------------------------------------


@pytest.fixture
def read_only_view(workdir):
    """`(writable, read_only)`: one directory, and a read-only bind mount of it."""
    src, view = workdir / "rw", workdir / "ro"
    src.mkdir(), view.mkdir()
    try:
        subprocess.run(["mount", "--bind", str(src), str(view)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot bind-mount here: {exc}")
    try:
        subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(view)], check=True, capture_output=True
        )
        yield src, view
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)


def test_a_store_on_a_read_only_file_system_starts_and_restores(model_dirs, read_only_view):
    """Its pidfile, lock and log go to the runtime directory; turns restore exactly."""
    src, view = read_only_view
    env = {"XDG_RUNTIME_DIR": str(src.parent / "xdg")}
    sock = f"ipc://{src.parent}/d.sock"
    model = str(model_dirs["llama"])
    base = ["--socket", sock, *ARGS, "--model", model, "--json"]
    assert _ctl(src, "start", "--store", str(src / "store"), *base, env=env).returncode == 0
    with Client(sock, timeout=30) as c:
        first = c.generate("reader", list(range(1, 50)), max_tokens=6)
    assert _ctl(src, "stop", "--store", str(src / "store"), env=env).returncode == 0
    started = _ctl(src, "start", "--store", str(view / "store"), *base, env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    pid = json.loads(started.stdout)["pid"]
    try:
        status = _ctl(src, "status", "--store", str(view / "store"), "--json", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        facts = json.loads(status.stdout)
        run = Path(facts["run_dir"])
        assert run.is_relative_to(src.parent / "xdg") and (run / "daemon.log").exists()
        assert int((run / "daemon.pid").read_text()) == pid
        with Client(sock, timeout=30) as c:
            before = c.inspect("reader")["tokens"]
            assert before == 49 + len(first.token_ids) + (first.finish_reason == "stop")
            again = c.generate("reader", [7, 8, 9], max_tokens=6)
            assert again.usage["restored_tokens"] >= 48  # three full blocks of 16
            assert again.durable is False  # a read-only store keeps nothing new
            with pytest.raises(StoreWriteFailed):
                c.delete("reader")
            assert c.inspect("reader")["tokens"] == before + 3 + len(again.token_ids) + (
                again.finish_reason == "stop"
            )  # not deleted, and nothing lost: its unsaved turn is still in memory
        stopped = _ctl(src, "stop", "--store", str(view / "store"), "--json", env=env)
        assert stopped.returncode == 1, stopped.stdout  # the last turn is not on disk
        assert json.loads(stopped.stdout)["unsaved"][0]["agent_id"] == "reader"
        assert not (run / "daemon.pid").exists()
    finally:
        _kill(pid)


# -- 4: durability reports -----------------------------------------------------------------


@pytest.fixture
def small_disk(workdir):
    """A 32 MiB tmpfs (skipped where we cannot mount) and a function that fills it."""
    where = workdir / "disk"
    where.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=32m", "akv-full", str(where)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")

    def fill() -> Path:
        filler = where / "filler"
        with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        return filler

    try:
        yield where, fill
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_reported_per_turn_in_status_on_delete_and_at_stop(model_dirs, small_disk):
    where, fill = small_disk
    d = Daemon(model_dirs["llama"], args=ARGS)
    d.store = where / "store"
    try:
        d.start()
        with d.client() as c:
            ok = c.generate("kept", list(range(1, 40)), max_tokens=5)
            assert ok.durable is True
            c.generate("doomed", list(range(1, 20)), max_tokens=3)
            filler = fill()
            durable = c.inspect("kept")["tokens"]
            late = c.generate("kept", list(range(40, 80)), max_tokens=5)
            assert late.durable is False  # the write failed: memory only, and the client knows
            behind = c.inspect("kept")["tokens"] - durable
            assert behind == 40 + len(late.token_ids) + (late.finish_reason == "stop")
            stats = c.stats()
            assert stats["store"]["write_errors"] >= 1
            (row,) = stats["unsaved"]
            assert row["agent_id"] == "kept" and row["behind_tokens"] == behind
            with pytest.raises(StoreWriteFailed, match="kept as it was"):
                c.delete("doomed")
        status = d.ctl("status")
        assert status.returncode == 0 and "write errors" in status.stdout
        assert f"kept: {behind} token(s) behind" in status.stdout, status.stdout
        stopped = d.ctl("stop", "--json")
        assert stopped.returncode == 1, stopped.stdout + stopped.stderr
        report = json.loads(stopped.stdout)
        assert [r["agent_id"] for r in report["unsaved"]] == ["kept"]
        assert report["unsaved"][0]["behind_tokens"] == behind
        assert not d.alive()
        filler.unlink()
        d.start()
        with d.client() as c:  # what stop said is what was kept
            assert c.inspect("kept")["tokens"] == durable
            assert "doomed" in [r["agent_id"] for r in c.agents()]  # its delete never landed
    finally:
        d.kill()
        shutil.rmtree(d.root, ignore_errors=True)


# -- rough edges ---------------------------------------------------------------------------


def test_a_pool_that_holds_no_block_is_a_usage_error(daemon_factory):
    d = daemon_factory()
    started = d.ctl("start", "--model", str(d.model_dir), "--memory-budget", "1KiB")
    assert started.returncode == 2, started.stdout + started.stderr
    assert "Traceback" not in started.stderr
    assert "holds no KV block" in started.stderr and "--memory-budget 1024" in started.stderr
