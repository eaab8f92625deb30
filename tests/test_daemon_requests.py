"""Requests through the Python client against one real daemon: streaming, chat messages,
forks, bad input, paged listings, a step answered too late, and many clients at once.

The load test's CI size is small and seeded; the full size (16 clients x 64 agents each x
5 turns) runs with

    AGENTKV_FULL=1 ./scripts/test tests/test_daemon_requests.py -k load

(`AGENTKV_LOAD=CLIENTS,AGENTS,TURNS` picks any other size).
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest
import zmq
from refs import FULL, eos_ids, random_tokens, scratch_tokens

from agentkv.client import (
    AgentExists,
    DaemonUnavailable,
    InvalidRequest,
    PoolExhausted,
    UnknownAgent,
    UnknownRequest,
    protocol,
)
from agentkv.daemon.engine.prompts import common_prefix_len, render_messages

VOCAB = 768
BLOCK = 16
LOAD = tuple(
    int(x) for x in os.environ.get("AGENTKV_LOAD", "16,64,5" if FULL else "4,8,2").split(",")
)
POOL_BLOCKS = 16384 if FULL else 256  # enough for every agent at once: no cache is dropped
LOAD_TOKENS = 16 if FULL else 6


@pytest.fixture(scope="module")
def daemon(daemon_factory):
    """One daemon for the module (tiny llama, block size 16)."""
    d = daemon_factory(args=("--block-size", str(BLOCK), "--pool-blocks", str(POOL_BLOCKS)))
    d.start()
    return d


@pytest.fixture
def client(daemon):
    with daemon.client() as c:
        yield c


def test_stream_deltas_make_generate_text(client):
    """stream() yields text deltas that join to exactly what generate() returns for the same
    context; its first turn of text is encoded with a BOS, as mlx-lm does."""
    prompt = "The quick brown fox jumps over the lazy dog."
    # Enough tokens that the turn outlasts one round trip on a loaded machine (24 tokens of
    # the tiny model took ~10 ms: all of them could be done before the first step came).
    deltas = list(client.stream("streamer", prompt, max_tokens=200, interval=0))
    whole = client.generate("generator", prompt, max_tokens=200)
    assert len(deltas) > 1
    assert "".join(deltas) == whole.text
    streamed = client.inspect("streamer")["token_ids"]
    assert streamed == client.inspect("generator")["token_ids"]
    assert streamed[0] == 1  # BOS


def test_a_step_interval_batches_tokens_and_never_holds_back_a_finish(client):
    """With a step interval longer than the whole turn, the daemon answers once with the
    first token, then once more when the turn finishes (not at the interval's end): the
    same tokens as a reply-per-token run, in two replies."""
    prompt = [5, 6, 7, 8, 9]
    uid = client.submit("interval-run", prompt, max_tokens=64)
    replies, tokens, finished_after = [], [], None
    start = time.monotonic()
    while finished_after is None:
        events = [e for e in client.step(timeout=30.0, interval=10.0) if e.uid == uid]
        replies.append(events)
        tokens += [t for e in events for t in e.token_ids]
        if any(e.finished for e in events):
            finished_after = time.monotonic() - start
    per_token = client.generate("interval-ref", prompt, max_tokens=64)
    assert tokens == per_token.token_ids
    assert len(replies) == 2 and len(replies[0][0].token_ids) >= 1
    assert finished_after < 10.0  # the finish was not held for the interval


def test_messages_turns_use_the_chat_template_and_reuse_the_common_prefix(client, loaded_models):
    """`messages=` is the whole chat, rendered with the model's template; the next turn
    reuses exactly the longest common token prefix with the agent's context (cached, not
    prefilled) and generates what mlx-lm does from scratch on the rendered chat."""
    model, tokenizer = loaded_models["llama"]
    eos = eos_ids(tokenizer)
    chat = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
    ]
    first = client.generate("chatter", messages=chat, max_tokens=6)
    rendered = render_messages(tokenizer, chat)
    assert first.usage["prompt_tokens"] == len(rendered) and first.usage["cached_tokens"] == 0
    context = client.inspect("chatter")["token_ids"]
    assert context[: len(rendered)] == rendered

    chat += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "More."}]
    second = client.generate("chatter", messages=chat, max_tokens=6)
    rendered = render_messages(tokenizer, chat)
    reused = common_prefix_len(context, rendered)
    assert len(rendered) // 2 < reused < len(rendered)  # the first turn's prompt, at least
    assert second.usage["prompt_tokens"] == len(rendered)
    assert second.usage["cached_tokens"] == reused
    assert second.token_ids == scratch_tokens(model, rendered, 6, eos=eos)
    assert 0 < second.usage["prefill_ms"] <= second.usage["ttft_ms"]


def test_tokens_given_as_text_are_refused(daemon):
    """`tokens` must be a list of ids: a string is not run as a text prompt."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.socket)
    try:
        for field, value in (("tokens", "hello"), ("tokens", 7), ("prompt", [5, 6])):
            header = {"id": 1, "agent_id": "typed", field: value, "max_tokens": 2}
            sock.send_multipart([protocol.MAGIC, b"submit", msgpack.packb(header)])
            assert sock.poll(10_000)
            reply = protocol.decode(sock.recv_multipart())
            assert reply.header["error"]["code"] == "invalid_request", (field, value)
    finally:
        sock.close(linger=0)


def test_agents_and_inspect_are_paged(daemon, client):
    """Listings and contexts come in pages that each fit a message; the client joins them.
    Inspect shows the blocks on disk and when the agent last finished a turn."""
    tic = time.time()
    for i in range(5):
        client.generate(f"paged{i}", list(range(3, 3 + 20 + i)), max_tokens=4)
    with daemon.client() as raw:
        first = raw._call(protocol.MessageType.AGENTS, {"limit": 2})
        assert len(first["agents"]) == 2 and first["next"] == first["agents"][-1]["agent_id"]
        rest = raw._call(protocol.MessageType.AGENTS, {"after": first["next"]})
        page = raw._call(
            protocol.MessageType.INSPECT,
            {"agent_id": "paged4", "token_offset": 5, "token_limit": 7},
        )
    listed = [r["agent_id"] for r in client.agents()]
    assert listed == sorted(listed) and {f"paged{i}" for i in range(5)} <= set(listed)
    assert [r["agent_id"] for r in first["agents"] + rest["agents"]] == listed
    whole = client.inspect("paged4")
    assert page["token_ids"] == whole["token_ids"][5:12] and page["token_offset"] == 5
    assert len(whole["token_ids"]) == whole["tokens"] == 24 + 4
    assert tic <= whole["last_used"] <= time.time()
    assert whole["disk_blocks"] == whole["tokens"] // BLOCK


def test_a_step_answered_after_the_client_gave_up_loses_nothing(daemon, loaded_models):
    """The daemon hands events over when it answers a step. If the client timed out first
    (here: the daemon frozen meanwhile), those events come out of its next step."""
    prompt = [3, 4, 5]
    with daemon.client(timeout=1.0) as c:
        uid = c.submit("late-step", prompt, max_tokens=3)
        while c.stats()["active"] or c.stats()["waiting"]:
            time.sleep(0.05)  # finished in the daemon; its events not collected yet
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            with pytest.raises(DaemonUnavailable):
                c.step(timeout=0.0)  # the daemon will answer it once thawed, too late
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        events = []
        deadline = time.monotonic() + 30.0
        while not (events and events[-1].finished):
            assert time.monotonic() < deadline, f"events lost: {events}"
            events += c.step(timeout=0.5)
        context = c.inspect("late-step")["token_ids"]
    assert [e.uid for e in events] == [uid] * len(events)
    merged = events[0]
    merged.token_ids = [t for e in events for t in e.token_ids]
    merged.finish_reason = events[-1].finish_reason
    eos = eos_ids(loaded_models["llama"][1])
    assert daemon.holds_turns(context, [(prompt, merged)], eos)  # every token reported


def test_fork_shares_blocks_and_both_branches_continue_exactly(client, loaded_models):
    """A fork holds the same blocks (no copy, pool use unchanged); each branch's next turn is
    mlx-lm's from scratch on the shared context plus its own prompt."""
    model, tokenizer = loaded_models["llama"]
    eos = eos_ids(tokenizer)
    client.generate("trunk", random_tokens(np.random.default_rng(2), 40, VOCAB), max_tokens=8)
    trunk = client.inspect("trunk")
    in_use = client.stats()["pool"]["in_use"]

    branch = client.fork("trunk", "branch")
    assert branch["tokens"] == trunk["tokens"] and branch["blocks"] == trunk["blocks"] >= 3
    assert branch["shared_blocks"] == branch["blocks"]
    assert client.inspect("trunk")["shared_blocks"] == trunk["blocks"]
    assert client.stats()["pool"]["in_use"] == in_use  # shared, not copied
    assert client.inspect("branch")["token_ids"] == trunk["token_ids"]

    prompts = {"trunk": [5, 6, 7], "branch": [8, 9]}
    for agent, prompt in prompts.items():
        r = client.generate(agent, prompt, max_tokens=10)
        assert r.token_ids == scratch_tokens(model, trunk["token_ids"] + prompt, 10, eos=eos)
        assert r.usage["cached_tokens"] == trunk["tokens"]  # nothing recomputed
    assert client.inspect("trunk")["shared_blocks"] >= 2  # the common full blocks stay shared


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda c: c.generate("bad-in", "", max_tokens=4), InvalidRequest),
        (lambda c: c.generate("bad-in", [], max_tokens=4), InvalidRequest),
        (lambda c: c.generate("bad-in", "hi", max_tokens=0), InvalidRequest),
        (lambda c: c.generate("bad-in", "hi", max_tokens=-3), InvalidRequest),
        (lambda c: c.generate("bad-in", [VOCAB + 5], max_tokens=4), InvalidRequest),
        (lambda c: c.generate("bad-in", "hi", max_tokens=4, temperature=-1.0), InvalidRequest),
        (lambda c: c.generate("bad-in", "hi", max_tokens=4, top_p=0.0), InvalidRequest),
        (lambda c: c.inspect("nobody-here"), UnknownAgent),
        (lambda c: c.delete("nobody-here"), UnknownAgent),
        (lambda c: c.fork("nobody-here", "somebody"), UnknownAgent),
        (lambda c: c.generate("", "hi", max_tokens=4), InvalidRequest),
        (lambda c: c.generate("-dash-first", "hi", max_tokens=4), InvalidRequest),
        (lambda c: c.generate("has space", "hi", max_tokens=4), InvalidRequest),
        (lambda c: c.generate("a/b", "hi", max_tokens=4), InvalidRequest),
        (lambda c: c.generate("line\n", "hi", max_tokens=4), InvalidRequest),
        (lambda c: c.generate("x" * 129, "hi", max_tokens=4), InvalidRequest),
        (lambda c: c.inspect("../etc"), InvalidRequest),
        (lambda c: c.generate("bad-in", [9] * (POOL_BLOCKS * BLOCK), max_tokens=4), PoolExhausted),
        (lambda c: c.generate("bad-in", "hi", max_tokens=POOL_BLOCKS * BLOCK), PoolExhausted),
        (lambda c: c.cancel(10**9), UnknownRequest),
        (lambda c: c.step(interval=-1.0), InvalidRequest),
        (lambda c: c.step(interval=60.0), InvalidRequest),
        (lambda c: c.step(timeout=-1.0), InvalidRequest),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_bad_input_is_a_typed_error(client, call, error):
    """Each bad request fails alone with the right exception; nothing is left behind."""
    with pytest.raises(error):
        call(client)
    assert "bad-in" not in {a["agent_id"] for a in client.agents()}
    stats = client.stats()
    assert stats["active"] == 0 and stats["waiting"] == 0


def test_fork_onto_an_existing_agent_is_refused(client):
    client.generate("fork-src", [3, 4, 5], max_tokens=2)
    client.generate("fork-dst", [6, 7], max_tokens=2)
    before = client.inspect("fork-dst")["token_ids"]
    with pytest.raises(AgentExists):
        client.fork("fork-src", "fork-dst")
    assert client.inspect("fork-dst")["token_ids"] == before


def test_deleted_agents_are_gone_at_once(client):
    """A deleted agent is not listed, not inspectable, and its id starts afresh, even while
    the store still has its delete queued."""
    for i in range(5):
        agent = f"doomed{i}"
        client.generate(agent, [4, 5, 6], max_tokens=3)
        while client.stats()["store"]["pending"]:  # the agent is in the store's index
            time.sleep(0.01)
        client.delete(agent)
        assert agent not in {a["agent_id"] for a in client.agents()}
        with pytest.raises(UnknownAgent):
            client.inspect(agent)
        r = client.generate(agent, [7, 8], max_tokens=2)
        assert r.usage["prompt_tokens"] == 2 and client.inspect(agent)["token_ids"][:2] == [7, 8]
        client.delete(agent)


def test_cancel_mid_turn_leaves_the_context(client):
    """A cancelled turn finishes with "cancelled" and leaves the agent as it was."""
    client.generate("canceller", [3, 4, 5, 6], max_tokens=4)
    before = client.inspect("canceller")["token_ids"]
    uid = client.submit("canceller", [7, 8], max_tokens=500)
    assert client.cancel(uid) is True
    events = []
    while not (events and events[-1].finished):
        events += [e for e in client.step(timeout=1.0) if e.uid == uid]
    assert events[-1].finish_reason == "cancelled"
    assert client.inspect("canceller")["token_ids"] == before
    with pytest.raises(UnknownRequest):
        client.cancel(uid)  # finished: not this client's running request any more


def test_load_no_lost_duplicated_or_crossed_completions(daemon, client, loaded_models):
    """Many clients, each with its own agents, all turns in flight at once: every submitted
    turn completes exactly once, to the client and agent that submitted it; each agent's
    context is its turns one after the other; the pool is back to its baseline at the end."""
    n_clients, n_agents, n_turns = LOAD
    eos = eos_ids(loaded_models["llama"][1])
    base = client.stats()

    def drive(k: int) -> dict[str, list]:
        rng = np.random.default_rng(1000 + k)
        agents = [f"load{k}-{j}" for j in range(n_agents)]
        history: dict[str, list] = {a: [] for a in agents}
        with daemon.client() as c:
            for _ in range(n_turns):
                prompts = {a: random_tokens(rng, int(rng.integers(1, 12)), VOCAB) for a in agents}
                done = daemon.turns(c, prompts, max_tokens=LOAD_TOKENS)  # checks uid and agent
                assert set(done) == set(agents)
                for a in agents:
                    assert done[a].finish_reason in ("length", "stop"), done[a]
                    history[a].append((prompts[a], done[a]))
            for a in agents:
                assert daemon.holds_turns(c.inspect(a)["token_ids"], history[a], eos), a
        return history

    with ThreadPoolExecutor(n_clients) as pool:
        histories = list(pool.map(drive, range(n_clients)))  # re-raises a client's failure

    uids = [e.uid for h in histories for turns in h.values() for _, e in turns]
    assert len(uids) == len(set(uids)) == n_clients * n_agents * n_turns
    after = client.stats()
    assert after["completed"] - base["completed"] == len(uids)
    assert after["errors"] == base["errors"] and after["dropped_caches"] == base["dropped_caches"]
    for h in histories:
        for agent in h:
            client.delete(agent)
    pool = client.stats()["pool"]
    assert (pool["in_use"], pool["free"], pool["reserved"]) == (
        base["pool"]["in_use"],
        base["pool"]["free"],
        base["pool"]["reserved"],
    )


def test_cancel_of_a_turn_that_finished_first_is_false(client):
    """The race cancel() documents: the turn finished (its final event not collected
    yet), so cancel answers False instead of an error."""
    uid = client.submit("racer", [3, 4, 5], max_tokens=1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the daemon has finished it
        info = client.inspect("racer")
        if info["tokens"] >= 4 and not info.get("busy"):
            break
        time.sleep(0.05)
    assert client.cancel(uid) is False
    events = []
    while not (events and events[-1].finished):
        events += [e for e in client.step(timeout=1.0) if e.uid == uid]
    assert events[-1].finish_reason == "length"


def test_a_stop_string_is_one_string_not_its_characters(client):
    """A stop string absent from the output changes nothing, even when its characters
    occur (it used to be sent as its characters, each a stop string). An empty stop
    string is refused."""
    prompt = random_tokens(np.random.default_rng(11), 12, VOCAB)
    plain = client.generate("stopper-a", prompt, max_tokens=24)
    char = next(ch for ch in plain.text[1:] if ch.strip())
    stop = char + "\u2603\u2603"
    assert stop not in plain.text
    stopped = client.generate("stopper-b", prompt, max_tokens=24, stop=stop)
    assert (stopped.text, stopped.token_ids) == (plain.text, plain.token_ids)
    with pytest.raises(InvalidRequest):
        client.generate("stopper-c", prompt, max_tokens=4, stop="")


def test_client_side_bad_values_are_typed_and_numpy_ints_travel(client):
    with pytest.raises(InvalidRequest):
        client.generate("odd", "bad \ud800 text", max_tokens=2)  # a lone surrogate
    with pytest.raises(InvalidRequest):
        client.generate("odd", [1, 2], max_tokens=2**70)
    for timeout in (float("inf"), float("nan"), -1.0):
        with pytest.raises(InvalidRequest):
            client.step(timeout=timeout)
    r = client.generate("odd", list(np.array([5, 6, 7])), max_tokens=2, seed=np.int64(3))
    assert r.usage["prompt_tokens"] == 3
