"""Turns that start together with one long prefix prefill it once (engine/prefix_sharing.py):
the followers wait while the leader prefills, reuse its prompt blocks from its first token on
(long before it finishes), and every turn's tokens stay exactly those of a run alone."""

from __future__ import annotations

import numpy as np
import pytest
from refs import eos_ids, make_engine, random_tokens, run_all, scratch_tokens

from agentkv.daemon.engine.turns import RequestStatus

VOCAB = 768
BLOCK = 16


@pytest.fixture(scope="module")
def llama(loaded_models):
    return loaded_models["llama"]


def _prompts(seed: int, agents: int, system: int = 200, own: int = 11) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    shared = random_tokens(rng, system, VOCAB)
    return [shared + random_tokens(rng, own, VOCAB) for _ in range(agents)]


def _status(engine, uid: int) -> RequestStatus | None:
    return engine._scheduler.status(uid)


def test_agents_started_together_prefill_the_shared_prefix_once(llama):
    model, tokenizer = llama
    prompts = _prompts(3, agents=4)
    engine = make_engine(model, tokenizer, block_size=BLOCK, prefill_step_size=64)
    uids = [engine.submit(f"a{i}", p, max_tokens=12) for i, p in enumerate(prompts)]
    done = run_all(engine)
    shared_blocks = 200 // BLOCK
    cached = [done[u].usage.cached_tokens for u in uids]
    assert cached[0] == 0  # the leader computed it
    assert cached[1:] == [shared_blocks * BLOCK] * 3  # the others took its blocks
    eos = eos_ids(tokenizer)
    for uid, prompt in zip(uids, prompts, strict=True):
        assert done[uid].token_ids == scratch_tokens(model, prompt, 12, eos=eos)
    infos = [engine.agent_info(f"a{i}") for i in range(4)]
    assert all(info.shared_blocks == shared_blocks for info in infos)
    stats = engine.pool.stats()
    assert stats.reserved == 0
    assert stats.in_use == sum(i.blocks for i in infos) - 3 * shared_blocks
    engine.pool.check_invariants()


def test_the_follower_starts_at_the_leaders_first_token_not_its_end(llama):
    model, tokenizer = llama
    leader_prompt, follower_prompt = _prompts(4, agents=2)
    engine = make_engine(model, tokenizer, block_size=BLOCK, prefill_step_size=64)
    leader = engine.submit("leader", leader_prompt, max_tokens=60)
    follower = engine.submit("follower", follower_prompt, max_tokens=5)
    events = engine.step_once()
    assert _status(engine, leader) is RequestStatus.RUNNING
    assert _status(engine, follower) is RequestStatus.WAITING  # deferred behind the leader
    while not any(e.uid == leader and e.token is not None for e in events):
        assert _status(engine, follower) is RequestStatus.WAITING
        events = engine.step_once()
    finished = {}  # in the order they finished
    while engine.has_work:
        for e in engine.step_once():
            if e.completion is not None:
                finished[e.uid] = e.completion
    assert list(finished) == [follower, leader]  # it shared while the leader still decoded
    assert finished[follower].usage.cached_tokens == 192
    eos = eos_ids(tokenizer)
    assert finished[leader].token_ids == scratch_tokens(model, leader_prompt, 60, eos=eos)
    assert finished[follower].token_ids == scratch_tokens(model, follower_prompt, 5, eos=eos)
    assert engine.agent_info("leader").shared_blocks == 12
    assert engine.pool.stats().reserved == 0
    engine.pool.check_invariants()


def test_a_cancelled_leader_leaves_the_follower_to_prefill_alone(llama):
    model, tokenizer = llama
    leader_prompt, follower_prompt = _prompts(5, agents=2)
    engine = make_engine(model, tokenizer, block_size=BLOCK, prefill_step_size=64)
    baseline = engine.pool.stats()
    leader = engine.submit("leader", leader_prompt, max_tokens=30)
    follower = engine.submit("follower", follower_prompt, max_tokens=8)
    engine.step_once()
    assert _status(engine, follower) is RequestStatus.WAITING
    assert engine.cancel(leader)
    done = run_all(engine)
    assert done[leader].finish_reason == "cancelled"
    assert done[follower].usage.cached_tokens == 0
    eos = eos_ids(tokenizer)
    assert done[follower].token_ids == scratch_tokens(model, follower_prompt, 8, eos=eos)
    assert engine.agent_tokens("leader") == []
    stats = engine.pool.stats()
    assert stats.reserved == 0
    assert stats.in_use == engine.agent_info("follower").blocks
    assert stats.free + stats.in_use == baseline.free + baseline.in_use
    engine.pool.check_invariants()


def test_a_leader_cancelled_after_sharing_gives_back_only_its_own_hold(llama):
    model, tokenizer = llama
    leader_prompt, follower_prompt = _prompts(6, agents=2)
    engine = make_engine(model, tokenizer, block_size=BLOCK, prefill_step_size=64)
    leader = engine.submit("leader", leader_prompt, max_tokens=80)
    follower = engine.submit("follower", follower_prompt, max_tokens=4)
    while _status(engine, follower) is RequestStatus.WAITING:
        engine.step_once()
    assert engine.cancel(leader)
    done = run_all(engine)
    assert done[leader].finish_reason == "cancelled"
    assert done[follower].usage.cached_tokens == 192
    eos = eos_ids(tokenizer)
    assert done[follower].token_ids == scratch_tokens(model, follower_prompt, 4, eos=eos)
    assert engine.agent_info("follower").shared_blocks == 0  # the leader kept nothing
    assert engine.pool.stats().in_use == engine.agent_info("follower").blocks
    assert engine.pool.stats().reserved == 0
    engine.pool.check_invariants()


def test_turns_with_different_prompts_are_not_held_back(llama):
    model, tokenizer = llama
    (a,) = _prompts(7, agents=1)
    (b,) = _prompts(8, agents=1)
    engine = make_engine(model, tokenizer, block_size=BLOCK, prefill_step_size=64)
    ua = engine.submit("a", a, max_tokens=4)
    ub = engine.submit("b", b, max_tokens=4)
    engine.step_once()
    assert _status(engine, ua) is _status(engine, ub) is RequestStatus.RUNNING
    done = run_all(engine)
    assert done[ua].usage.cached_tokens == done[ub].usage.cached_tokens == 0
