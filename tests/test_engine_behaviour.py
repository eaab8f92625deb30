"""Engine behaviour on the tiny llama: sharing, scheduling, pool accounting, cancel, errors."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
from refs import eos_ids, make_engine, random_tokens, run_all, scratch_generate, scratch_tokens

from agentkv.daemon import (
    CacheReconstructionError,
    EngineClosedError,
    InvalidRequestError,
    PoolExhaustedError,
    UnknownAgentError,
)

VOCAB = 768


@pytest.fixture(scope="module")
def llama(loaded_models):
    return loaded_models["llama"]


def _baseline(pool) -> tuple[int, int, int]:
    s = pool.stats()
    return s.in_use, s.reserved, s.free


def test_three_agents_of_very_different_lengths(llama):
    model, tokenizer = llama
    rng = np.random.default_rng(0)
    prompts = {
        "tiny": [5],
        "mid": random_tokens(rng, 180, VOCAB),
        "big": random_tokens(rng, 700, VOCAB),
    }
    engine = make_engine(model, tokenizer, block_size=64, total_blocks=64)
    uids = {a: engine.submit(a, p, max_tokens=30) for a, p in prompts.items()}
    done = run_all(engine)
    for agent, prompt in prompts.items():
        assert done[uids[agent]].token_ids == scratch_tokens(
            model, prompt, 30, eos=eos_ids(tokenizer)
        )


def test_prefix_sharing_across_agents(llama):
    """A second agent with the same 512-token system prompt reuses its blocks."""
    model, tokenizer = llama
    rng = np.random.default_rng(1)
    system = random_tokens(rng, 512, VOCAB)
    engine = make_engine(model, tokenizer, block_size=256, total_blocks=32)
    engine.submit("first", system + random_tokens(rng, 9, VOCAB), max_tokens=20)
    run_all(engine)
    second = system + random_tokens(rng, 13, VOCAB)
    engine.submit("second", second, max_tokens=20)
    (c,) = run_all(engine).values()
    assert c.usage.cached_tokens >= 512
    assert c.token_ids == scratch_tokens(model, second, 20, eos=eos_ids(tokenizer))
    info1, info2 = engine.agent_info("first"), engine.agent_info("second")
    assert info1.shared_blocks == info2.shared_blocks == 2  # stored once, referenced twice
    assert engine.pool.stats().in_use == info1.blocks + info2.blocks - 2
    engine.delete_agent("first")
    assert engine.agent_info("second").shared_blocks == 0
    engine.submit("second", [7, 8, 9], max_tokens=10)
    (c2,) = run_all(engine).values()
    assert c2.usage.cached_tokens == len(second) + 20


def test_pool_stable_after_generations_cancels_and_errors(llama):
    model, tokenizer = llama
    rng = np.random.default_rng(2)
    engine = make_engine(model, tokenizer, block_size=16, total_blocks=256)
    pool = engine.pool
    empty = _baseline(pool)
    for round_ in range(12):
        uids = [
            engine.submit(f"a{i}", random_tokens(rng, 20 + 7 * i, VOCAB), max_tokens=12)
            for i in range(3)
        ]
        if round_ % 3 == 1:
            engine.step_once()
            engine.step_once()
            assert engine.cancel(uids[0])
        if round_ % 4 == 2:
            engine.submit("bad", [1, 2, 3], max_tokens=8, logits_processors=[_fails_at(2)])
        run_all(engine)
        pool.check_invariants()
    held = sum(engine.agent_info(a).blocks for a in engine.agent_ids())
    assert pool.stats().in_use == held and pool.stats().reserved == 0
    for agent in engine.agent_ids():
        engine.delete_agent(agent)
    assert _baseline(pool)[:2] == empty[:2]
    pool.check_invariants()


def test_request_larger_than_pool_is_refused(llama):
    model, tokenizer = llama
    engine = make_engine(model, tokenizer, block_size=16, total_blocks=4)
    with pytest.raises(PoolExhaustedError) as err:
        engine.submit("a", list(range(10, 70)), max_tokens=10)
    assert err.value.need == 5 and "need 5" in str(err.value) and "free" in str(err.value)
    assert engine.agent_ids() == []  # nothing half-registered


def test_tight_pool_queues_then_drops_idle_caches(llama):
    """Turns wait for room; idle agents' caches are dropped (LRU) and recomputed exactly."""
    model, tokenizer = llama
    rng = np.random.default_rng(3)
    engine = make_engine(model, tokenizer, block_size=16, total_blocks=8)
    prompts = {a: random_tokens(rng, 60, VOCAB) for a in ("x", "y", "z")}
    uids = {a: engine.submit(a, p, max_tokens=20) for a, p in prompts.items()}
    done = run_all(engine)
    eos = eos_ids(tokenizer)
    for a, p in prompts.items():
        assert done[uids[a]].token_ids == scratch_tokens(model, p, 20, eos=eos)
    assert engine.counters["dropped_caches"] >= 1
    dropped = [a for a in prompts if engine.agent_info(a).cached_tokens == 0]
    assert dropped
    agent = dropped[0]
    context = engine.agent_tokens(agent)
    engine.submit(agent, [11, 12], max_tokens=10)
    (c,) = run_all(engine).values()
    assert c.usage.recomputed_tokens == len(context)
    assert c.token_ids == scratch_tokens(model, context + [11, 12], 10, eos=eos)
    engine.pool.check_invariants()


def test_per_agent_fifo(llama):
    model, tokenizer = llama
    engine = make_engine(model, tokenizer)
    turns = [[20, 21, 22], [30, 31], [40]]
    uids = [engine.submit("fifo", t, max_tokens=8) for t in turns]
    engine.submit("other", [50, 51], max_tokens=8)
    order, done = [], {}
    while engine.has_work:
        for ev in engine.step_once():
            if ev.completion is not None and ev.agent_id == "fifo":
                order.append(ev.uid)
                done[ev.uid] = ev.completion
    assert order == uids
    context, eos = [], eos_ids(tokenizer)
    for uid, turn in zip(uids, turns, strict=True):
        context += turn
        assert done[uid].token_ids == scratch_tokens(model, context, 8, eos=eos)
        context += done[uid].token_ids + ([] if done[uid].finish_reason == "length" else [2])
    assert engine.agent_tokens("fifo")[: len(context)] == context


def test_seed_is_independent_of_batch(llama):
    model, tokenizer = llama
    kw = {"max_tokens": 24, "temperature": 1.0, "seed": 77}
    alone = make_engine(model, tokenizer)
    alone.submit("s", [9, 8, 7, 6], **kw)
    (ref,) = run_all(alone).values()
    crowded = make_engine(model, tokenizer)
    for i in range(5):
        crowded.submit(f"n{i}", [100 + i] * (3 + i), max_tokens=30, temperature=1.0, seed=i)
    uid = crowded.submit("s", [9, 8, 7, 6], **kw)
    assert run_all(crowded)[uid].token_ids == ref.token_ids


def test_failure_mid_batch_is_isolated(llama):
    model, tokenizer = llama
    rng = np.random.default_rng(4)
    engine = make_engine(model, tokenizer)
    prompts = {a: random_tokens(rng, 25, VOCAB) for a in ("ok1", "bad", "ok2")}
    engine.submit("bad", [3, 4, 5], max_tokens=4)
    run_all(engine)
    before = engine.agent_tokens("bad")
    uids = {
        a: engine.submit(
            a, p, max_tokens=16, logits_processors=[_fails_at(5)] if a == "bad" else None
        )
        for a, p in prompts.items()
    }
    done = run_all(engine)
    assert done[uids["bad"]].finish_reason == "error"
    assert "boom" in done[uids["bad"]].error
    eos = eos_ids(tokenizer)
    for a in ("ok1", "ok2"):
        assert done[uids[a]].token_ids == scratch_tokens(model, prompts[a], 16, eos=eos)
    assert engine.agent_tokens("bad") == before  # the failed turn left no trace
    engine.submit("bad", [6, 7], max_tokens=5)
    (c,) = run_all(engine).values()
    assert c.usage.cached_tokens == len(before)
    assert c.token_ids == scratch_tokens(model, before + [6, 7], 5, eos=eos)
    engine.pool.check_invariants()


def test_cancel_waiting_and_running(llama):
    model, tokenizer = llama
    engine = make_engine(model, tokenizer)
    engine.submit("c", [10, 11, 12], max_tokens=5)
    run_all(engine)
    before = engine.agent_tokens("c")
    running = engine.submit("c", [13, 14], max_tokens=50)
    waiting = engine.submit("c", [15], max_tokens=5)
    for _ in range(4):
        engine.step_once()
    assert engine.cancel(running) and engine.cancel(waiting)
    assert not engine.cancel(running)
    done = run_all(engine)
    assert done[running].finish_reason == "cancelled" and 0 < len(done[running].token_ids) < 50
    assert done[waiting].finish_reason == "cancelled" and done[waiting].token_ids == []
    assert engine.agent_tokens("c") == before
    assert engine.pool.stats().reserved == 0
    engine.pool.check_invariants()


def test_conversation_form_reuses_common_prefix(llama):
    model, tokenizer = llama
    rng = np.random.default_rng(6)
    engine = make_engine(model, tokenizer, block_size=16)
    engine.submit("conv", random_tokens(rng, 70, VOCAB), max_tokens=10)
    run_all(engine)
    context = engine.agent_tokens("conv")
    edited = context[:50] + random_tokens(rng, 12, VOCAB)  # rewrite history after token 50
    engine.submit("conv", conversation=edited, max_tokens=15)
    (c,) = run_all(engine).values()
    assert c.usage.cached_tokens == 50
    assert c.token_ids == scratch_tokens(model, edited, 15, eos=eos_ids(tokenizer))
    assert engine.agent_tokens("conv")[: len(edited)] == edited
    engine.pool.check_invariants()


def test_messages_form(llama):
    model, tokenizer = llama
    engine = make_engine(model, tokenizer)
    chat = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
    ]
    engine.submit("chat", messages=chat, max_tokens=12)
    (c1,) = run_all(engine).values()
    chat += [{"role": "assistant", "content": c1.text}, {"role": "user", "content": "And then?"}]
    engine.submit("chat", messages=chat, max_tokens=12)
    (c2,) = run_all(engine).values()
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert c2.usage.cached_tokens > 0
    assert c2.usage.prompt_tokens == len(ids)
    assert c2.token_ids == scratch_generate(model, tokenizer, ids, 12)[0]


def test_eos_stops_and_stays_in_context(llama):
    model, tokenizer = llama
    engine = make_engine(model, tokenizer)
    eos = tokenizer.eos_token_id
    engine.submit("e", [40, 41, 42], max_tokens=20, logits_processors=[_forces_at(3, eos)])
    (c,) = run_all(engine).values()
    assert c.finish_reason == "stop"
    assert len(c.token_ids) == 3 and eos not in c.token_ids
    assert c.usage.generated_tokens == 4
    assert engine.agent_tokens("e")[-1] == eos
    context = engine.agent_tokens("e")
    engine.submit("e", [43], max_tokens=6)
    (c2,) = run_all(engine).values()
    assert c2.token_ids == scratch_tokens(model, context + [43], 6, eos=eos_ids(tokenizer))


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("a", ""), {}),
        (("a", []), {}),
        (("a", "hi"), {"max_tokens": 0}),
        (("a", "hi"), {"max_tokens": -3}),
        (("a", "hi"), {"max_tokens": 2.5}),
        (("a", "hi"), {"max_tokens": True}),
        (("a", "hi"), {"temperature": -0.1}),
        (("a", "hi"), {"temperature": float("nan")}),
        (("a", "hi"), {"top_p": 0.0}),
        (("a", "hi"), {"top_p": 1.5}),
        (("a", "hi"), {"top_k": -1}),
        (("a", "hi"), {"min_p": 1.0}),
        (("a", "hi"), {"seed": -1}),
        (("a", "hi"), {"seed": "7"}),
        (("", "hi"), {}),
        (("a b", "hi"), {}),
        (("../etc", "hi"), {}),
        (("victim\n", "hi"), {}),  # a trailing newline is not part of a valid id
        (("x" * 200, "hi"), {}),
        ((None, "hi"), {}),
        (("a", [1, 2, 10**9]), {}),
        (("a", [1, -2]), {}),
        (("a", "hi"), {"messages": [{"role": "user", "content": "x"}]}),
        (("a",), {}),
        (("a",), {"messages": [{"role": "user"}]}),
        (("a",), {"messages": []}),
        (("a", "hi"), {"logits_processors": [42]}),
        (("a", 3.5), {}),
    ],
)
def test_invalid_requests_are_typed(llama, args, kwargs):
    model, tokenizer = llama
    engine = make_engine(model, tokenizer, total_blocks=64)
    with pytest.raises(InvalidRequestError):
        engine.submit(*args, **kwargs)
    assert engine.agent_ids() == [] and not engine.has_work


def test_unknown_agent_and_missing_cache(llama):
    model, tokenizer = llama
    engine = make_engine(model, tokenizer)
    with pytest.raises(UnknownAgentError):
        engine.agent_info("nobody")
    with pytest.raises(UnknownAgentError):
        engine.delete_agent("nobody")
    engine.submit("a", [5, 6], max_tokens=3)
    run_all(engine)
    engine._manager.drop(engine._agents["a"])  # as the pool would under pressure
    with pytest.raises(CacheReconstructionError):
        engine.agent_cache("a")


def test_closed_engine_and_foreign_thread(llama):
    model, tokenizer = llama
    engine = make_engine(model, tokenizer)
    engine.submit("a", [5, 6], max_tokens=3)
    errors = []
    t = threading.Thread(target=lambda: _capture(errors, engine.step_once))
    t.start()
    t.join()
    assert isinstance(errors[0], RuntimeError)
    run_all(engine)
    engine.close()
    assert engine.pool.stats().in_use == 0
    with pytest.raises(EngineClosedError):
        engine.submit("a", [1], max_tokens=1)


def _capture(errors, fn):
    try:
        fn()
    except Exception as exc:
        errors.append(exc)


def _fails_at(step: int):
    calls = {"n": 0}

    def processor(tokens, logits):
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError("boom")
        return logits

    return processor


def _forces_at(step: int, token: int):
    calls = {"n": 0}

    def processor(tokens, logits):
        calls["n"] += 1
        if calls["n"] == step + 1:
            bias = mx.full(logits.shape, -1e9)
            bias[..., token] = 0.0
            return logits + bias
        return logits

    return processor


def test_stop_strings_end_the_turn_and_keep_the_context_exact(llama):
    model, tokenizer = llama
    prompt = [21, 22, 23, 24, 25]
    free = make_engine(model, tokenizer)
    free.submit("a", prompt, max_tokens=40)
    (full,) = run_all(free).values()
    text = full.text
    stop = text[12:15]
    assert stop and text.index(stop) >= 1
    engine = make_engine(model, tokenizer)
    uid = engine.submit("a", prompt, max_tokens=40, stop=[stop, "\x00never"])
    shown = []
    while engine.has_work:
        for ev in engine.step_once():
            shown.append(ev.text)
            if ev.completion is not None:
                c = ev.completion
    assert c.uid == uid and c.finish_reason == "stop"
    assert c.text == "".join(shown) == text[: text.index(stop)]
    assert c.token_ids == full.token_ids[: len(c.token_ids)] and len(c.token_ids) < 40
    context = engine.agent_tokens("a")
    assert context == prompt + c.token_ids
    engine.submit("a", [30, 31], max_tokens=8)
    (c2,) = run_all(engine).values()
    assert c2.usage.cached_tokens == len(context)
    assert c2.token_ids == scratch_tokens(model, context + [30, 31], 8, eos=eos_ids(tokenizer))
    with pytest.raises(InvalidRequestError):
        engine.submit("a", [1], max_tokens=2, stop=[""])


def test_top_k_at_or_past_the_vocabulary_keeps_every_token(llama):
    """top_k >= vocab means no filtering (mlx-lm's apply_top_k refuses it): the turn runs
    and samples exactly as with top_k=0 under the same seed."""
    model, tokenizer = llama
    engine = make_engine(model, tokenizer, total_blocks=64)
    vocab = engine.spec.vocab_size
    outs = {}
    for k in (0, vocab, vocab * 10):
        uid = engine.submit(f"k{k}", [5, 6, 7], max_tokens=8, temperature=1.0, top_k=k, seed=4)
        outs[k] = run_all(engine)[uid]
    assert all(c.finish_reason != "error" for c in outs.values())
    assert outs[vocab].token_ids == outs[0].token_ids == outs[vocab * 10].token_ids


def test_a_text_turn_queued_behind_a_cancelled_first_turn_gets_its_bos(llama):
    """Turn 2 was encoded as a continuation (turn 1 queued); turn 1 is cancelled, so turn 2
    is the agent's first after all: encoded as mlx-lm encodes a prompt, BOS included."""
    model, tokenizer = llama
    engine = make_engine(model, tokenizer, total_blocks=64)
    first = engine.submit("c", "Hello there", max_tokens=5)
    second = engine.submit("c", " world", max_tokens=5)
    engine.cancel(first)
    done = run_all(engine)
    want, _ = scratch_generate(model, tokenizer, " world", 5)
    assert done[second].token_ids == want
    assert engine.agent_tokens("c")[: len(tokenizer.encode(" world"))] == tokenizer.encode(" world")


def test_a_chat_template_that_refuses_the_messages_is_an_invalid_request(model_dirs, tmp_path):
    """Templates raise on messages they do not accept (roles must alternate, ...): that
    is the request's fault, a typed InvalidRequestError, not an internal error."""
    import json
    import shutil

    from agentkv.daemon.engine.model_factory import load_model

    copy = tmp_path / "strict"
    shutil.copytree(model_dirs["llama"], copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('the first message must be from the user') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    model, tokenizer = load_model(copy)
    engine = make_engine(model, tokenizer, total_blocks=64)
    with pytest.raises(InvalidRequestError, match="chat template"):
        engine.submit("t", messages=[{"role": "assistant", "content": "hi"}], max_tokens=2)
    uid = engine.submit("t", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert run_all(engine)[uid].finish_reason != "error"


def _no_tokenizing(engine, monkeypatch) -> None:
    def tokenized(*args, **kwargs):
        raise AssertionError("tokenized")

    for name in ("encode_turn", "render", "start"):
        monkeypatch.setattr(engine._encoder, name, tokenized)


def test_text_that_cannot_fit_is_refused_before_it_is_tokenized(llama, monkeypatch):
    """Text for a small pool: refused with PoolExhaustedError from its byte count alone
    (no byte-level token covers more bytes than its longest vocabulary entry), so no core
    spends seconds tokenizing it. The bound is the tokenizer's own: 12 bytes here (it was
    4 bytes per character, 48, which let 4x too much text through to the tokenizer)."""
    from agentkv.daemon.engine.prompts import max_token_bytes

    model, tokenizer = llama
    longest = max(len(t) for t in tokenizer.get_vocab())
    assert max_token_bytes(tokenizer) == longest == 12
    engine = make_engine(model, tokenizer, block_size=16, total_blocks=8)  # 128 tokens
    _no_tokenizing(engine, monkeypatch)
    with pytest.raises(PoolExhaustedError):  # >= 129 tokens whatever it is; 4x less than 48
        engine.submit("big", "word " * (129 * 12 // 5 + 1), max_tokens=1)
    many = [{"role": "user", "content": "x"}] * 50  # >= 3 tokens each in this template
    with pytest.raises(PoolExhaustedError):
        engine.submit("big", messages=many, max_tokens=1)
    assert engine.agent_ids() == [] and not engine.has_work


def test_the_size_bounds_are_lower_bounds(llama):
    """What the pre-check assumes never exceeds what tokenizing gives: texts of long
    tokens, special-token strings and multi-byte characters; chats of empty messages."""
    from agentkv.daemon.engine.prompts import PromptEncoder, render_messages

    _, tokenizer = llama
    enc = PromptEncoder(tokenizer)
    longest = max(tokenizer.get_vocab(), key=len).replace("\u0120", " ")
    for text in (longest * 50, "<|im_start|>" * 40, "ü😀" * 99, " grandmother" * 30):
        assert enc.fewest(text, None) <= len(tokenizer.encode(text, add_special_tokens=False))
    for n in (1, 2, 7):
        for content in ("", "x", "<|im_end|>" * 3):
            chat = [{"role": ("user", "assistant")[i % 2], "content": content} for i in range(n)]
            assert 0 < enc.fewest(None, chat) <= len(render_messages(tokenizer, chat))


def test_large_text_is_tokenized_off_the_engine_thread_in_agent_order(llama):
    """A prompt over the encoder's inline size is tokenized on its thread: submit returns
    at once, other agents' turns go on meanwhile, and a later turn of the same agent waits
    for it. The result is what tokenizing inline gives, token for token. (The inline size
    is lowered here: prefilling a real large prompt takes minutes on a CPU.)"""
    from agentkv.daemon.engine.prompts import render_messages

    model, tokenizer = llama
    engine = make_engine(model, tokenizer, total_blocks=256)
    engine._encoder.inline_bytes = 64
    text = "the cat sat on a mat, " * 12
    other = engine.submit("other", [5, 6, 7], max_tokens=40)
    big = engine.submit("big", text, max_tokens=3)
    after = engine.submit("big", [9, 10], max_tokens=3)
    assert engine.is_encoding(big) and not engine.is_encoding(after)
    order = [c.uid for c in engine.step()]
    assert order.index(big) < order.index(after)
    want = tokenizer.encode(text)  # its first turn: BOS added as mlx-lm adds it
    context = engine.agent_tokens("big")
    assert context[: len(want)] == want and other in order
    chat = [{"role": "user", "content": "where is the cat? " * 8}]
    uid = engine.submit("chat", messages=chat, max_tokens=2)  # rendered on the worker too
    assert engine.is_encoding(uid) and run_all(engine)[uid].finish_reason != "error"
    rendered = render_messages(tokenizer, chat)
    assert engine.agent_tokens("chat")[: len(rendered)] == rendered


def test_a_large_turn_that_does_not_fit_after_tokenizing_fails_typed(llama):
    """The exact check after tokenizing off-thread: the turn ends with an error event,
    code pool_exhausted; cancelling one being tokenized drops it; the agent is unchanged."""
    from agentkv.daemon.engine.prompts import INLINE_ENCODE_BYTES

    model, tokenizer = llama
    engine = make_engine(model, tokenizer, block_size=16, total_blocks=128)  # 2048 tokens
    text = "ab " * (INLINE_ENCODE_BYTES // 3 + 100)  # >= 1400 tokens by size; ~11K in fact
    uid = engine.submit("a", text, max_tokens=2)
    (done,) = engine.step()
    assert (done.uid, done.finish_reason, done.error_code) == (uid, "error", "pool_exhausted")
    uid = engine.submit("a", text, max_tokens=2)
    assert engine.is_encoding(uid) and engine.cancel(uid)
    (done,) = engine.step()
    assert done.finish_reason == "cancelled" and engine.agent_tokens("a") == []


def test_tokenizers_that_may_fold_input_get_no_size_bound():
    """The byte bound is only taken where it holds: a word-piece tokenizer (a whole unknown
    word is one token) or one whose pre-tokenizer drops whitespace gets none (such input
    is tokenized, off the engine thread, and checked exactly); a sentencepiece-style BPE
    with byte fallback and a space-replacing normalizer gets its longest entry in UTF-8."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from agentkv.daemon.engine.prompts import max_token_bytes

    def wrap(tk):
        return PreTrainedTokenizerFast(tokenizer_object=tk)

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert max_token_bytes(wrap(wordpiece)) is None
    dropping = Tokenizer(models.BPE({"a": 0, "b": 1}, [], byte_fallback=True))
    dropping.pre_tokenizer = pre_tokenizers.Whitespace()
    assert max_token_bytes(wrap(dropping)) is None
    vocab = {"<0x20>": 0, "\u2581": 1, "a": 2, "\u2581aaaa": 3}
    spm = Tokenizer(models.BPE(vocab, [], byte_fallback=True))
    spm.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    assert max_token_bytes(wrap(spm)) == len("\u2581aaaa".encode())  # 7: covers " aaaa"
    spm.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Strip()])
    assert max_token_bytes(wrap(spm)) is None
