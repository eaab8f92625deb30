"""A lost or damaged index: refused at open and by gc, found by verify, rebuilt from files.

Real files, real SQLite (pages garbled by writing random bytes into index.db), daemonctl as a
subprocess. Covers: a store whose index.db is missing, 0 bytes or not a database beside its
cache files is refused (typed IndexMissingError naming `daemonctl rebuild-index`) by the
store and by gc, which never offers its files as orphans; an index recreated empty over old
files is refused by gc too; every state file holds its agent's id, tokens and block list, so
`rebuild_index` gives back the index a store had (models, blocks, refcounts, agents), cuts
an agent at a missing block, reports as lost the agents whose state files hold no tokens
(written by an older agentkv), moves a stale WAL aside, and refuses a sound or locked store;
`verify` reports a garbled page or header in one line (with the affected agents) and exits
1; `gc` and `agents` refuse a damaged index in one line; no progress bar reaches a pipe.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import daemonctl_command
from refs import eos_ids, make_engine, random_tokens, run_all, scratch_tokens, synthetic_turn

from agentkv.storage import (
    CacheStore,
    CorruptFileError,
    IndexDamagedError,
    IndexMissingError,
    StorageError,
    StoreLockedError,
    rebuild_index,
)
from agentkv.storage.locks import try_lock
from agentkv.storage.maintenance import collect_garbage, verify_store
from agentkv.storage.records import TOKENS_TENSOR
from agentkv.storage.schema import open_index
from agentkv.storage.tensor_files import read_tensor_file, write_tensor_file

BLOCK = 16
FP = "b" * 32
BAR = ("\r", "█", "it/s", "file/s")  # what a tqdm bar draws


def _turn(agent_id: str, *, blocks: int = 2, tail: int = 4, shared: int = 0, seed: int = 0):
    rec = synthetic_turn(agent_id, FP, blocks=blocks, tail=tail, block_size=BLOCK, shared=shared)
    rng = np.random.default_rng(seed)
    rec.tokens = rng.integers(8, 700, size=len(rec.tokens)).tolist() + [3, 4]  # 2 uncached
    return rec


def _populate(root: Path, n_agents: int = 3) -> dict[str, list[int]]:
    """A closed store with a registered model and agents sharing a block; their tokens."""
    store = CacheStore(root)
    store.register_model(FP, model_id="tiny-llama", config='{"layers": 2}', block_size=BLOCK)
    tokens = {}
    for i in range(n_agents):
        rec = _turn(f"agent-{i}", blocks=1 + i % 3, tail=(3 * i) % BLOCK, shared=1, seed=i)
        store.save_turn(rec)
        tokens[rec.agent_id] = rec.tokens
    store.close()
    return tokens


def _rows(root: Path) -> dict[str, list[tuple]]:
    """What the index holds, time stamps and pins aside."""
    db = sqlite3.connect(root / "index.db")
    try:
        return {
            "models": db.execute(
                "SELECT fingerprint, model_id, config, block_size FROM models ORDER BY 1"
            ).fetchall(),
            "blocks": db.execute(
                "SELECT hash, fingerprint, path, bytes, checksum, token_count, refcount "
                "FROM blocks ORDER BY 1"
            ).fetchall(),
            "agents": db.execute(
                "SELECT agent_id, fingerprint, tokens, token_count, stored_tokens, state_file, "
                "state_checksum, state_bytes FROM agents ORDER BY 1"
            ).fetchall(),
            "agent_blocks": db.execute("SELECT * FROM agent_blocks ORDER BY 1, 2, 3").fetchall(),
        }
    finally:
        db.close()


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for sub in ("blocks", "agents")
        for p in sorted((root / sub).rglob("*"))
        if p.is_file()
    }


def _lose_index(root: Path, how: str) -> None:
    index = root / "index.db"
    for side in ("index.db-wal", "index.db-shm"):
        (root / side).unlink(missing_ok=True)
    if how == "missing":
        index.unlink()
    elif how == "empty":
        index.write_bytes(b"")
    else:  # the header garbled: no longer a SQLite database
        with open(index, "r+b") as f:
            f.write(np.random.default_rng(1).bytes(100))


def _ctl(*args: str) -> subprocess.CompletedProcess:
    cmd = [*daemonctl_command(), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _store_arg(root: Path) -> Path:
    """daemonctl's --store for a test store kept in <dir>/cache."""
    return root.parent


# -- refused ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["missing", "empty", "garbled-header"])
def test_a_lost_index_beside_files_is_refused_by_the_store_and_gc(tmp_path, how):
    root = tmp_path / "cache"
    _populate(root)
    _lose_index(root, how)
    before = _files(root)
    for attempt in range(2):  # refused again: the failed open left nothing behind
        with pytest.raises(IndexMissingError, match="daemonctl rebuild-index") as caught:
            CacheStore(root)
        assert str(root) in str(caught.value), attempt
    for dry_run in (True, False):
        with pytest.raises(IndexMissingError):
            collect_garbage(root, FP, dry_run=dry_run)
    gc = _ctl("gc", "--no-dry-run", "--store", str(_store_arg(root)))
    assert gc.returncode == 1 and "rebuild-index" in gc.stderr, gc.stdout + gc.stderr
    assert "Traceback" not in gc.stderr and len(gc.stderr.strip().splitlines()) == 1
    assert _files(root) == before  # nothing removed, nothing moved
    if how == "missing":
        assert not (root / "index.db").exists()  # and no empty index made over them


def test_a_new_store_still_opens_without_an_index(tmp_path):
    """No cache files: nothing to lose, so a missing index is simply a new store."""
    CacheStore(tmp_path / "fresh").close()
    (tmp_path / "fresh" / "index.db").unlink()
    CacheStore(tmp_path / "fresh").close()


def test_gc_refuses_an_index_recreated_empty_over_older_files(tmp_path):
    """What an older agentkv did with a lost index: an empty one made over the files. gc
    must not offer them all as orphans."""
    root = tmp_path / "cache"
    _populate(root)
    _lose_index(root, "missing")
    open_index(root / "index.db").conn.close()  # an empty index, as a new store's
    old = time.time() - 3600
    for p in root.rglob("*.safetensors"):
        os.utime(p, (old, old))
    with pytest.raises(IndexMissingError, match="lists no blocks and no agents"):
        collect_garbage(root, FP, dry_run=True)
    assert len(rebuild_index(root).agents) == 3  # the way out it names (no --force needed)
    assert collect_garbage(root, FP, dry_run=True).orphan_files == []


# -- rebuilt ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["missing", "empty", "garbled-header"])
def test_rebuild_gives_back_the_index_the_store_had(tmp_path, how):
    root = tmp_path / "cache"
    tokens = _populate(root, n_agents=5)
    had = _rows(root)
    _lose_index(root, how)
    dry = rebuild_index(root, dry_run=True)
    assert dry.dry_run and sorted(dry.agents) == sorted(f"{a}@{FP}" for a in tokens)
    assert index_state_unchanged(root, how)
    report = rebuild_index(root)
    assert report.lost_agents == report.cut_agents == report.bad_files == []
    assert report.models == [FP] and report.blocks == len(had["blocks"])
    assert report.restored_tokens == sum(map(len, tokens.values()))
    assert _rows(root) == had  # tokens, block lists, refcounts, state files, model record
    store = CacheStore(root)
    for agent_id, context in tokens.items():
        stored = store.agent(agent_id, FP)
        assert stored.tokens == context
        meta, tensors = store.read_state(stored)  # the file the index names, checksum ok
        assert TOKENS_TENSOR not in tensors and int(meta["token_count"]) == stored.stored_tokens
    assert store.verify().corrupt == []
    assert store.gc(FP, dry_run=True).orphan_files == []
    store.close()
    assert list(root.glob(".index.db.rebuild*")) == []  # no temp file left


def index_state_unchanged(root: Path, how: str) -> bool:
    """A dry run wrote nothing: the index is as it was lost."""
    index = root / "index.db"
    if how == "missing":
        return not index.exists()
    return index.exists() and (how != "empty" or index.stat().st_size == 0)


def test_rebuild_reports_agents_whose_state_files_hold_no_tokens(tmp_path):
    """A state file as an older agentkv wrote it (no agent id, no token list): that agent's
    context is lost, and said so; every other agent comes back."""
    root = tmp_path / "cache"
    tokens = _populate(root, n_agents=3)
    db = sqlite3.connect(root / "index.db")
    (rel,) = db.execute("SELECT state_file FROM agents WHERE agent_id = 'agent-1'").fetchone()
    db.close()
    meta, tensors = read_tensor_file(root / rel)
    old_meta = {k: v for k, v in meta.items() if k not in ("agent_id", "checksum")}
    old_tensors = {k: t for k, t in tensors.items() if not k.startswith("context.")}
    write_tensor_file(root / rel, old_tensors, old_meta)
    _lose_index(root, "missing")
    report = rebuild_index(root)
    assert sorted(report.agents) == [f"agent-0@{FP}", f"agent-2@{FP}"]
    assert len(report.lost_agents) == 1 and rel in report.lost_agents[0]
    store = CacheStore(root)
    assert store.agent("agent-1", FP) is None
    assert store.agent("agent-2", FP).tokens == tokens["agent-2"]
    store.close()


def test_rebuild_cuts_an_agent_at_a_missing_block_and_keeps_its_tokens(tmp_path):
    root = tmp_path / "cache"
    tokens = _populate(root, n_agents=3)
    had = CacheStore(root)
    lost_block = had.agent("agent-2", FP).block_hashes[1]  # its own, not the shared one
    had.close()
    (root / "blocks" / lost_block[:2] / f"{lost_block}.safetensors").unlink()
    _lose_index(root, "empty")
    report = rebuild_index(root)
    assert len(report.cut_agents) == 1 and report.cut_agents[0].startswith("agent-2:")
    store = CacheStore(root)
    cut = store.agent("agent-2", FP)
    assert cut.tokens == tokens["agent-2"]  # the context is whole; its cache is shorter
    assert (cut.stored_tokens, len(cut.block_hashes), cut.state_file) == (BLOCK, 1, None)
    assert store.verify().corrupt == []
    store.close()
    db = sqlite3.connect(root / "index.db")
    wrong = db.execute(
        "SELECT hash FROM blocks WHERE refcount != "
        "(SELECT COUNT(*) FROM agent_blocks WHERE block_hash = hash)"
    ).fetchall()
    db.close()
    assert wrong == []


def test_rebuild_refuses_a_locked_store_and_a_sound_index(tmp_path):
    root = tmp_path / "cache"
    _populate(root)
    had = _rows(root)
    with pytest.raises(StorageError, match="sound"):
        rebuild_index(root)
    store = CacheStore(root)  # a daemon's hold on the store
    with pytest.raises(StoreLockedError):
        rebuild_index(root, force=True)
    store.close()
    assert rebuild_index(root, force=True).lost_agents == []
    assert _rows(root) == had


def test_rebuild_sets_a_stale_wal_aside(tmp_path):
    """The damaged index's WAL must never be applied to the new index: it is moved to
    quarantine with the old index, and the new one is sound."""
    root = tmp_path / "cache"
    tokens = _populate(root)
    had = _rows(root)
    writer = sqlite3.connect(root / "index.db")  # leave a WAL full of writes behind
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("DELETE FROM agent_blocks")
    writer.commit()
    wal = (root / "index.db-wal").read_bytes()
    writer.close()
    assert len(wal) > 0
    (root / "index.db-wal").write_bytes(wal)  # as a crash leaves it
    with open(root / "index.db", "r+b") as f:
        f.write(np.random.default_rng(2).bytes(100))
    report = rebuild_index(root)
    assert report.old_index is not None and Path(report.old_index).exists()
    assert list((root / "quarantine").glob("index.db-wal.*"))
    assert _rows(root) == had
    store = CacheStore(root)
    assert store.agent("agent-0", FP).tokens == tokens["agent-0"]
    store.close()


# -- damaged pages ---------------------------------------------------------------------------


def _child_pages(path: Path, table: str) -> list[int]:
    """The pages a table's (or an index's) root b-tree page points to: its children."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = db.execute("PRAGMA page_size").fetchone()[0]
    (root_page,) = db.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)
    ).fetchone()
    db.close()
    page = path.read_bytes()[(root_page - 1) * size : root_page * size]
    assert page[0] in (0x02, 0x05), "it fits one page: add rows"  # an interior b-tree page
    (cells,) = struct.unpack(">H", page[3:5])
    pointers = struct.unpack(f">{cells}H", page[12 : 12 + 2 * cells])
    children = [struct.unpack(">I", page[p : p + 4])[0] for p in pointers]
    return [*children, struct.unpack(">I", page[8:12])[0]]


def _garble_page(path: Path, page: int) -> None:
    db = sqlite3.connect(path)
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with open(path, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(np.random.default_rng(page).bytes(size))


def _many_agents(root: Path, n: int = 120) -> None:
    """A store whose agents table spans several pages (long token lists)."""
    store = CacheStore(root)
    for i in range(n):
        rec = _turn(f"agent-{i:03d}", blocks=2, tail=1, shared=1, seed=i)
        rec.tokens += list(range(8, 300))
        store.save_turn(rec)
    store.close()


def test_verify_reports_a_garbled_middle_page_in_one_line(tmp_path):
    root = tmp_path / "cache"
    _many_agents(root)
    children = _child_pages(root / "index.db", "agents")
    assert len(children) >= 3
    _garble_page(root / "index.db", children[len(children) // 2])
    report = verify_store(root)
    assert report.index_error is not None and report.checked == 0
    assert 0 < len(report.affected_agents) < 120  # the rows on that page, not all
    proc = _ctl("verify", "--store", str(_store_arg(root)))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("index damaged:"), proc.stdout
    assert "rebuild-index" in lines[0] and report.affected_agents[0] in lines[0]
    assert "Traceback" not in proc.stderr and not any(b in proc.stderr for b in BAR)
    as_json = json.loads(_ctl("verify", "--json", "--store", str(_store_arg(root))).stdout)
    assert as_json["affected_agents"] == report.affected_agents
    for cmd in (("gc",), ("gc", "--no-dry-run")):
        out = _ctl(*cmd, "--store", str(_store_arg(root)))
        assert out.returncode == 1 and "Traceback" not in out.stderr, (cmd, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "damaged" in out.stderr, cmd
    with pytest.raises(IndexDamagedError):
        collect_garbage(root, FP, dry_run=True)
    # The way out it names: the rebuild gives back every agent.
    rebuild = _ctl("rebuild-index", "--json", "--store", str(_store_arg(root)))
    assert rebuild.returncode == 0, rebuild.stderr
    assert len(json.loads(rebuild.stdout)["agents"]) == 120
    assert verify_store(root).index_error is None


def test_verify_reports_a_garbled_header_in_one_line(tmp_path):
    root = tmp_path / "cache"
    _many_agents(root, 20)
    _lose_index(root, "garbled-header")
    proc = _ctl("verify", "--store", str(_store_arg(root)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    assert "not a SQLite database" in line and "20 agent(s) affected" in line
    assert "rebuild-index" in line


def test_verify_and_gc_draw_no_progress_bar_into_a_pipe(tmp_path):
    root = tmp_path / "cache"
    _populate(root)
    for cmd in (("verify",), ("gc",)):
        proc = _ctl(*cmd, "--store", str(_store_arg(root)))
        assert proc.returncode == 0, proc.stderr
        assert not any(b in proc.stderr + proc.stdout for b in BAR), (cmd, proc.stderr)
    rebuild = _ctl("rebuild-index", "--force", "--store", str(_store_arg(root)))
    assert rebuild.returncode == 0 and not any(b in rebuild.stderr for b in BAR)


def test_rebuild_index_cli_refuses_while_the_store_is_held(tmp_path):
    root = tmp_path / "cache"
    _populate(root)
    _lose_index(root, "missing")
    held = try_lock(root / "lock")  # what a running daemon holds
    try:
        proc = _ctl("rebuild-index", "--store", str(_store_arg(root)))
    finally:
        held.close()
    assert proc.returncode == 1 and "in use" in proc.stderr and "Traceback" not in proc.stderr
    assert not (root / "index.db").exists()
    dry = _ctl("rebuild-index", "--dry-run", "--store", str(_store_arg(root)))
    assert dry.returncode == 0 and "would rebuild the index: 3 agents" in dry.stdout
    assert not (root / "index.db").exists()


# -- with a real daemon ----------------------------------------------------------------------

VOCAB = 768
ARGS = ("--block-size", str(BLOCK), "--pool-blocks", "96")
TURN_TOKENS = 10


def test_a_lost_index_is_refused_rebuilt_and_every_agent_resumes_exactly(
    daemon_factory, loaded_models
):
    """Two turns of three agents; stop; index.db deleted: start and gc refuse; rebuild-index
    (refused while the daemon ran); start: the third turn matches an uninterrupted run and
    mlx-lm from scratch, every agent restored from disk."""
    model, tokenizer = loaded_models["llama"]
    rng = np.random.default_rng(14)
    agents = ("planner", "critic", "coder")
    firsts = {a: random_tokens(rng, 12 + 21 * i, VOCAB) for i, a in enumerate(agents)}
    firsts["critic"] = "You are the critic. Read the plan."
    seconds = {a: random_tokens(rng, 4 + i, VOCAB) for i, a in enumerate(agents)}
    thirds = {a: random_tokens(rng, 3, VOCAB) for a in agents}
    d = daemon_factory(args=ARGS)
    d.start()
    with d.client() as c:
        for prompts in (firsts, seconds):
            d.turns(c, prompts, max_tokens=TURN_TOKENS)
        contexts = {a: c.inspect(a)["token_ids"] for a in agents}
    busy = d.ctl("rebuild-index", "--force")
    assert busy.returncode == 1 and "in use" in busy.stderr, busy.stdout + busy.stderr
    assert d.ctl("stop").returncode == 0 and d.wait_exit(10)

    _lose_index(d.store / "cache", "missing")
    files = _files(d.store / "cache")
    refused = d.ctl("start", "--model", str(d.model_dir), *ARGS)
    assert refused.returncode != 0 and "rebuild-index" in refused.stdout + refused.stderr
    assert not (d.store / "cache" / "index.db").exists()
    gc = d.ctl("gc", "--no-dry-run")
    assert gc.returncode == 1 and "rebuild-index" in gc.stderr
    assert _files(d.store / "cache") == files  # nothing removed
    rebuilt = d.ctl("rebuild-index", "--json")
    assert rebuilt.returncode == 0, rebuilt.stderr
    report = json.loads(rebuilt.stdout)
    assert len(report["agents"]) == 3 and report["lost_agents"] == report["cut_agents"] == []
    assert report["restored_tokens"] == sum(map(len, contexts.values()))

    d.start()
    with d.client() as c:
        assert {r["agent_id"] for r in c.agents()} == set(agents)
        third = d.turns(c, thirds, max_tokens=TURN_TOKENS)
        assert c.stats()["restored_agents"] == len(agents)
    uninterrupted = make_engine(model, tokenizer, block_size=BLOCK, total_blocks=256)
    for prompts in (firsts, seconds, thirds):
        for agent, prompt in prompts.items():
            uninterrupted.submit(agent, prompt, max_tokens=TURN_TOKENS)
        reference = {cpl.agent_id: cpl for cpl in run_all(uninterrupted).values()}
    uninterrupted.close()
    eos = eos_ids(tokenizer)
    for agent in agents:
        got = third[agent]
        assert got.token_ids == reference[agent].token_ids, agent
        assert got.token_ids == scratch_tokens(
            model, contexts[agent] + thirds[agent], TURN_TOKENS, eos=eos
        ), agent
        assert got.usage["restored_tokens"] == len(contexts[agent]) > 0, agent
        assert got.usage["recomputed_tokens"] == 0, agent
    assert d.ctl("stop").returncode == 0


def test_status_answers_on_a_damaged_index_and_lookups_fail_in_one_line(daemon_factory):
    """Pages of the agents table and its key index garbled under a daemon: status still
    answers (exit 0) and says the index is damaged; agents and inspect fail in one line."""
    d = daemon_factory(args=ARGS)
    _many_agents(d.store / "cache")
    index = d.store / "cache" / "index.db"
    for name in ("agents", "sqlite_autoindex_agents_1"):
        pages = _child_pages(index, name)
        _garble_page(index, pages[len(pages) // 2])
    d.start()
    status = d.ctl("status")
    assert status.returncode == 0, status.stdout + status.stderr + d.log()
    assert "index damaged:" in status.stdout, status.stdout
    as_json = json.loads(d.ctl("status", "--json").stdout)
    assert as_json["running"] and "damaged" in as_json["store"]["index_error"]
    for cmd in (("agents",), ("inspect",), ("inspect", "agent-050")):
        out = d.ctl(*cmd)
        assert out.returncode == 1 and "Traceback" not in out.stderr, (cmd, out.stderr)
        (line,) = out.stderr.strip().splitlines()
        assert "damaged" in line, cmd
    assert d.ctl("stop").returncode == 0


def test_an_agent_cached_to_a_block_boundary_keeps_a_context_file_and_restores(
    loaded_models, tmp_path
):
    """A context cached to exactly its full blocks has no tail: its state file holds the
    context alone, and a rebuilt index restores it from the blocks, exactly."""
    model, tokenizer = loaded_models["llama"]
    rng = np.random.default_rng(3)
    root = tmp_path / "cache"
    engine = make_engine(model, tokenizer, block_size=BLOCK, store=CacheStore(root))
    held = 0
    for _ in range(3):  # a prompt that brings the context to a block boundary (no EOS)
        engine.submit("edge", random_tokens(rng, BLOCK - (held + 6) % BLOCK, VOCAB), max_tokens=6)
        run_all(engine)
        engine.store.flush()
        stored = engine.store.agent("edge", engine.spec.fingerprint)
        held = len(stored.tokens)
        if stored.stored_tokens % BLOCK == 0:
            break
    assert stored.stored_tokens % BLOCK == 0, "no turn ended on a block boundary"
    meta, _ = read_tensor_file(root / stored.state_file)
    assert meta["holds"] == "tokens"
    context = engine.agent_tokens("edge")
    engine.close()
    _lose_index(root, "missing")
    assert rebuild_index(root).agents == [f"edge@{engine.spec.fingerprint}"]
    again = make_engine(model, tokenizer, block_size=BLOCK, store=CacheStore(root))
    tail = random_tokens(rng, 3, VOCAB)
    again.submit("edge", tail, max_tokens=6)
    (done,) = run_all(again).values()
    assert done.usage.restored_tokens == stored.stored_tokens
    assert done.token_ids == scratch_tokens(model, context + tail, 6, eos=eos_ids(tokenizer))
    again.close()


def test_agents_evicted_by_the_disk_budget_come_back_from_a_rebuild(tmp_path):
    """Eviction drops an agent's cache files but keeps its tokens: in a state file of its
    context alone, so a lost index does not lose them."""
    root = tmp_path / "cache"
    store = CacheStore(root, disk_budget=1)  # every other agent's files go
    tokens = {}
    for i in range(3):
        rec = _turn(f"agent-{i}", seed=i)
        store.save_turn(rec)
        store.flush()
        tokens[rec.agent_id] = rec.tokens
    assert store.counters["evicted_agents"] >= 2
    store.close()
    _lose_index(root, "missing")
    report = rebuild_index(root)
    assert sorted(report.agents) == sorted(f"{a}@{FP}" for a in tokens)
    store = CacheStore(root)
    for agent_id, context in tokens.items():
        assert store.agent(agent_id, FP).tokens == context
    store.close()


def test_a_context_file_of_a_sliding_window_model_is_recomputed_not_corrupt(
    loaded_models, tmp_path
):
    """A corrupt block cuts a gemma3 agent (sliding windows) back to its first block and a
    state file of its context alone: no window state there, so the turn is recomputed,
    exactly, and that file is no corrupt file (it is kept, with the agent's tokens)."""
    model, tokenizer = loaded_models["gemma3_text"]
    rng = np.random.default_rng(9)
    root = tmp_path / "cache"
    engine = make_engine(model, tokenizer, block_size=BLOCK, store=CacheStore(root))
    engine.submit("g", random_tokens(rng, 3 * BLOCK + 5, VOCAB), max_tokens=6)
    run_all(engine)
    engine.store.flush()
    fp = engine.spec.fingerprint
    second = engine.store.agent("g", fp).block_hashes[1]
    context = engine.agent_tokens("g")
    engine.close()
    path = root / "blocks" / second[:2] / f"{second}.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 0xFF]))
    store = CacheStore(root)
    with pytest.raises(CorruptFileError):
        store.read_block(second, fp)  # found corrupt: the agent is cut back to block 0
    store.flush()
    cut = store.agent("g", fp)
    assert cut.stored_tokens == BLOCK and cut.tokens == context
    assert read_tensor_file(root / cut.state_file)[0]["holds"] == "tokens"
    store.close()
    again = make_engine(model, tokenizer, block_size=BLOCK, store=CacheStore(root))
    tail = random_tokens(rng, 3, VOCAB)
    again.submit("g", tail, max_tokens=6)
    (done,) = run_all(again).values()
    assert done.token_ids == scratch_tokens(model, context + tail, 6, eos=eos_ids(tokenizer))
    assert done.usage.recomputed_tokens == len(context)
    again.store.flush()
    assert again.store.counters["corrupt_files"] == 0  # the context file is no corrupt file
    again.close()
    quarantined = list((root / "quarantine").iterdir())
    assert [p.name.split(".")[0] for p in quarantined] == [second]
