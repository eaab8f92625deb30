"""The scheduler's explicit turn states and its "not now" admission, seen through the
engine facade on the tiny llama (statuses read from the scheduler itself)."""

from __future__ import annotations

import numpy as np
import pytest
from refs import make_engine, random_tokens, run_all

from agentkv.daemon.engine.turns import RequestStatus
from agentkv.daemon.errors import CacheReconstructionError

VOCAB = 768


@pytest.fixture(scope="module")
def llama(loaded_models):
    return loaded_models["llama"]


def test_a_turn_goes_waiting_running_finished(llama):
    model, tokenizer = llama
    engine = make_engine(model, tokenizer)
    status = engine._scheduler.status
    first = engine.submit("a", [5, 6, 7], max_tokens=30)
    second = engine.submit("a", [8], max_tokens=3)
    assert status(first) is status(second) is RequestStatus.WAITING
    engine.step_once()
    assert status(first) is RequestStatus.RUNNING  # its agent's later turn waits behind it
    assert status(second) is RequestStatus.WAITING
    assert engine.cancel(second) and status(second) is None  # finished: forgotten
    done = run_all(engine)
    assert done[second].finish_reason == "cancelled" and done[first].finish_reason != "error"
    assert status(first) is None and not engine.has_work


def test_large_text_is_encoding_until_its_tokens_are_collected(llama):
    model, tokenizer = llama
    engine = make_engine(model, tokenizer, total_blocks=256)
    engine._encoder.inline_bytes = 64
    uid = engine.submit("big", "the cat sat on a mat, " * 12, max_tokens=2)
    assert engine._scheduler.status(uid) is RequestStatus.ENCODING and engine.is_encoding(uid)
    assert engine.cancel(uid) and not engine.is_encoding(uid)
    (done,) = run_all(engine).values()
    assert done.finish_reason == "cancelled"


def test_a_turn_short_of_room_waits_without_failing_and_keeps_fifo(llama):
    """A pool that holds one turn at a time: the next turn's admission says "not now"
    (no error), it stays WAITING, later turns stay behind it, and each runs in order."""
    model, tokenizer = llama
    engine = make_engine(model, tokenizer, block_size=16, total_blocks=6)
    rng = np.random.default_rng(1)
    uids = [engine.submit(a, random_tokens(rng, 40, VOCAB), max_tokens=30) for a in "xyz"]
    engine.step_once()
    statuses = [engine._scheduler.status(u) for u in uids]
    assert statuses == [RequestStatus.RUNNING, RequestStatus.WAITING, RequestStatus.WAITING]
    order = [c.uid for c in engine.step()]
    assert order == uids
    assert engine.counters["errors"] == 0 and engine.pool.stats().reserved == 0
    engine.pool.check_invariants()


def test_a_commit_that_fails_gives_its_reservation_back(llama, monkeypatch):
    model, tokenizer = llama
    engine = make_engine(model, tokenizer)
    engine.submit("a", [5, 6, 7], max_tokens=3)
    run_all(engine)
    before = engine.agent_tokens("a")

    def broken(tokens, caches):
        raise CacheReconstructionError("cache holds other tokens")

    monkeypatch.setattr(engine._manager, "check_offsets", broken)
    uid = engine.submit("a", [8, 9], max_tokens=4)
    done = run_all(engine)[uid]
    assert done.finish_reason == "error" and done.error_code == "cache_reconstruction"
    assert engine.agent_tokens("a") == before  # the context is as before the turn
    assert engine.pool.stats().reserved == 0  # nothing kept for a turn that is gone
    engine.pool.check_invariants()
    monkeypatch.undo()
    engine.submit("a", [8, 9], max_tokens=4)
    (again,) = run_all(engine).values()
    assert again.finish_reason == "length" and again.usage.cached_tokens == len(before)
