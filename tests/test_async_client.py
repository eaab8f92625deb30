"""`AsyncClient` against a real daemon: many concurrent turns from one client object in one
event loop, streaming, typed errors like `Client`'s, and task cancellation cancelling the
turn on the daemon."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from agentkv.client import (
    AsyncClient,
    AuthMismatch,
    DaemonUnavailable,
    InvalidRequest,
    TurnCancelled,
    UnknownAgent,
)

AGENTS = 64
TOKENS = 8


@pytest.fixture(scope="module")
def daemon(daemon_factory):
    d = daemon_factory(args=("--block-size", "16", "--pool-blocks", "1024"))
    d.start()
    return d


def prompt_of(i: int) -> str:
    return f"Agent {i} says: the number {i * 7} follows {i}."


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))


async def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    """Poll an async predicate until true; fails after `timeout` (a bound, not a timing)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def test_64_concurrent_agents_get_the_sync_clients_text(daemon):
    """64 agent tasks on one AsyncClient, two turns each, all at once: every turn's text and
    tokens equal the sync Client's for the same prompts (greedy), and each agent's context
    is the same."""
    with daemon.client() as sync:
        want = {}
        for turn in range(2):
            prompts = {f"sync-{i}": prompt_of(i) + f" Turn {turn}." for i in range(AGENTS)}
            done = daemon.turns(sync, prompts, max_tokens=TOKENS)
            for i in range(AGENTS):
                want[i, turn] = done[f"sync-{i}"]

    async def agent(c: AsyncClient, i: int) -> list:
        out = []
        for turn in range(2):
            prompt = prompt_of(i) + f" Turn {turn}."
            out.append(await c.generate(f"async-{i}", prompt, max_tokens=TOKENS))
        return out

    async def main():
        async with AsyncClient(daemon.socket) as c:
            results = await asyncio.gather(*(agent(c, i) for i in range(AGENTS)))
            contexts = [await c.inspect(f"async-{i}") for i in (0, AGENTS - 1)]
            return results, contexts

    results, contexts = run(main())
    for i, turns in enumerate(results):
        for turn, got in enumerate(turns):
            assert got.agent_id == f"async-{i}"
            assert (got.text, got.token_ids) == (want[i, turn].text, want[i, turn].token_ids)
            assert got.finish_reason == want[i, turn].finish_reason
    with daemon.client() as sync:
        for i, ctx in zip((0, AGENTS - 1), contexts, strict=True):
            assert ctx["token_ids"] == sync.inspect(f"sync-{i}")["token_ids"]


def test_stream_yields_the_text_of_generate(daemon):
    """`async for` over stream() yields deltas that join to the sync generate's text; two
    streams interleave on one client."""
    prompt = "The quick brown fox jumps over the lazy dog."
    with daemon.client() as sync:
        whole = sync.generate("gen-ref", prompt, max_tokens=120)

    async def collect(c, agent):
        return [t async for t in c.stream(agent, prompt, max_tokens=120, interval=0)]

    async def main():
        async with AsyncClient(daemon.socket) as c:
            return await asyncio.gather(collect(c, "stream-a"), collect(c, "stream-b"))

    for deltas in run(main()):
        assert len(deltas) > 1
        assert "".join(deltas) == whole.text


def test_errors_are_typed_as_the_sync_clients(daemon):
    """Unknown agents and bad max_tokens raise the same classes as Client, and the client
    keeps serving after them."""

    async def main():
        async with AsyncClient(daemon.socket) as c:
            got = []
            for call in (
                c.inspect("nobody-here"),
                c.delete("nobody-here"),
                c.generate("bad-max", "hi", max_tokens=0),
                c.generate("bad-max", "hi", max_tokens="many"),
                c.cancel(999_999),
            ):
                try:
                    await call
                except Exception as exc:
                    got.append(type(exc))
            ok = await c.generate("after-errors", "hi", max_tokens=2)
            return got, ok

    got, ok = run(main())
    with daemon.client() as sync:
        want = []
        for call in (
            lambda: sync.inspect("nobody-here"),
            lambda: sync.delete("nobody-here"),
            lambda: sync.generate("bad-max", "hi", max_tokens=0),
            lambda: sync.generate("bad-max", "hi", max_tokens="many"),
            lambda: sync.cancel(999_999),
        ):
            try:
                call()
            except Exception as exc:
                want.append(type(exc))
    assert got == want
    assert got[:2] == [UnknownAgent, UnknownAgent] and got[2] is InvalidRequest
    assert ok.finish_reason in ("stop", "length")


# A turn of the tiny llama that runs for hundreds of tokens (869) before its EOS, so a
# cancel sent once it runs finds it running; `long_turn` checks that on a twin agent.
FIRST, LONG = [3, 4, 5, 6], [8, 9, 10]
LONG_MAX = 2000


@pytest.fixture(scope="module")
def long_turn(daemon):
    with daemon.client() as sync:
        sync.generate("twin", FIRST, max_tokens=4)
        twin = sync.generate("twin", LONG, max_tokens=LONG_MAX)
    assert len(twin.token_ids) >= 500, "the cancel tests need a long turn"
    return twin


def _cancel_test(daemon, agent: str, start_turn, started) -> None:
    """Start a long turn in a task, cancel the task once the turn runs: the daemon counts
    it cancelled, the agent's context is as before, and its next turn runs."""

    async def main():
        async with AsyncClient(daemon.socket) as c:
            await c.generate(agent, FIRST, max_tokens=4)
            before = (await c.inspect(agent))["token_ids"]
            cancelled0 = (await c.stats())["cancelled"]
            task = asyncio.ensure_future(start_turn(c))
            await started(c, task)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

            async def counted():
                return (await c.stats())["cancelled"] > cancelled0

            await wait_for(counted, "the daemon did not count the turn cancelled")
            after = (await c.inspect(agent))["token_ids"]
            nxt = await c.generate(agent, [11, 12], max_tokens=4)
            return before, after, nxt

    before, after, nxt = run(main())
    assert after == before
    assert nxt.finish_reason in ("stop", "length") and nxt.usage["cached_tokens"] > 0


def test_cancelling_a_generate_task_cancels_the_turn(daemon, long_turn):
    async def start(c):
        return await c.generate("cancel-gen", LONG, max_tokens=LONG_MAX)

    async def started(c, task):
        async def running():
            return (await c.stats())["active"] >= 1

        await wait_for(running, "the turn never ran")

    _cancel_test(daemon, "cancel-gen", start, started)


def test_cancelling_a_stream_task_cancels_the_turn(daemon, long_turn):
    seen: list[str] = []

    async def start(c):
        async for text in c.stream("cancel-stream", LONG, max_tokens=LONG_MAX):
            seen.append(text)

    async def started(c, task):
        async def streaming():
            return bool(seen)

        await wait_for(streaming, "the stream never yielded")

    _cancel_test(daemon, "cancel-stream", start, started)


def test_leaving_a_stream_early_cancels_the_turn(daemon, long_turn):
    """Breaking out of `async for` cancels the turn: the daemon counts it cancelled and the
    agent's context stays as before; stream() raises TurnCancelled for a turn cancelled
    by someone else (a delete of its agent); `submit`'s turns come through `step`."""

    async def main():
        async with AsyncClient(daemon.socket) as c:
            await c.generate("leaver", FIRST, max_tokens=4)
            before = (await c.inspect("leaver"))["token_ids"]
            n0 = (await c.stats())["cancelled"]
            async for _ in c.stream("leaver", LONG, max_tokens=LONG_MAX):
                break

            async def counted():
                return (await c.stats())["cancelled"] > n0

            await wait_for(counted, "leaving the stream did not cancel the turn")
            after = (await c.inspect("leaver"))["token_ids"]
            # FIRST then LONG: a long turn (long_turn's twin); LONG alone stops after ~19
            # tokens, which raced the cancel below.
            await c.generate("other", FIRST, max_tokens=4)
            uid = await c.submit("other", LONG, max_tokens=LONG_MAX)
            assert await c.cancel(uid)
            events = []
            while not any(e.finished for e in events):
                events += await c.step(timeout=5.0)
            await c.generate("victim", FIRST, max_tokens=4)
            with pytest.raises(TurnCancelled) as raised:
                deleted = False
                async for _ in c.stream("victim", LONG, max_tokens=LONG_MAX, interval=0):
                    if not deleted:  # a delete cancels its agent's running turn
                        await c.delete("victim")
                        deleted = True
            return before, after, events[-1], raised.value

    before, after, last, cancelled = run(main())
    assert after == before
    assert last.finish_reason == "cancelled"
    assert cancelled.agent_id == "victim" and cancelled.text


def test_auth_key_and_a_mismatch_like_the_sync_client(daemon_factory):
    """With the daemon's key the AsyncClient is served (signed requests, session bound);
    without one, or with another key, it gets AuthMismatch at once, as Client does."""
    key_dir = Path(tempfile.mkdtemp(prefix="akvkey", dir="/tmp"))
    key, other = key_dir / "key", key_dir / "other"
    key.write_bytes(os.urandom(32).hex().encode())
    other.write_bytes(os.urandom(32).hex().encode())
    d = daemon_factory(args=("--block-size", "16", "--pool-blocks", "64"))
    d.start("--auth-key", str(key))

    async def main():
        async with AsyncClient(d.socket, auth_key=key) as c:
            served = await c.generate("keyed", [5, 6, 7], max_tokens=3)
        refused = []
        for auth in (None, other):
            with pytest.raises(AuthMismatch) as raised:
                async with AsyncClient(d.socket, auth_key=auth, timeout=60) as c:
                    await c.stats()
            refused.append(raised.value)
        return served, refused

    try:
        served, refused = run(main())
        with d.client(auth_key=key) as sync:
            want = sync.generate("keyed-ref", [5, 6, 7], max_tokens=3)
    finally:
        shutil.rmtree(key_dir)
    assert served.token_ids == want.token_ids
    assert len(refused) == 2


def test_a_daemon_that_stops_answering_fails_the_turn_as_unavailable(daemon, long_turn):
    """A daemon that stops answering mid-turn (SIGSTOP): the awaiting generate raises
    DaemonUnavailable after the client's timeout, like Client; after SIGCONT the same
    client serves again, and keeps nothing of the failed turn: the events the daemon
    still sends for it (late step replies, its finish) are dropped, not held."""

    async def main():
        async with AsyncClient(daemon.socket, timeout=2.0) as c:
            await c.generate("frozen", FIRST, max_tokens=4)
            task = asyncio.ensure_future(c.generate("frozen", LONG, max_tokens=LONG_MAX))

            async def running():
                return (await c.stats())["active"] >= 1

            await wait_for(running, "the turn never ran")
            os.kill(daemon.pid, signal.SIGSTOP)
            try:
                with pytest.raises(DaemonUnavailable):
                    await task
            finally:
                os.kill(daemon.pid, signal.SIGCONT)
            thawed = await c.generate("thawed", [5, 6, 7], max_tokens=3)

            async def idle():  # the failed turn ran on to its end on the daemon
                return (await c.stats())["active"] == 0

            await wait_for(idle, "the frozen turn never ended", timeout=240)
            again = await c.generate("thawed", [8], max_tokens=3)  # steps past its events
            return thawed, again, dict(c._early), dict(c._routes)

    after, again, early, routes = run(main())
    assert after.finish_reason in ("stop", "length")
    assert again.finish_reason in ("stop", "length")
    assert early == {} and routes == {}
