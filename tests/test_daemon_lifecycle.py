"""The daemon's life across stops and crashes, through real processes, sockets and stores.

- `daemonctl stop` then `daemonctl start`: every agent resumes exactly, its cache read from
  disk once.
- SIGKILL in the middle of a generation: the store opens and verifies, completed turns are
  kept, the interrupted one is not, and every agent resumes exactly.
- `shutdown` (and SIGTERM) drains: the running turn finishes, reaches its client, is kept;
  then the process exits. `stop --cancel` and `--cancel-on-shutdown` cancel it instead.
- `daemonctl start`: two at once start one daemon; `--foreground` serves in the process
  itself; a failure shows the log's tail. `stop` of a daemon that does not answer sends
  SIGTERM at once. `agents` and `delete` work on the store itself when no daemon runs.
- A client that goes away without collecting its events is forgotten after --client-ttl.

Exactness is checked token for token against the in-process engine and a from-scratch
mlx-lm run (`generate_step` over the whole context the daemon reports).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import daemonctl_command
from refs import eos_ids, make_engine, random_tokens, run_all, scratch_tokens

from agentkv.client import EngineClosed
from agentkv.storage import CacheStore

VOCAB = 768
BLOCK = 16
ARGS = ("--block-size", str(BLOCK), "--pool-blocks", "96")
TURN_TOKENS = 10
TURN_LONG = 60  # decodes in well under a second on the tiny model
LONG = 600  # several seconds for four agents at once


def test_stop_then_start_resumes_every_agent_exactly(daemon_factory, loaded_models):
    """Three agents, two turns each; `daemonctl stop`, `daemonctl start`; the third turn
    matches an uninterrupted run and mlx-lm from scratch, restored from disk once."""
    model, tokenizer = loaded_models["llama"]
    eos = eos_ids(tokenizer)
    rng = np.random.default_rng(5)
    agents = ("planner", "critic", "coder")
    firsts = {a: random_tokens(rng, 12 + 21 * i, VOCAB) for i, a in enumerate(agents)}
    firsts["critic"] = "You are the critic. Read the plan."  # a text prompt: BOS added
    seconds = {a: random_tokens(rng, 4 + i, VOCAB) for i, a in enumerate(agents)}
    thirds = {a: random_tokens(rng, 3, VOCAB) for a in agents}
    fourths = {a: [7, 8] for a in agents}

    d = daemon_factory(args=ARGS)
    d.start()
    with d.client() as c:
        for prompts in (firsts, seconds):
            d.turns(c, prompts, max_tokens=TURN_TOKENS)
        contexts = {a: c.inspect(a)["token_ids"] for a in agents}
    stopped = d.ctl("stop", "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert '"stopped_by": "shutdown"' in stopped.stdout  # it drained and exited by itself
    assert d.wait_exit(5)

    d.start()
    with d.client() as c:
        assert {r["agent_id"] for r in c.agents()} == set(agents)  # known from the store
        assert c.stats()["agents"] == len(agents)  # counted while only on disk too
        third = d.turns(c, thirds, max_tokens=TURN_TOKENS)
        fourth = d.turns(c, fourths, max_tokens=TURN_TOKENS)
        stats = c.stats()
    assert stats["restored_agents"] == len(agents)

    uninterrupted = make_engine(model, tokenizer, block_size=BLOCK, total_blocks=256)
    for prompts in (firsts, seconds, thirds):
        for agent, prompt in prompts.items():
            uninterrupted.submit(agent, prompt, max_tokens=TURN_TOKENS)
        reference = {cpl.agent_id: cpl for cpl in run_all(uninterrupted).values()}
    for agent in agents:
        assert contexts[agent] == uninterrupted.agent_tokens(agent)[: len(contexts[agent])]
        got = third[agent]
        assert got.token_ids == reference[agent].token_ids, agent
        assert got.token_ids == scratch_tokens(
            model, contexts[agent] + thirds[agent], TURN_TOKENS, eos=eos
        ), agent
        assert got.usage["restored_tokens"] == len(contexts[agent]) > 0, agent
        assert got.usage["cached_tokens"] == len(contexts[agent]), agent
        assert got.usage["recomputed_tokens"] == 0, agent
        assert fourth[agent].usage["restored_tokens"] == 0, agent  # memory from now on
        assert fourth[agent].usage["cached_tokens"] > len(contexts[agent]), agent
    uninterrupted.close()


def test_sigkill_mid_generation_keeps_completed_turns(daemon_factory, loaded_models):
    """kill -9 while a turn decodes: the store is whole, finished turns are kept, the
    interrupted turn is not, and every agent resumes exactly where the daemon says it is."""
    model, tokenizer = loaded_models["llama"]
    eos = eos_ids(tokenizer)
    rng = np.random.default_rng(17)
    agents = ("k0", "k1", "k2")
    firsts = {a: random_tokens(rng, 10 + 19 * i, VOCAB) for i, a in enumerate(agents)}

    d = daemon_factory(args=ARGS)
    d.start()
    with d.client() as c:
        # A turn reported finished is durable: no waiting for write-back before the kill.
        first = d.turns(c, firsts, max_tokens=TURN_TOKENS)
        kept = {a: c.inspect(a)["token_ids"] for a in agents}
        longs = {a: _no_early_eos(model, eos, kept[a], rng) for a in ("k0", "k1")}
        long_uid = c.submit("k0", longs["k0"], max_tokens=400)
        c.submit("k1", longs["k1"], max_tokens=400)
        short = [21, 22]
        short_uid = c.submit("k2", short, max_tokens=4)
        seen, done = _until_short_done(c, long_uid, short_uid)
        os.kill(d.pid, signal.SIGKILL)  # at once: k2 just finished, k0 and k1 are decoding
        kept["k2"] = kept["k2"] + short + done.token_ids
    turns = {a: [(firsts[a], first[a])] for a in agents}
    turns["k2"].append((short, done))
    assert d.wait_exit(10)
    assert 3 <= len(seen) < 400

    CacheStore(d.store / "cache").close()  # it opens (the dead daemon's lock is gone)
    verified = d.ctl("verify", "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert '"corrupt": []' in verified.stdout

    d.start()
    with d.client() as c:
        contexts = {a: c.inspect(a)["token_ids"] for a in agents}
        for agent in agents:
            assert contexts[agent] == kept[agent], agent  # interrupted turns left no trace
            assert d.holds_turns(contexts[agent], turns[agent], eos), agent
        nexts = {a: random_tokens(rng, 2 + i, VOCAB) for i, a in enumerate(agents)}
        resumed = d.turns(c, nexts, max_tokens=TURN_TOKENS)
    for agent in agents:
        want = scratch_tokens(model, contexts[agent] + nexts[agent], TURN_TOKENS, eos=eos)
        assert resumed[agent].token_ids == want, agent
        assert resumed[agent].usage["restored_tokens"] == len(contexts[agent]), agent


def test_shutdown_drains_the_running_turn_then_exits(daemon_factory, loaded_models):
    """`shutdown` while a turn decodes: new turns are refused, the running one finishes in
    full and reaches its client, its cache is flushed to the store, and the process exits."""
    model, tokenizer = loaded_models["llama"]
    eos = eos_ids(tokenizer)
    prompt = _no_early_eos(model, eos, [], np.random.default_rng(23), 20, horizon=TURN_LONG)
    d = daemon_factory(args=ARGS)
    d.start()
    with d.client() as c, d.client() as other:
        uid = c.submit("drainer", prompt, max_tokens=TURN_LONG)
        head = _tokens_until(c, uid, at_least=2)
        other.shutdown()
        with pytest.raises(EngineClosed):
            other.submit("late", [5, 6], max_tokens=4)
        time.sleep(1.0)  # the turn ends meanwhile; its last events wait for this client
        rest = _tokens_until(c, uid, at_least=None)
    want = scratch_tokens(model, prompt, TURN_LONG, eos=eos)
    assert rest.finish_reason == "length"
    assert head + rest.token_ids == want  # the whole turn, not cut short
    assert d.wait_exit(30), d.log()
    assert "stopped" in d.log()
    assert not (d.store / "daemon.pid").exists()  # the daemon removed its own pidfile

    d.start()  # the drained turn was flushed before exit
    with d.client() as c:
        context = c.inspect("drainer")["token_ids"]
    assert context == prompt + want

    os.kill(d.pid, signal.SIGTERM)  # SIGTERM drains the same way
    assert d.wait_exit(30), d.log()
    assert not (d.store / "daemon.pid").exists()
    assert d.ctl("status").returncode == 3


@pytest.mark.parametrize(
    "start_args, stop_args",
    [((), ("--cancel",)), (("--cancel-on-shutdown",), ())],
    ids=["stop --cancel", "--cancel-on-shutdown"],
)
def test_cancelling_shutdown_cancels_running_turns(
    daemon_factory, loaded_models, start_args, stop_args
):
    """Turns that would decode for seconds end "cancelled" with what they had, reach their
    client, leave no trace in the store, and the daemon exits at once."""
    model, tokenizer = loaded_models["llama"]
    eos = eos_ids(tokenizer)
    prompt = _no_early_eos(model, eos, [], np.random.default_rng(23), 20, horizon=LONG)
    d = daemon_factory(args=(*ARGS[:2], "--pool-blocks", "512", *start_args))
    d.start()
    with d.client() as c:
        uids = [c.submit(f"long{i}", prompt, max_tokens=LONG) for i in range(4)]
        _tokens_until(c, uids[0], at_least=2)
        stop = subprocess.Popen(
            _ctl(d, "stop", "--json", *stop_args), stdout=subprocess.PIPE, text=True
        )
        finals = _finals(c, set(uids))
    assert stop.wait(60) == 0
    assert json.loads(stop.stdout.read())["stopped_by"] == "shutdown"
    for uid in uids:
        assert finals[uid].finish_reason == "cancelled", finals[uid]
        assert finals[uid].usage["generated_tokens"] < LONG
    assert d.wait_exit(10)
    listed = d.ctl("agents", "--json")  # no daemon: read from the store itself
    assert listed.returncode == 0 and json.loads(listed.stdout) == []


def test_two_starts_at_once_start_one_daemon(daemon_factory):
    """Concurrent `daemonctl start`s on one store: both succeed, naming the same daemon;
    the one that lost the store's lock waited for the winner's handshake."""
    d = daemon_factory(args=ARGS)
    cmd = _ctl(d, "start", "--model", str(d.model_dir), "--json", *ARGS)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0]["pid"] == outs[1]["pid"]
    d.pid = outs[0]["pid"]
    assert int((d.store / "daemon.pid").read_text()) == d.pid
    with d.client() as c:
        assert c.stats()["pid"] == d.pid
    assert d.ctl("stop").returncode == 0


def test_start_foreground_serves_in_that_process(daemon_factory):
    d = daemon_factory(args=ARGS)
    fg = subprocess.Popen(
        _ctl(d, "start", "--foreground", "--model", str(d.model_dir), *ARGS),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while d.ctl("status").returncode != 0:
            assert fg.poll() is None and time.monotonic() < deadline, d.log()
            time.sleep(0.2)
        with d.client() as c:
            assert c.stats()["pid"] == fg.pid
            assert c.generate("fg", [5, 6, 7], max_tokens=3).finish_reason in ("length", "stop")
        assert d.ctl("stop").returncode == 0
        assert fg.wait(30) == 0
        assert "serving on" in fg.stderr.read()  # logs to stderr too
    finally:
        fg.kill()


def test_a_failed_start_shows_the_log(daemon_factory, tmp_path):
    d = daemon_factory(args=ARGS)
    missing = tmp_path / "no-such-model"
    proc = d.ctl("start", "--model", str(missing), timeout=120)
    assert proc.returncode == 1
    assert "daemon exited with" in proc.stderr and str(missing) in proc.stderr
    assert not (d.store / "daemon.pid").exists()


def test_stop_sigterms_a_daemon_that_does_not_answer_at_once(daemon_factory):
    """Wedged (SIGSTOP): no shutdown can be asked, so stop signals at once instead of
    first waiting out --timeout for a drain nobody requested."""
    d = daemon_factory(args=ARGS)
    d.start()
    os.kill(d.pid, signal.SIGSTOP)
    tic = time.monotonic()
    stopped = d.ctl("stop", "--json", "--timeout", "3")
    elapsed = time.monotonic() - tic
    assert stopped.returncode == 0, stopped.stderr
    # 2 s handshake, then SIGTERM (pending while stopped) and 3 s, then SIGKILL
    assert json.loads(stopped.stdout)["stopped_by"] == "SIGKILL"
    assert elapsed < 9.0, elapsed
    assert d.wait_exit(5)


def test_agents_and_delete_without_a_daemon_use_the_store(daemon_factory):
    d = daemon_factory(args=ARGS)
    d.start()
    with d.client() as c:
        for agent in ("keep", "drop"):
            c.generate(agent, [4, 5, 6], max_tokens=3)
    os.kill(d.pid, signal.SIGSTOP)  # it has the store but does not answer: refused
    try:
        wedged = d.ctl("agents", "--timeout", "1")
        assert wedged.returncode == 1 and "does not answer" in wedged.stderr
    finally:
        os.kill(d.pid, signal.SIGCONT)
    assert d.ctl("stop").returncode == 0

    assert json.loads(d.ctl("agents", "--json").stdout) == ["drop", "keep"]
    deleted = d.ctl("delete", "drop")
    assert deleted.returncode == 0, deleted.stderr
    assert d.ctl("delete", "nobody").returncode == 1
    assert json.loads(d.ctl("agents", "--json").stdout) == ["keep"]
    d.start()
    with d.client() as c:
        assert [r["agent_id"] for r in c.agents()] == ["keep"]
    assert d.ctl("stop").returncode == 0


def test_a_client_that_never_collects_is_forgotten(daemon_factory):
    """A client that submits and goes away: once --client-ttl passes with nothing running,
    the daemon drops it and its uncollected events (logged), and serves on."""
    d = daemon_factory(args=(*ARGS, "--client-ttl", "1"))
    d.start()
    with d.client() as gone:
        gone.submit("orphan", [4, 5, 6], max_tokens=3)
    with d.client() as c:
        deadline = time.monotonic() + 30
        while c.stats()["expired_clients"] == 0:
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.2)
        stats = c.stats()
        assert stats["expired_clients"] == 1 and stats["clients"] == 0
        assert c.inspect("orphan")["tokens"] > 3  # its turn ran; only its events are gone
        r = c.generate("after", [7, 8], max_tokens=2)
        assert r.finish_reason in ("length", "stop")
    assert "forgot client" in d.log()
    assert d.ctl("stop").returncode == 0


def _ctl(d, *args: str) -> list[str]:
    """The `daemonctl ARGS` command line for daemon `d` (to run it in the background)."""
    return [*daemonctl_command(), *args, "--store", str(d.store), "--socket", d.socket]


def _finals(client, uids: set[int]) -> dict:
    """Step until every request in `uids` sent its last event; returns uid -> that event."""
    finals = {}
    deadline = time.monotonic() + 60.0
    while set(finals) != uids:
        assert time.monotonic() < deadline, f"not finished: {uids - set(finals)}"
        for event in client.step(timeout=0.5):
            if event.finished:
                finals[event.uid] = event
    return finals


def _no_early_eos(model, eos, context, rng, length: int = 3, horizon: int = 60) -> list[int]:
    """A random prompt after which greedy decoding runs `horizon` tokens without an EOS,
    so a long turn is sure to be still decoding when the test interrupts it."""
    for _ in range(50):
        prompt = random_tokens(rng, length, VOCAB)
        if len(scratch_tokens(model, context + prompt, horizon, eos=eos)) == horizon:
            return prompt
    raise AssertionError("no prompt without an early EOS")


def _until_short_done(client, long_uid: int, short_uid: int):
    """Step until the short request finished and the long one streamed 3 tokens or more;
    returns (the long one's tokens, the short one's merged final event)."""
    seen: list[int] = []
    short = None
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        for event in client.step(timeout=0.5):
            if event.uid == long_uid:
                assert not event.finished, f"the long turn finished early: {event}"
                seen += event.token_ids
            elif event.uid == short_uid:
                if short is None:
                    short = event
                else:
                    short.token_ids += event.token_ids
                    short.finish_reason, short.usage = event.finish_reason, event.usage
        if short is not None and short.finished and len(seen) >= 3:
            assert short.finish_reason in ("stop", "length"), short
            return seen, short
    raise AssertionError("the short turn did not finish in time")


def _tokens_until(client, uid: int, at_least: int | None):
    """Step until request `uid` streamed `at_least` tokens (None: until it finishes).

    Returns the merged event so far (token ids concatenated; finish_reason on the last).
    """
    merged = None
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        for event in client.step(timeout=0.5):
            if event.uid != uid:
                continue  # another request of this client
            if merged is None:
                merged = event
            else:
                merged.token_ids += event.token_ids
                merged.finish_reason, merged.usage = event.finish_reason, event.usage
            if at_least is not None and merged.finished:
                raise AssertionError(f"request {uid} finished early: {merged}")
        if merged is not None and (
            merged.finished if at_least is None else len(merged.token_ids) >= at_least
        ):
            return merged if at_least is None else merged.token_ids
    raise AssertionError(f"request {uid} did not get there in time")


def test_status_and_stop_with_only_the_store_find_its_daemon(daemon_factory):
    """With no --socket, `status` and `stop` about a store reach the daemon running on it,
    wherever it listens (its state file says); they used to look at the default socket,
    report "not running" and leave it running."""
    d = daemon_factory(args=ARGS)
    d.start()
    env = {"AGENTKV_SOCKET": ""}  # no default that happens to be right
    d.env = {**d.env, **env}
    assert d.ctl("status", socket=False).returncode == 0
    stopped = d.ctl("stop", socket=False)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not d.alive()


def test_a_pool_larger_than_the_machine_is_refused_at_start():
    """--pool-blocks or --memory-budget past the machine's memory: a StartError naming
    both sizes, before any pool is built (its bookkeeping alone could exhaust memory)."""
    from agentkv.daemon.service.process import DaemonOptions, StartError, _check_pool_fits

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for opts in (
        DaemonOptions(pool_blocks=10**15),
        DaemonOptions(memory_budget=2 * memory),
    ):
        with pytest.raises(StartError, match="more than this machine"):
            _check_pool_fits(opts, bytes_per_block=4096)
    _check_pool_fits(DaemonOptions(pool_blocks=1024), bytes_per_block=4096)  # fits
