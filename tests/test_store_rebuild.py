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
from refs import synthetic_turn

from agentkv.storage import (
    CacheStore,
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
    """The pages a table's root b-tree page points to (its interior page's children)."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = db.execute("PRAGMA page_size").fetchone()[0]
    (root_page,) = db.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)
    ).fetchone()
    db.close()
    page = path.read_bytes()[(root_page - 1) * size : root_page * size]
    assert page[0] == 0x05, "the table fits one page: add rows"  # an interior table page
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
