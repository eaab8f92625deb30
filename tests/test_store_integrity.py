"""What the store reads back from its index, and what it does to files because of it.

Real files, real SQLite, the tiny llama where an engine is involved. Covers: every garbage
value in an index row is a counted corrupt row, never an exception, and the context
survives whenever its tokens do; paths from the index never lead the store to read, move
or delete a file outside it; cutting an agent back after a corrupt file keeps refcounts
exact; new directories are fsynced; the index forgets a corrupt file before it is moved;
lookups answer while writes are queued; a store on a read-only file system serves
restores; the model table; a block removed between the engine's look and the write.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from refs import eos_ids, make_engine, random_tokens, run_all, scratch_tokens, synthetic_turn

from agentkv.storage import (
    CacheStore,
    CorruptFileError,
    StorageError,
    StoreClosedError,
    StoreWriteError,
)
from agentkv.storage import store as store_module
from agentkv.storage.records import BlockRecord, StoredAgent, TurnRecord
from agentkv.storage.tensor_files import (
    FileOps,
    HostTensor,
    read_tensor_file,
    read_tensor_meta,
)

BLOCK = 16
FP = "a" * 32
VOCAB = 768
GEN = 6


# -- helpers -------------------------------------------------------------------------------


def _record(agent_id: str, *, blocks: int = 2, tail: int = 4, shared: int = 0) -> TurnRecord:
    """A synthetic turn: `blocks` full blocks (the first `shared` common to every agent)
    and a tail in the state file."""
    return synthetic_turn(agent_id, FP, blocks=blocks, tail=tail, block_size=BLOCK, shared=shared)


def _sql(root: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """Run one statement on the index through a connection of our own."""
    db = sqlite3.connect(root / "index.db")
    try:
        rows = db.execute(sql, args).fetchall()
        db.commit()
        return rows
    finally:
        db.close()


def _refcounts_exact(root: Path) -> list[tuple]:
    """Blocks whose refcount is not the number of agent_blocks rows listing them."""
    return _sql(
        root,
        "SELECT hash, refcount FROM blocks WHERE refcount != "
        "(SELECT COUNT(*) FROM agent_blocks WHERE block_hash = hash)",
    )


def _stored(root: Path, *records: TurnRecord) -> None:
    """A closed store holding these turns."""
    store = CacheStore(root)
    for rec in records:
        store.save_turn(rec)
    store.close()


def _garbled(root: Path, sql: str) -> tuple[TurnRecord, CacheStore, StoredAgent | None]:
    """Agent "a" stored, `sql` run on the index, the store opened again and "a" looked up:
    its turn, the open store and the lookup (checked to count one corrupt row)."""
    rec = _record("a")
    _stored(root, rec)
    _sql(root, sql)
    store = CacheStore(root)
    stored = store.agent("a", FP)
    assert store.counters["corrupt_rows"] == 1
    return rec, store, stored


@pytest.fixture(scope="module")
def llama(loaded_models):
    """The tiny llama and its tokenizer."""
    return loaded_models["llama"]


def _turn(engine, agent_id: str, prompt: list[int]):
    engine.submit(agent_id, prompt, max_tokens=GEN)
    (completion,) = run_all(engine).values()
    assert completion.finish_reason != "error", completion.error
    return completion


def _exact(llama, context: list[int], prompt: list[int], completion) -> bool:
    model, tokenizer = llama
    want = scratch_tokens(model, context + prompt, GEN, eos=eos_ids(tokenizer))
    return completion.token_ids == want


# -- garbage in index rows -----------------------------------------------------------------

GARBAGE = {
    # sql -> whether the agent keeps its tokens (its cache is dropped either way)
    "UPDATE agents SET tokens = x'010203'": False,
    "UPDATE agents SET tokens = 'not a blob'": False,
    "UPDATE agents SET token_count = 'many'": True,
    "UPDATE agents SET token_count = token_count - 1": True,
    "UPDATE agents SET stored_tokens = 'garbage'": True,
    "UPDATE agents SET stored_tokens = -1": True,
    "UPDATE agents SET stored_tokens = 1.5": True,
    "UPDATE agents SET stored_tokens = 3": True,  # fewer than its blocks hold
    "UPDATE agents SET state_file = 42": True,
    "UPDATE agents SET state_checksum = NULL": True,
    "UPDATE agent_blocks SET block_hash = 'not hex!' WHERE seq = 1": True,
    "UPDATE agent_blocks SET block_hash = X'00ff' WHERE seq = 0": True,
    "UPDATE agent_blocks SET seq = 5 WHERE seq = 1": True,
    "DELETE FROM blocks": True,
}


@pytest.mark.parametrize("sql", GARBAGE)
def test_garbage_in_an_agent_row_is_a_counted_corrupt_row(tmp_path, sql):
    """Never raised; counted and logged; the tokens survive whenever the blob decodes,
    and the cache is then described as empty (it will be recomputed)."""
    rec, store, stored = _garbled(tmp_path, sql)
    if GARBAGE[sql]:
        assert stored.tokens == rec.tokens
        assert (stored.stored_tokens, stored.block_hashes, stored.state_file) == (0, [], None)
    else:
        assert stored is None
    assert store.agent_ids(FP) == ["a"]  # listing never parses what it does not need
    store.close()


@pytest.mark.parametrize(
    ("sql", "pinned", "last_used"),
    [
        ("UPDATE agents SET pinned = 'yes'", False, None),
        ("UPDATE agents SET last_used = 'yesterday'", False, 0.0),
    ],
)
def test_garbage_bookkeeping_is_counted_and_the_cache_kept(tmp_path, sql, pinned, last_used):
    """pinned and last_used do not describe the cache: garbage there is counted, defaulted,
    and repaired by the agent's next write."""
    rec, store, stored = _garbled(tmp_path, sql)
    assert stored.pinned is pinned and stored.stored_tokens == rec.stored_tokens
    if last_used is not None:
        assert stored.last_used == last_used
    store.save_turn(rec)
    store.flush()
    assert store.agent("a", FP).stored_tokens == rec.stored_tokens
    assert store.counters["corrupt_rows"] == 1  # the rewritten row is clean
    store.close()


def test_garbage_agent_ids_in_the_index_do_not_break_listing(tmp_path):
    """A row whose agent_id is not text is not listed (and listing does not raise)."""
    _stored(tmp_path, _record("a"))
    _sql(tmp_path, "UPDATE agents SET agent_id = X'0102'")  # a blob: TEXT affinity keeps it
    store = CacheStore(tmp_path)
    assert store.agent_ids() == [] and store.agent_ids(FP) == []
    store.close()


# -- paths read from the index never leave the store ---------------------------------------


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside the store that the store must never read, move or delete."""
    path = tmp_path / "outside" / "victim.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"precious")
    return path


def _state_rel(root: Path, agent_id: str) -> str:
    return _sql(root, "SELECT state_file FROM agents WHERE agent_id = ?", (agent_id,))[0][0]


@pytest.mark.parametrize("form", ["absolute", "dotdot", "other_agent"])
def test_state_file_outside_the_store_is_never_touched(tmp_path, victim, form):
    """A state_file the store did not name for this agent is a corrupt row: the agent
    keeps its tokens, and its next turn, a delete, gc and verify leave the file alone."""
    root = tmp_path / "store"
    _stored(root, _record("a"), _record("b"))
    bad = {
        "absolute": str(victim),
        "dotdot": os.path.relpath(victim, root),
        "other_agent": _state_rel(root, "b"),
    }[form]
    _sql(root, "UPDATE agents SET state_file = ? WHERE agent_id = 'a'", (bad,))
    store = CacheStore(root)
    stored = store.agent("a", FP)
    assert stored.tokens == _record("a").tokens and stored.state_file is None
    assert store.counters["corrupt_rows"] == 1
    assert store.verify().corrupt == [bad]
    store.save_turn(_record("a"))  # replaces the row: the old "state file" is not deleted
    store.flush()
    _sql(root, "UPDATE agents SET state_file = ? WHERE agent_id = 'a'", (bad,))
    store.delete_agent("a", FP)
    store.gc(dry_run=False)
    store.close()
    assert victim.read_bytes() == b"precious"
    assert (root / _state_rel(root, "b")).exists()  # b's own file is b's


def test_block_rows_pointing_outside_the_store_are_never_followed(tmp_path, victim):
    """A block row's path is never used: deleting the block deletes the file named after
    its hash, inside the store; verify reports the row."""
    root = tmp_path / "store"
    _stored(root, _record("a"))
    (h,) = _sql(root, "SELECT block_hash FROM agent_blocks WHERE seq = 1")[0]
    _sql(root, "UPDATE blocks SET path = ? WHERE hash = ?", (str(victim), h))
    store = CacheStore(root)
    assert store.verify().corrupt == [str(victim)]
    store.delete_agent("a", FP)
    report = store.gc(FP, dry_run=False)
    assert h in report.unreferenced_blocks
    assert not (root / "blocks" / h[:2] / f"{h}.safetensors").exists()
    store.close()
    assert victim.read_bytes() == b"precious"


def test_a_state_file_named_for_another_agent_is_never_moved(tmp_path):
    """A record naming another agent's state file is refused unread, and that file, which
    is the other agent's, stays where it is (only a file the store named for this agent
    goes to quarantine)."""
    _stored(tmp_path, _record("a"), _record("b"))
    store = CacheStore(tmp_path)
    theirs = _state_rel(tmp_path, "b")
    with pytest.raises(CorruptFileError, match="not a state file name"):
        store.read_state(dataclasses.replace(store.agent("a", FP), state_file=theirs))
    store.flush()
    assert (tmp_path / theirs).exists() and list((tmp_path / "quarantine").iterdir()) == []
    assert store.agent("b", FP).state_file == theirs
    store.close()


def test_symlinks_leading_out_of_the_store_are_never_followed(tmp_path, victim):
    """An agent's directory swapped for a symlink to elsewhere: its state file there is
    never read, moved to quarantine or deleted, and new state files are not written
    through it."""
    root = tmp_path / "store"
    _stored(root, _record("a"))
    rel = _state_rel(root, "a")
    agent_dir = (root / rel).parent
    for f in agent_dir.iterdir():
        f.unlink()
    agent_dir.rmdir()
    agent_dir.symlink_to(victim.parent, target_is_directory=True)
    (victim.parent / Path(rel).name).write_bytes(b"also precious")
    store = CacheStore(root)
    stored = store.agent("a", FP)
    with pytest.raises(CorruptFileError, match="symlink"):
        store.read_state(stored)
    store.save_turn(_record("a"))  # its state file cannot go there
    with pytest.raises(StoreWriteError, match="symlink"):
        store.flush()
    store.delete_agent("a", FP)
    store.gc(dry_run=False)
    store.close()
    assert victim.read_bytes() == b"precious"
    assert (victim.parent / Path(rel).name).read_bytes() == b"also precious"
    assert list((root / "quarantine").iterdir()) == []


def test_a_block_file_swapped_for_a_symlink_is_not_followed(tmp_path, victim):
    """A block file replaced by a symlink to a good copy outside the store: the restore
    path refuses it (counted corrupt, its views not trusted) rather than follow it, and
    quarantining acts on the link, never on the file it points at."""
    root = tmp_path / "store"
    _stored(root, _record("a"))
    store = CacheStore(root)
    digest = store.agent("a", FP).block_hashes[0]
    path = store.block_path(digest)
    tensors = store.read_block(digest, FP)
    outside = victim.parent / path.name
    good = path.read_bytes()
    outside.write_bytes(good)  # a valid file: following the link would work
    path.unlink()
    path.symlink_to(outside)
    dests = {name: HostTensor(t.dtype, np.zeros_like(t.data)) for name, t in tensors.items()}
    assert store.read_blocks_into(FP, [(digest, dests)]) == [False]
    store.flush()
    assert store.counters["corrupt_files"] == 1 and store.counters["blocks_read"] == 1
    (moved,) = (root / "quarantine").iterdir()  # the link itself went aside
    assert moved.is_symlink() and not path.is_symlink() and not path.exists()
    assert outside.is_file() and outside.read_bytes() == good
    store.close()


def test_a_turn_over_a_state_file_outside_the_store_keeps_it(llama, tmp_path, victim):
    """The reported case: state_file set to a file outside, then one daemon turn."""
    model, tokenizer = llama
    root = tmp_path / "store"
    engine = make_engine(
        model, tokenizer, block_size=BLOCK, total_blocks=64, store=CacheStore(root)
    )
    prompt = random_tokens(np.random.default_rng(3), 40, VOCAB)
    _turn(engine, "a", prompt)
    context = engine.agent_tokens("a")
    engine.close()
    _sql(root, "UPDATE agents SET state_file = ?", (str(victim),))
    engine = make_engine(
        model, tokenizer, block_size=BLOCK, total_blocks=64, store=CacheStore(root)
    )
    c = _turn(engine, "a", [5, 6, 7])
    assert _exact(llama, context, [5, 6, 7], c)
    assert c.usage.recomputed_tokens == len(context)  # the cache was not trusted
    assert engine.store.counters["corrupt_rows"] == 1
    engine.close()
    assert victim.read_bytes() == b"precious"


# -- corrupt files cut agents back consistently ---------------------------------------------


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_shared_block_cuts_every_owner_and_keeps_refcounts_exact(tmp_path):
    """Both agents listing a corrupt block keep the blocks before it; stored_tokens says
    what those hold, the blocks after it become unreferenced (the disk budget and gc can
    free them), state files that no longer apply are deleted, refcounts stay exact."""
    a, b = _record("a", blocks=3, shared=2), _record("b", blocks=3, shared=2)
    _stored(tmp_path, a, b)
    bad = a.blocks[1].block_hash  # shared, second
    states = [_state_rel(tmp_path, x) for x in ("a", "b")]
    store = CacheStore(tmp_path)
    path = store.block_path(bad)
    _flip(path)
    with pytest.raises(CorruptFileError):
        store.read_block(bad, FP)
    store.flush()
    assert _refcounts_exact(tmp_path) == []
    for rec in (a, b):
        stored = store.agent(rec.agent_id, FP)
        assert stored.block_hashes == [rec.blocks[0].block_hash]
        assert stored.stored_tokens == BLOCK
        _assert_context_file(tmp_path, stored, rec.tokens)
    assert not any((tmp_path / s).exists() for s in states)
    unreferenced = {h for (h,) in _sql(tmp_path, "SELECT hash FROM blocks WHERE refcount = 0")}
    assert unreferenced == {a.blocks[2].block_hash, b.blocks[2].block_hash}
    assert not path.exists() and len(list((tmp_path / "quarantine").iterdir())) == 1
    assert store.gc(FP).orphan_files == [] and store.verify().corrupt == []
    store.close()


def _assert_context_file(root: Path, stored: StoredAgent, tokens: list[int]) -> None:
    """The agent's state file holds its context alone now (tokens and its blocks left)."""
    meta, tensors = read_tensor_file(root / stored.state_file)
    assert meta["holds"] == "tokens" and int(meta["token_count"]) == stored.stored_tokens
    assert tensors["context.tokens"].data.tolist() == tokens
    assert [bytes(r).hex() for r in tensors["context.blocks"].data] == stored.block_hashes


def test_corrupt_state_file_keeps_the_agents_blocks(tmp_path):
    """A bad state file is dropped; the agent keeps its blocks and says so."""
    rec = _record("a", blocks=2)
    _stored(tmp_path, rec)
    store = CacheStore(tmp_path)
    stored = store.agent("a", FP)
    _flip(tmp_path / stored.state_file)
    with pytest.raises(CorruptFileError):
        store.read_state(stored)
    store.flush()
    again = store.agent("a", FP)
    assert again.block_hashes == stored.block_hashes
    assert again.stored_tokens == 2 * BLOCK and again.state_file != stored.state_file
    _assert_context_file(tmp_path, again, rec.tokens)
    assert _refcounts_exact(tmp_path) == []
    store.close()


def test_index_forgets_a_corrupt_file_before_it_is_moved_aside(tmp_path):
    """When the file moves to quarantine, the index no longer lists it (a crash between
    the two leaves a stray file, not a row pointing at nothing)."""
    seen = []

    class WatchQuarantine(FileOps):
        def replace(self, src: Path, dst: Path) -> None:
            if dst.parent.name == "quarantine":
                seen.append(_sql(tmp_path, "SELECT COUNT(*) FROM blocks WHERE hash = ?", (h,)))
            super().replace(src, dst)

    rec = _record("a")
    _stored(tmp_path, rec)
    h = rec.blocks[0].block_hash
    store = CacheStore(tmp_path, file_ops=WatchQuarantine())
    _flip(store.block_path(h))
    with pytest.raises(CorruptFileError):
        store.read_block(h, FP)
    store.flush()
    assert seen == [[(0,)]]
    store.close()


# -- directories are durable ---------------------------------------------------------------


def test_new_directories_are_fsynced_in_their_parent(tmp_path):
    """Creating blocks/<ab>/ or agents/<key>/ is followed by an fsync of its parent."""
    synced = []

    class RecordSyncs(FileOps):
        def fsync_dir(self, path: Path) -> None:
            synced.append(Path(path))
            super().fsync_dir(path)

    root = tmp_path / "store"
    store = CacheStore(root, file_ops=RecordSyncs())
    assert root in synced and tmp_path in synced  # the store's own directories
    rec = _record("a")
    store.save_turn(rec)
    store.flush()
    state_dir = (root / store.agent("a", FP).state_file).parent
    for made in [store.block_path(b.block_hash).parent for b in rec.blocks] + [state_dir]:
        assert synced.index(made.parent) < synced.index(made)  # the entry, then its files
    store.close()


# -- lookups do not wait for queued writes -------------------------------------------------


class HeldDisk(FileOps):
    """Writes wait until `release` is set (a very slow disk)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def writev(self, fd: int, buffers: list) -> int:
        """Write once released."""
        assert self.release.wait(60)
        return super().writev(fd, buffers)


def test_lookups_answer_while_writes_are_queued(tmp_path):
    """agent/agent_ids see a queued turn and hide a queued delete at once; wait=True waits
    for the agent's own writes; afterwards the index says the same."""
    _stored(tmp_path, _record("old"))
    disk = HeldDisk()
    store = CacheStore(tmp_path, file_ops=disk)
    new = _record("new")
    store.save_turn(new)
    store.delete_agent("old", FP)
    tic = time.monotonic()
    seen = store.agent("new", FP)
    assert seen.tokens == new.tokens and seen.state_file is None
    assert store.agent("old", FP) is None
    assert store.agent_ids(FP) == ["new"] and store.agent_ids() == ["new"]
    assert time.monotonic() - tic < 1.0 and not store.is_settled("new")
    waited = threading.Thread(target=lambda: seen_after.append(store.agent("new", FP, wait=True)))
    seen_after: list = []
    waited.start()
    time.sleep(0.2)
    assert seen_after == []  # still waiting for the held write
    disk.release.set()
    waited.join(30)
    assert seen_after[0].state_file is not None and seen_after[0].tokens == new.tokens
    store.flush()
    assert store.agent_ids(FP) == ["new"] and store.agent("old", FP) is None
    store.close()


def test_waiting_for_a_stuck_writer_is_bounded(tmp_path, monkeypatch):
    """agent(wait=True) gives up on a writer stuck past SETTLE_WAIT_S and answers from the
    index: the turn on disk, never the queued one whose files do not exist yet."""
    monkeypatch.setattr(store_module, "SETTLE_WAIT_S", 0.3)
    old = _record("held")
    _stored(tmp_path, old)
    disk = HeldDisk()
    store = CacheStore(tmp_path, file_ops=disk)
    newer = _record("held", blocks=3)
    assert newer.tokens != old.tokens
    store.save_turn(newer)
    tic = time.monotonic()
    seen = store.agent("held", FP, wait=True)
    assert 0.25 < time.monotonic() - tic < 10.0
    assert seen.tokens == old.tokens and seen.state_file is not None
    disk.release.set()
    store.close()


def test_a_failed_queued_turn_leaves_what_was_on_disk(tmp_path):
    """Once a queued turn fails, lookups show the agent as the disk has it."""

    class Full(FileOps):
        def writev(self, fd: int, buffers: list) -> int:
            raise OSError(28, "No space left on device")

    first = _record("a", blocks=1)
    _stored(tmp_path, first)
    store = CacheStore(tmp_path, file_ops=Full())
    longer = _record("a", blocks=2)
    store.save_turn(longer)
    assert store.agent("a", FP).tokens == longer.tokens
    with pytest.raises(StoreWriteError):
        store.flush()
    assert store.agent("a", FP).tokens == first.tokens
    store.close()


# -- a block removed between the engine's look and the write --------------------------------


def test_block_evicted_after_has_block_does_not_fail_the_turn(tmp_path):
    """The engine sends no bytes for a block on disk; if the disk budget removes it before
    the turn is written, the turn is stored up to that block, and is not an error."""
    x = _record("x", blocks=1, tail=0)
    _stored(tmp_path, x)
    shared = x.blocks[0].block_hash
    store = CacheStore(tmp_path, disk_budget=1)  # anything unreferenced goes
    store.delete_agent("x", FP)
    store.flush()
    assert store.has_block(shared)  # the engine looks: on disk, no bytes needed
    store.save_turn(_record("z", blocks=1))  # over budget: the unreferenced block goes
    store.flush()
    follower = _record("y", blocks=2)
    follower.blocks[0] = BlockRecord(shared, BLOCK, None)
    store.save_turn(follower)
    store.flush()  # no StoreWriteError
    stored = store.agent("y", FP)
    assert stored.tokens == follower.tokens
    assert (stored.block_hashes, stored.stored_tokens) == ([], 0)
    # Its state file holds its tokens alone (what a rebuilt index takes them from).
    assert read_tensor_meta(tmp_path / stored.state_file)["holds"] == "tokens"
    assert _refcounts_exact(tmp_path) == []
    store.close()


# -- gc runs between writes ----------------------------------------------------------------


def test_gc_with_writes_queued_never_removes_what_they_commit(tmp_path):
    """A real gc asked for while turns are still being written runs between two of them:
    every file the index lists afterwards exists and verifies."""
    disk = HeldDisk()
    store = CacheStore(tmp_path, file_ops=disk)
    for name in ("a", "b", "c"):
        store.save_turn(_record(name))
    result: list = []
    gc = threading.Thread(target=lambda: result.append(store.gc(FP, dry_run=False)))
    gc.start()
    time.sleep(0.2)
    for name in ("d", "e"):
        store.save_turn(_record(name))
    disk.release.set()
    gc.join(30)
    store.flush()
    assert result and result[0].orphan_files == []
    assert store.verify().corrupt == [] and store.verify().checked == 5 * 3
    store.close()


def test_gc_and_writes_racing_close_finish_or_raise_closed(tmp_path):
    """close() on one thread while another keeps asking for real gc runs and writes: every
    call completes or raises StoreClosedError, none waits forever for a writer that
    stopped, and the store opens again with what landed."""
    for trial in range(12):
        root = tmp_path / str(trial)
        store = CacheStore(root)
        ended: list = []

        def hammer(store=store, ended=ended):
            try:
                while True:
                    store.gc(FP, dry_run=False)
                    store.save_turn(_record("a"))
            except StoreClosedError:
                ended.append("closed")

        caller = threading.Thread(target=hammer, daemon=True)
        caller.start()
        time.sleep(0.005 * (trial % 4))
        store.close()
        store.close()  # a second close is a no-op
        caller.join(30)
        assert not caller.is_alive() and ended == ["closed"]
        reopened = CacheStore(root)
        assert reopened.verify().corrupt == []
        reopened.close()


# -- the models table ----------------------------------------------------------------------


def test_model_row_records_the_model_id_and_config(llama, tmp_path):
    """The engine records the model's config as JSON and the id it was given (by default
    its model type); a later engine with an id fills it in."""
    model, tokenizer = llama
    make_engine(model, tokenizer, store=CacheStore(tmp_path)).close()
    ((model_id, config, block_size),) = _sql(
        tmp_path, "SELECT model_id, config, block_size FROM models"
    )
    assert model_id == "llama" and block_size == 16
    assert json.loads(config)["model_type"] == "llama"
    assert json.loads(config)["hidden_size"] == model.args.hidden_size
    engine = make_engine(model, tokenizer, store=CacheStore(tmp_path), model_id="/models/tiny")
    engine.close()
    assert _sql(tmp_path, "SELECT model_id FROM models") == [("/models/tiny",)]


# -- read-only file systems ----------------------------------------------------------------


class ReadOnlyFs(FileOps):
    """Reports the file system as mounted read-only (for hosts where a test cannot mount)."""

    def is_read_only(self, path: Path) -> bool:
        """Always read-only."""
        return True


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def read_only_fs(tmp_path):
    """A real tmpfs, writable until `remount_ro()` is called; skipped where we cannot mount."""
    where = tmp_path / "mnt"
    where.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=64m", "agentkv-test", str(where))
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield where, lambda: _mount("-o", "remount,ro", str(where))
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _serve_read_only(llama, root: Path, file_ops: FileOps | None) -> None:
    """An agent stored before, then an engine on the read-only store: the restore is exact,
    writes fail with StoreWriteError, and later turns are served from memory."""
    model, tokenizer = llama
    store = CacheStore(root, file_ops=file_ops)
    assert store.read_only
    engine = make_engine(model, tokenizer, block_size=BLOCK, total_blocks=64, store=store)
    context = store.agent("a", engine.spec.fingerprint).tokens
    c = _turn(engine, "a", [5, 6, 7])
    assert _exact(llama, context, [5, 6, 7], c) and c.usage.restored_tokens == len(context)
    with pytest.raises(StoreWriteError, match="read-only"):
        store.flush()
    later = engine.agent_tokens("a")
    c = _turn(engine, "a", [9])
    assert _exact(llama, later, [9], c) and c.usage.cached_tokens == len(later)
    with pytest.raises(StoreWriteError, match="read-only"):
        store.flush()
    assert store.verify().corrupt == [] and store.gc(engine.spec.fingerprint).dry_run
    with pytest.raises(StoreWriteError):
        store.gc(dry_run=False)
    engine.close()  # logs the failed writes, does not raise


def _store_one_agent(llama, root: Path) -> None:
    model, tokenizer = llama
    engine = make_engine(
        model, tokenizer, block_size=BLOCK, total_blocks=64, store=CacheStore(root)
    )
    _turn(engine, "a", random_tokens(np.random.default_rng(4), 40, VOCAB))
    engine.close()


def test_store_on_a_read_only_file_system_serves_restores(llama, read_only_fs):
    """A real read-only mount: the store opens read-only, an agent is restored exactly,
    its write-back fails with StoreWriteError, and memory keeps serving it."""
    where, remount_ro = read_only_fs
    _store_one_agent(llama, where / "store")
    remount_ro()
    with pytest.raises(OSError):
        (where / "probe").write_bytes(b"")
    _serve_read_only(llama, where / "store", None)
    with pytest.raises(StoreWriteError):  # no store there to open, none can be made
        CacheStore(where / "missing")


def test_store_reported_read_only_opens_read_only(llama, tmp_path):
    """The same through the file-layer seam, where mounting is not allowed (EROFS is what
    the write path would get; here the seam reports the mount flag)."""
    _store_one_agent(llama, tmp_path)
    _serve_read_only(llama, tmp_path, ReadOnlyFs())


def test_read_only_store_without_an_index_is_a_storage_error(tmp_path):
    """Nothing to read: a typed error, not a raw sqlite3 one."""
    for sub in ("blocks", "agents", "quarantine"):
        (tmp_path / sub).mkdir()
    with pytest.raises(StorageError):
        CacheStore(tmp_path, file_ops=ReadOnlyFs())


# -- a damaged index -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE agents",
        "DROP TABLE agent_blocks",
        "DROP TABLE blocks",
        "ALTER TABLE agents DROP COLUMN state_bytes",
        "UPDATE meta SET value = 'abc' WHERE key = 'schema_version'",
        "UPDATE meta SET value = NULL WHERE key = 'schema_version'",
        "UPDATE meta SET value = '1.0' WHERE key = 'schema_version'",
    ],
)
def test_an_index_missing_what_it_needs_is_a_storage_error_at_open(tmp_path, sql):
    """Tables or columns gone, a garbage schema version: opening says so with a typed
    error, and leaves the store unlocked (the next open gets the same answer, not
    StoreLockedError)."""
    _stored(tmp_path, _record("a"))
    _sql(tmp_path, sql)
    for _ in range(2):
        with pytest.raises(StorageError) as caught:
            CacheStore(tmp_path)
        assert type(caught.value) is StorageError


def _garble_table_page(root: Path, table: str) -> None:
    """Overwrite the root b-tree page of one table with random bytes (page 1 intact)."""
    db = sqlite3.connect(root / "index.db")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = db.execute("PRAGMA page_size").fetchone()[0]
    (page,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    db.close()
    with open(root / "index.db", "r+b") as f:
        f.seek((page - 1) * size)
        f.write(np.random.default_rng(0).bytes(size))


@pytest.mark.parametrize("table", ["agents", "agent_blocks"])
def test_a_garbled_index_page_fails_lookups_with_a_storage_error(llama, tmp_path, table):
    """Damage opening cannot see (a table's page): the lookups that meet it raise the
    store's StorageError, through the engine too, never SQLite's own errors."""
    model, tokenizer = llama
    engine = make_engine(model, tokenizer, block_size=BLOCK, store=CacheStore(tmp_path))
    _turn(engine, "a", random_tokens(np.random.default_rng(0), 40, VOCAB))
    fingerprint = engine.spec.fingerprint
    engine.close()
    _garble_table_page(tmp_path, table)
    store = CacheStore(tmp_path)
    with pytest.raises(StorageError, match="damaged"):
        store.agent("a", fingerprint)
    store.close()
    engine = make_engine(model, tokenizer, block_size=BLOCK, store=CacheStore(tmp_path))
    with pytest.raises(StorageError, match="damaged"):
        engine.submit("a", [1, 2, 3], max_tokens=GEN)
    engine.close()


def test_lookups_after_close_raise_closed_errors(llama, tmp_path):
    from agentkv.daemon import EngineClosedError

    _stored(tmp_path, _record("a"))
    store = CacheStore(tmp_path)
    store.close()
    for lookup in (
        lambda: store.agent("a", FP),
        lambda: store.agent("a", FP, wait=True),
        lambda: store.agent_ids(),
        lambda: store.stats(),
    ):
        with pytest.raises(StoreClosedError):
            lookup()
    model, tokenizer = llama
    engine = make_engine(model, tokenizer, block_size=BLOCK, store=CacheStore(tmp_path))
    engine.close()
    for call in (
        engine.agent_ids,
        lambda: engine.agent_info("a"),
        lambda: engine.agent_tokens("a"),
        lambda: engine.delete_agent("a"),
        lambda: engine.fork_agent("a", "b"),
    ):
        with pytest.raises(EngineClosedError):
            call()


def test_stored_token_ids_outside_the_vocabulary_are_a_counted_corrupt_row(llama, tmp_path):
    """The agent is treated as new (its tokens cannot be fed to the model), and the row
    is counted, like any garbage in the index."""
    model, tokenizer = llama
    engine = make_engine(model, tokenizer, block_size=BLOCK, store=CacheStore(tmp_path))
    _turn(engine, "a", random_tokens(np.random.default_rng(0), 20, VOCAB))
    engine.close()
    blob = np.array([VOCAB + 5] * 10, dtype="<i4").tobytes()
    _sql(tmp_path, "UPDATE agents SET tokens = ?, token_count = 10, stored_tokens = 0", (blob,))
    engine = make_engine(model, tokenizer, block_size=BLOCK, store=CacheStore(tmp_path))
    assert engine.store.counters["corrupt_rows"] == 0
    with pytest.raises(Exception, match="unknown agent"):
        engine.agent_info("a")
    assert engine.store.counters["corrupt_rows"] == 1
    engine.close()
