"""The HTTP front when its daemon is in trouble, through the official SDKs against real
daemons with --http:

- 429 with Retry-After when the daemon refuses a turn for overload: its real bound on a
  client's unfinished turns (the front is one client), reached with real turns of a
  model that never stops by itself (tests/crafted_models.py);
- 503 for the requests in flight when the daemon is killed (kill -9), then no front at
  all (it lives and dies with its daemon); 503 for new requests while it drains on stop;
- the daemon restarting its HTTP front after the front was killed (kill -9).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import anthropic
import openai
import pytest
from conftest import Daemon
from crafted_models import never_stopping_model_dir
from test_http_api import CHAT, Http, free_port

from agentkv.client import AsyncClient, EngineClosed
from agentkv.daemon.service.commands import MAX_TURNS_PER_CLIENT

LONG = 7800  # tokens: a never-stopping turn this long holds the pool for many seconds
# One turn of LONG tokens fills the pool: the others wait, unfinished.
ARGS = ("--block-size", "16", "--pool-blocks", "500")


@pytest.fixture(scope="module")
def make_http(model_dirs):
    """`make(model_dir=None, args=ARGS)` -> Http of a started daemon with --http; every
    daemon is killed at module end."""
    made: list[Daemon] = []

    def make(model_dir: Path | None = None, args=ARGS) -> Http:
        d = Daemon(model_dir or model_dirs["llama"], args=args)
        made.append(d)
        port = free_port()
        d.start("--http", f"127.0.0.1:{port}")
        return Http(d, port)

    yield make
    for d in made:
        d.kill()
        shutil.rmtree(d.root, ignore_errors=True)


@pytest.fixture(scope="module")
def endless(model_dirs):
    root = Path(tempfile.mkdtemp(prefix="akvendless", dir="/tmp"))
    yield never_stopping_model_dir(model_dirs["llama"], root / "model")
    shutil.rmtree(root, ignore_errors=True)


async def _unfinished(socket: str, at_least: int) -> None:
    """Wait until the daemon holds `at_least` turns waiting or running (a bound, not a
    timing: fails after 120 s)."""
    async with AsyncClient(socket) as c:
        deadline = time.monotonic() + 120
        while True:
            s = await c.stats()
            if s["waiting"] + s["active"] >= at_least:
                return
            assert time.monotonic() < deadline, f"only {s['waiting'] + s['active']} turns"
            await asyncio.sleep(0.05)


def test_overload_is_429_and_a_killed_daemon_503(make_http, endless):
    """The front holds MAX_TURNS_PER_CLIENT unfinished turns (real requests of both SDKs,
    streamed and not): one more is refused 429 with Retry-After, in each API's error
    shape. Then the daemon is killed (kill -9): every request still waiting is answered
    503 (both SDKs), and once the front has followed its daemon nothing listens."""
    h = make_http(endless)

    async def main():
        oa, an = h.async_openai(), h.async_anthropic()
        kw = {"model": "m", "max_tokens": LONG}
        hogs = [
            asyncio.ensure_future(oa.chat.completions.create(messages=CHAT, stream=True, **kw))
            for _ in range(MAX_TURNS_PER_CLIENT - 2)
        ]
        whole = asyncio.ensure_future(oa.chat.completions.create(messages=CHAT, **kw))
        whole_an = asyncio.ensure_future(an.messages.create(messages=CHAT[1:], **kw))
        await _unfinished(h.daemon.socket, MAX_TURNS_PER_CLIENT)

        with pytest.raises(openai.RateLimitError) as refused:
            await oa.chat.completions.create(model="m", messages=CHAT, max_tokens=4)
        with pytest.raises(anthropic.RateLimitError) as refused_an:
            await an.messages.create(model="m", messages=CHAT[1:], max_tokens=4)

        os.kill(h.daemon.pid, signal.SIGKILL)
        answered = await asyncio.gather(whole, whole_an, *hogs, return_exceptions=True)
        with pytest.raises(openai.APIConnectionError):
            await oa.chat.completions.create(model="m", messages=CHAT, max_tokens=4)
        await oa.close()
        await an.close()
        return refused.value, refused_an.value, answered

    refused, refused_an, answered = asyncio.run(asyncio.wait_for(main(), 300))
    assert refused.status_code == 429 and refused.response.headers["Retry-After"] == "1"
    assert refused.body["code"] == "overloaded" and refused.body["type"] == "rate_limit_error"
    assert refused_an.status_code == 429 and refused_an.response.headers["Retry-After"] == "1"
    assert refused_an.body["error"]["type"] == "rate_limit_error"

    whole, whole_an, *hogs = answered
    assert isinstance(whole, openai.InternalServerError) and whole.status_code == 503
    assert whole.body["type"] == "service_unavailable"
    assert isinstance(whole_an, anthropic.InternalServerError) and whole_an.status_code == 503
    assert whole_an.body["error"]["type"] == "overloaded_error"
    # The one turn that was running had its response (a stream) started: it ends with an
    # error event instead; every other was still waiting and got the status.
    statuses = [getattr(x, "status_code", 200) for x in hogs]
    assert statuses.count(503) >= len(hogs) - 1, statuses


def test_a_draining_daemon_is_503(make_http, endless):
    """`daemonctl stop` drains the running turns: meanwhile new requests are refused 503
    (engine_closed) in both APIs' shapes; the stop completes once the running turn ends
    (its client leaves the stream, which cancels it)."""
    h = make_http(endless)
    oa = h.openai()
    stream = oa.chat.completions.create(
        model="m", messages=CHAT, max_tokens=LONG, stream=True, user="drained"
    )
    next(iter(stream))  # the turn runs (and holds the whole pool)
    stopped: list = []
    stopper = threading.Thread(target=lambda: stopped.append(h.daemon.ctl("stop")))
    stopper.start()
    with h.daemon.client() as c:  # wait until the daemon refuses turns (a bound: 120 s)
        deadline = time.monotonic() + 120
        while True:
            try:
                c.cancel(c.submit("probe", messages=CHAT, max_tokens=1))
            except EngineClosed:
                break
            assert time.monotonic() < deadline, "the daemon never began to shut down"
            time.sleep(0.05)
    with pytest.raises(openai.InternalServerError) as refused:
        oa.chat.completions.create(model="m", messages=CHAT, max_tokens=4)
    with pytest.raises(anthropic.InternalServerError) as refused_an:
        h.anthropic().messages.create(model="m", messages=CHAT[1:], max_tokens=4)
    stream.close()
    stopper.join(120)
    assert refused.value.status_code == 503 and refused.value.body["code"] == "engine_closed"
    assert refused_an.value.status_code == 503
    assert refused_an.value.body["error"]["type"] == "overloaded_error"
    assert stopped and stopped[0].returncode == 0, stopped
    assert h.daemon.wait_exit(30)


def _front_pid(daemon_pid: int) -> int | None:
    """The pid of the daemon's HTTP front (its child running the front's module)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == daemon_pid and b"agentkv.daemon.service.http" in cmdline:
            return int(entry.name)
    return None


def test_a_killed_front_is_restarted_by_its_daemon(make_http):
    """kill -9 of the HTTP front: the daemon starts a new one (logged), which serves both
    SDKs again; the daemon served on meanwhile."""
    h = make_http(args=("--block-size", "16", "--pool-blocks", "256"))
    oa = h.openai()
    first = oa.chat.completions.create(model="m", messages=CHAT, max_tokens=4, user="kept")
    old = _front_pid(h.daemon.pid)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while _front_pid(h.daemon.pid) in (None, old):
        assert time.monotonic() < deadline, "the front was not restarted"
        time.sleep(0.1)
    while True:  # the new front imports and binds its port (seconds on a loaded box)
        try:
            again = oa.chat.completions.create(model="m", messages=CHAT, max_tokens=4, user="kept")
            break
        except openai.APIConnectionError:
            assert time.monotonic() < deadline, "the restarted front does not serve"
            time.sleep(0.2)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the same agent, kept
    reply = h.anthropic().messages.create(model="m", max_tokens=4, messages=CHAT[1:])
    assert reply.content[0].text
    assert h.daemon.alive() and "the HTTP front exited with -9: restarting it" in h.daemon.log()
