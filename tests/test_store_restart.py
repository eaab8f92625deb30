"""The promise: an agent's cache survives a restart and is rebuilt once, exactly.

Also: every kind of damage to the files or the index is detected, and the output stays
identical because the context is recomputed from the stored tokens.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from refs import eos_ids, make_engine, random_tokens, run_all, scratch_tokens

from agentkv.daemon.engine.model_factory import ARCHITECTURES, load_model
from agentkv.daemon.engine.spec import ModelCacheSpec
from agentkv.storage import CacheStore
from agentkv.storage.tensor_files import (
    CHECKSUM_PLACEHOLDER,
    checksum_of,
    read_tensor_file,
    write_tensor_file,
)

VOCAB = 768
TURN_TOKENS = 12


def _engine(model, tokenizer, root: Path | None):
    store = CacheStore(root) if root is not None else None
    return make_engine(model, tokenizer, block_size=16, total_blocks=512, store=store)


def _turns(engine, prompts: dict[str, list[int]]) -> dict[str, object]:
    for agent, prompt in prompts.items():
        engine.submit(agent, prompt, max_tokens=TURN_TOKENS)
    return {c.agent_id: c for c in run_all(engine).values()}


def _restart_pair(model, tokenizer, root: Path, seed: int):
    """Two agents' first turns, then their second turns with and without a restart in
    between: (second turns uninterrupted, second turns after the restart, contexts)."""
    rng = np.random.default_rng(seed)
    firsts = {f"agent{i}": random_tokens(rng, 40 + 30 * i, VOCAB) for i in range(2)}
    seconds = {a: random_tokens(rng, 4, VOCAB) for a in firsts}
    uninterrupted = _engine(model, tokenizer, None)
    _turns(uninterrupted, firsts)
    reference = _turns(uninterrupted, seconds)
    before = _engine(model, tokenizer, root)
    _turns(before, firsts)
    contexts = {a: before.agent_tokens(a) for a in firsts}
    before.close()
    after = _engine(model, tokenizer, root)
    resumed = _turns(after, seconds)
    after.close()
    return reference, resumed, contexts


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_restart_resumes_every_agent_exactly(loaded_models, tmp_path, arch):
    model, tokenizer = loaded_models[arch]
    rng = np.random.default_rng(21)
    firsts = {f"agent{i}": random_tokens(rng, 30 + 45 * i, VOCAB) for i in range(3)}
    seconds = {a: random_tokens(rng, 5, VOCAB) for a in firsts}
    thirds = {a: random_tokens(rng, 3, VOCAB) for a in firsts}

    uninterrupted = _engine(model, tokenizer, None)
    for prompts in (firsts, seconds):
        _turns(uninterrupted, prompts)
    reference = _turns(uninterrupted, thirds)

    before = _engine(model, tokenizer, tmp_path)
    for prompts in (firsts, seconds):
        _turns(before, prompts)
    contexts = {a: before.agent_tokens(a) for a in firsts}
    before.close()

    after = _engine(model, tokenizer, tmp_path)
    resumed = _turns(after, thirds)
    eos = eos_ids(tokenizer)
    for agent in firsts:
        c = resumed[agent]
        assert c.token_ids == reference[agent].token_ids, (arch, agent)
        assert c.token_ids == scratch_tokens(
            model, contexts[agent] + thirds[agent], TURN_TOKENS, eos=eos
        )
        assert c.usage.restored_tokens == len(contexts[agent])  # the whole context came from disk
        assert c.usage.cached_tokens == len(contexts[agent]) and c.usage.recomputed_tokens == 0
    reads = dict(after.store.counters)
    again = _turns(after, {a: [9, 10] for a in firsts})
    assert after.store.counters["blocks_read"] == reads["blocks_read"]  # memory from now on
    assert after.store.counters["states_read"] == reads["states_read"]
    assert all(c.usage.restored_tokens == 0 for c in again.values())
    after.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_restart_resumes_half_precision_models_exactly(model_dirs, tmp_path, arch, dtype):
    """The same with the model (so its cache) in bfloat16 or float16: the restored bits are
    the stored ones (bfloat16 travels as raw 16-bit words), so output is identical."""
    model, tokenizer = load_model(model_dirs[arch])
    model.set_dtype(getattr(mx, dtype))
    assert ModelCacheSpec.from_model(model, block_size=16).layers[0].dtype == dtype
    reference, resumed, contexts = _restart_pair(model, tokenizer, tmp_path, seed=5)
    for agent, context in contexts.items():
        assert resumed[agent].token_ids == reference[agent].token_ids, (arch, dtype, agent)
        assert resumed[agent].usage.restored_tokens == len(context)


def test_a_store_written_at_another_block_size_is_recomputed_not_quarantined(
    loaded_models, tmp_path
):
    """An engine restarted with another block size finds block lists that are not its
    chain: the context is recomputed (output exact), nothing is taken for a corrupt file,
    and the next turn stores the context at the new size."""
    model, tokenizer, context = _llama_store(loaded_models, tmp_path)  # block size 16
    eos = eos_ids(tokenizer)
    for bs in (32, 8):
        engine = make_engine(
            model, tokenizer, block_size=bs, total_blocks=512, store=CacheStore(tmp_path)
        )
        engine.submit("victim", [11, 12, 13], max_tokens=TURN_TOKENS)
        (c,) = run_all(engine).values()
        assert c.token_ids == scratch_tokens(model, context + [11, 12, 13], TURN_TOKENS, eos=eos)
        assert c.usage.restored_tokens == 0 and c.usage.recomputed_tokens == len(context)
        assert engine.store.counters["corrupt_files"] == 0
        context = engine.agent_tokens("victim")
        engine.close()
        assert not (tmp_path / "quarantine").exists() or not any(
            (tmp_path / "quarantine").iterdir()
        )
    engine = make_engine(
        model, tokenizer, block_size=8, total_blocks=512, store=CacheStore(tmp_path)
    )
    engine.submit("victim", [14], max_tokens=2)
    (c,) = run_all(engine).values()
    assert c.usage.restored_tokens == len(context)  # stored at size 8 by the last turn
    engine.close()


@pytest.mark.parametrize("value", ["Infinity", "1e400", "[1]", '"many"', "-3"])
def test_a_valid_state_file_that_fits_no_state_is_quarantined(loaded_models, tmp_path, value):
    """A state file that passes every check of the store (its checksum the index's) but
    whose metadata cannot describe this model's state: counted and moved aside like a
    corrupt file, the tail recomputed, the output exact; never raised to the caller."""
    model, tokenizer, context = _llama_store(loaded_models, tmp_path)
    path = _state_file(tmp_path)
    assert '"tail_tokens":"' in path.read_bytes()[:4096].decode(errors="replace")
    checksum, size = _rewrite_header(
        path, lambda t: re.sub(r'"tail_tokens":"\d+"', f'"tail_tokens":{value}', t)
    )
    db = sqlite3.connect(tmp_path / "index.db")
    db.execute("UPDATE agents SET state_checksum = ?, state_bytes = ?", (checksum, size))
    db.commit()
    db.close()
    engine = _engine(model, tokenizer, tmp_path)
    engine.submit("victim", [11, 12, 13], max_tokens=TURN_TOKENS)
    (c,) = run_all(engine).values()
    assert c.token_ids == scratch_tokens(
        model, context + [11, 12, 13], TURN_TOKENS, eos=eos_ids(tokenizer)
    )
    assert engine.store.counters["corrupt_files"] == 1
    assert c.usage.restored_tokens + c.usage.recomputed_tokens == len(context)
    assert c.usage.recomputed_tokens > 0
    engine.store.flush()
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    engine.close()


def test_a_fork_with_no_cache_to_share_survives_a_restart(loaded_models, tmp_path):
    """A fork of an agent whose stored cache is unusable (written at another block size)
    shares no blocks, but its token ids are stored all the same: after a restart it
    resumes with the whole context, not as a new agent."""
    model, tokenizer, context = _llama_store(loaded_models, tmp_path)  # block size 16
    engine = make_engine(
        model, tokenizer, block_size=32, total_blocks=512, store=CacheStore(tmp_path)
    )
    engine.fork_agent("victim", "fork")
    engine.close()
    again = make_engine(
        model, tokenizer, block_size=32, total_blocks=512, store=CacheStore(tmp_path)
    )
    assert set(again.agent_ids()) == {"victim", "fork"}
    c = _turns(again, {"fork": [5, 6]})["fork"]
    assert c.usage.prompt_tokens == len(context) + 2
    want = scratch_tokens(model, context + [5, 6], TURN_TOKENS, eos=eos_ids(tokenizer))
    assert c.token_ids == want
    again.close()


def test_restore_takes_pooled_shared_blocks_from_memory_and_forks(loaded_models, tmp_path):
    """After a restart: blocks another agent already brought back are copied from memory,
    not read again; a restored agent forked before its next turn branches exactly."""
    model, tokenizer = loaded_models["llama"]
    eos = eos_ids(tokenizer)
    rng = np.random.default_rng(8)
    shared = random_tokens(rng, 40, VOCAB)  # two full 16-token blocks
    firsts = {a: shared + random_tokens(rng, 20 + 9 * i, VOCAB) for i, a in enumerate("abc")}
    before = _engine(model, tokenizer, tmp_path)
    _turns(before, firsts)
    contexts = {a: before.agent_tokens(a) for a in firsts}
    before.close()

    after = _engine(model, tokenizer, tmp_path)
    first = _turns(after, {"a": [5, 6]})["a"]
    assert first.usage.restored_tokens == len(contexts["a"])
    read = after.store.counters["blocks_read"]
    second = _turns(after, {"b": [5, 6]})["b"]
    own_blocks = len(contexts["b"]) // 16 - 2
    assert after.store.counters["blocks_read"] - read == own_blocks  # not the shared two
    assert second.usage.restored_tokens == len(contexts["b"]) - 32
    for agent, c in (("a", first), ("b", second)):
        want = scratch_tokens(model, contexts[agent] + [5, 6], TURN_TOKENS, eos=eos)
        assert c.token_ids == want, agent

    after.fork_agent("c", "c2")  # c is only on disk until now
    forked = _turns(after, {"c": [7], "c2": [8, 9]})
    for agent, prompt in (("c", [7]), ("c2", [8, 9])):
        want = scratch_tokens(model, contexts["c"] + prompt, TURN_TOKENS, eos=eos)
        assert forked[agent].token_ids == want, agent
    after.close()


def _llama_store(loaded_models, root: Path):
    """A store holding one agent with several blocks and a tail; returns what's needed."""
    model, tokenizer = loaded_models["llama"]
    engine = _engine(model, tokenizer, root)
    prompt = random_tokens(np.random.default_rng(5), 70, VOCAB)
    _turns(engine, {"victim": prompt})
    context = engine.agent_tokens("victim")
    engine.close()
    return model, tokenizer, context


def _block_files(root: Path) -> list[Path]:
    db = sqlite3.connect(root / "index.db")
    rows = db.execute(
        "SELECT b.path FROM agent_blocks a JOIN blocks b ON a.block_hash = b.hash ORDER BY a.seq"
    ).fetchall()
    db.close()
    return [root / r[0] for r in rows]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _delete(path: Path) -> None:
    path.unlink()


def _wrong_model(path: Path) -> None:
    meta, tensors = read_tensor_file(path)
    meta = {k: v for k, v in meta.items() if k != "checksum"}
    meta["fingerprint"] = "0" * 32  # a valid file, of another model
    path.unlink()
    write_tensor_file(path, tensors, meta)


def _directory(path: Path) -> None:
    """A directory where the file was: refused, not a regular file."""
    path.unlink()
    path.mkdir()


def _fifo(path: Path) -> None:
    """A named pipe where the file was: opening one for reading waits for a writer, so a
    reader that did not refuse it would hang the engine thread."""
    path.unlink()
    os.mkfifo(path)


def _rewrite_header(path: Path, edit) -> tuple[str, int]:
    """Rewrite a file's header text with `edit`, its checksum made valid again (a hostile
    file, not bit rot); returns the new checksum and size."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    header["__metadata__"]["checksum"] = CHECKSUM_PLACEHOLDER
    text = edit(json.dumps(header, separators=(",", ":"))).encode()
    text += b" " * (-len(text) % 8)
    blank = struct.pack("<Q", len(text)) + text
    checksum = checksum_of([blank, data])
    path.write_bytes(blank.replace(CHECKSUM_PLACEHOLDER.encode(), checksum.encode(), 1) + data)
    return checksum, len(blank) + len(data)


def _deep_json(path: Path) -> None:
    """A header nested deeper than Python's JSON parser can go (RecursionError)."""
    depth = 200_000
    _rewrite_header(path, lambda t: t[:-1] + ',"x":' + "[" * depth + "]" * depth + "}")


def _huge_shape(path: Path) -> None:
    """A tensor whose shape overflows any integer type (2**70 elements)."""
    _rewrite_header(path, lambda t: t.replace('"shape":[', f'"shape":[{2**70},', 1))


def _sparse(path: Path) -> None:
    """The file grown to 1 GiB of holes: refused by its size, never read whole."""
    os.truncate(path, 2**30)


def _state_file(root: Path) -> Path:
    db = sqlite3.connect(root / "index.db")
    (rel,) = db.execute("SELECT state_file FROM agents").fetchone()
    db.close()
    return root / rel


@pytest.mark.parametrize(
    "damage",
    [
        _flip,
        _truncate,
        _delete,
        _wrong_model,
        _directory,
        _fifo,
        _deep_json,
        _huge_shape,
        _sparse,
    ],
)
@pytest.mark.parametrize("target", ["first_block", "last_block", "state"])
def test_damaged_files_are_detected_and_recomputed(loaded_models, tmp_path, damage, target):
    model, tokenizer, context = _llama_store(loaded_models, tmp_path)
    blocks = _block_files(tmp_path)
    path = {"first_block": blocks[0], "last_block": blocks[-1], "state": _state_file(tmp_path)}[
        target
    ]
    damage(path)

    engine = _engine(model, tokenizer, tmp_path)
    engine.submit("victim", [11, 12, 13], max_tokens=TURN_TOKENS)
    (c,) = run_all(engine).values()  # nothing raised to the caller
    assert c.finish_reason != "error"
    assert c.token_ids == scratch_tokens(
        model, context + [11, 12, 13], TURN_TOKENS, eos=eos_ids(tokenizer)
    )
    assert engine.store.counters["corrupt_files"] == 1
    assert c.usage.recomputed_tokens > 0
    assert c.usage.restored_tokens + c.usage.recomputed_tokens == len(context)
    engine.store.flush()  # the writer forgets the file, then moves it aside
    quarantined = list((tmp_path / "quarantine").iterdir())
    assert len(quarantined) == (0 if damage is _delete else 1)  # moved aside, never deleted
    engine.close()
    # the next restart finds a healthy store again: the turn rewrote what was lost
    again = _engine(model, tokenizer, tmp_path)
    assert again.store.verify().corrupt == []
    again.submit("victim", [14], max_tokens=4)
    (c2,) = run_all(again).values()
    assert c2.usage.restored_tokens == len(context) + 3 + c.usage.generated_tokens
    again.close()


# sql -> what must happen: "new" (the tokens blob is unreadable: the agent starts afresh),
# "recomputed" (its context is kept and its cache recomputed), "restored" (bookkeeping
# garbage: counted, the cache still used), "verify" (a block row's path, which restores
# never follow: the cache is used and verify reports the row).
GARBAGE = {
    "UPDATE agents SET tokens = x'0102'": "new",  # not whole int32s
    "UPDATE agents SET tokens = 'text'": "new",
    "UPDATE agents SET token_count = token_count + 5": "recomputed",
    "UPDATE agents SET token_count = 'many'": "recomputed",
    "UPDATE agents SET stored_tokens = 99999": "recomputed",
    "UPDATE agents SET stored_tokens = 'garbage'": "recomputed",
    "INSERT INTO agent_blocks VALUES ('victim', (SELECT fingerprint FROM agents), 99, 'ff00')": (
        "recomputed"
    ),
    "UPDATE agent_blocks SET block_hash = 'deadbeef' WHERE seq = 1": "recomputed",
    "UPDATE agent_blocks SET block_hash = '../../x' WHERE seq = 0": "recomputed",
    # A real, valid block file, but not this position's: its own next block.
    "UPDATE agent_blocks SET block_hash = (SELECT block_hash FROM agent_blocks WHERE seq = 1) "
    "WHERE seq = 0": "recomputed",
    "UPDATE agents SET state_file = 'agents/nope/x.safetensors'": "recomputed",
    "DELETE FROM blocks": "recomputed",
    "UPDATE agents SET last_used = 'yesterday'": "restored",
    "UPDATE agents SET pinned = 'maybe'": "restored",
    "UPDATE blocks SET path = 'blocks/zz/missing.safetensors'": "verify",
}


@pytest.mark.parametrize("sql", GARBAGE)
def test_garbage_index_rows_never_raise(loaded_models, tmp_path, sql):
    """Garbage in the index is detected and counted, never raised; the tokens are the
    source of truth, so the context survives whenever their blob is intact."""
    model, tokenizer, context = _llama_store(loaded_models, tmp_path)
    db = sqlite3.connect(tmp_path / "index.db")
    db.execute(sql)
    db.commit()
    db.close()
    engine = _engine(model, tokenizer, tmp_path)
    engine.submit("victim", [11, 12, 13], max_tokens=TURN_TOKENS)
    (c,) = run_all(engine).values()
    assert c.finish_reason != "error"
    known = engine.agent_tokens("victim")[: -3 - c.usage.generated_tokens]
    eos = eos_ids(tokenizer)
    assert c.token_ids == scratch_tokens(model, known + [11, 12, 13], TURN_TOKENS, eos=eos)
    expect = GARBAGE[sql]
    assert known == ([] if expect == "new" else context)
    restored = c.usage.restored_tokens
    assert restored == (len(context) if expect in ("restored", "verify") else 0)
    assert engine.store.counters["corrupt_rows"] == (0 if expect == "verify" else 1)
    if expect == "verify":
        bad = engine.store.verify().corrupt  # every block row (all were edited)
        assert bad == ["blocks/zz/missing.safetensors"] * len(_block_files(tmp_path))
    engine.close()


def test_tokens_edited_past_the_last_block_leave_the_state_file_unused(loaded_models, tmp_path):
    """The index's last token edited (past the last full block, where no block hash
    reaches): the state file's tail rows are of the old tokens, so they are not used. The
    blocks before stay, the rest is recomputed, and the output is exact for the edited
    context; the row is counted corrupt, the good file is not moved aside."""
    model, tokenizer, context = _llama_store(loaded_models, tmp_path)
    assert len(context) % 16, "the agent must have a tail"
    edited = [*context[:-1], (context[-1] + 1) % VOCAB]
    db = sqlite3.connect(tmp_path / "index.db")
    db.execute("UPDATE agents SET tokens = ?", (np.asarray(edited, "<i4").tobytes(),))
    db.commit()
    db.close()
    engine = _engine(model, tokenizer, tmp_path)
    engine.submit("victim", [31, 32, 33], max_tokens=TURN_TOKENS)
    (c,) = run_all(engine).values()
    eos = eos_ids(tokenizer)
    assert c.token_ids == scratch_tokens(model, edited + [31, 32, 33], TURN_TOKENS, eos=eos)
    assert c.usage.restored_tokens == len(context) // 16 * 16
    assert engine.store.counters["corrupt_rows"] == 1
    assert engine.store.counters["corrupt_files"] == 0
    engine.close()


def test_inspecting_a_stored_agent_does_not_load_it(loaded_models, tmp_path):
    """agent_info/agent_tokens of an agent only on disk read the index: the engine's
    in-memory agents stay as they were, and a deleted agent is no longer listed."""
    model, tokenizer = loaded_models["llama"]
    before = _engine(model, tokenizer, tmp_path)
    _turns(before, {"kept": [5, 6, 7], "gone": [8, 9]})
    context = before.agent_tokens("kept")
    before.close()

    after = _engine(model, tokenizer, tmp_path)
    in_memory = after.stats()["agents"]
    info = after.agent_info("kept")
    assert info.in_store and info.tokens == len(context) and info.blocks == 0
    assert after.agent_tokens("kept") == context
    assert after.stats()["agents"] == in_memory
    after.delete_agent("gone")
    assert after.agent_ids() == ["kept"]
    after.close()


def test_a_model_without_attention_layers_resumes_exactly(loaded_models, tmp_path):
    """A pure recurrent model (mamba2): no K/V buffers at all, only states in the state
    file; the restart resumes every agent exactly."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    _, tokenizer = loaded_models["llama"]
    config = {
        "model_type": "mamba2",
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "num_heads": 8,
        "head_dim": 16,
        "state_size": 8,
        "n_groups": 1,
        "num_hidden_layers": 2,
        "conv_kernel": 4,
        "expand": 2,
        "use_bias": False,
        "use_conv_bias": True,
        "chunk_size": 16,
        "time_step_limit": [0.0, 1e9],
        "time_step_rank": 8,
        "layer_norm_epsilon": 1e-6,
        "tie_word_embeddings": True,
    }
    model_class, args_class = _get_classes(config)
    mx.random.seed(5)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    reference, resumed, contexts = _restart_pair(model, tokenizer, tmp_path, seed=8)
    for agent, context in contexts.items():
        assert resumed[agent].token_ids == reference[agent].token_ids
        usage = resumed[agent].usage
        assert usage.restored_tokens == usage.cached_tokens == len(context)
