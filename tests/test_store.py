"""CacheStore on real files, real SQLite and, where an engine is involved, real mlx-lm.

Covers the safetensors writer/reader, the index schema, shared prefixes stored once, disk
full and read-only disks, the disk budget, gc and verify, agent ids never used as paths,
and restores that read exactly the files of the agent being restored.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors
from refs import eos_ids, make_engine, random_tokens, run_all, scratch_tokens, synthetic_turn

from agentkv.daemon import ModelCacheSpec
from agentkv.daemon.errors import InvalidRequestError
from agentkv.storage import (
    CacheStore,
    CorruptFileError,
    StorageError,
    StoreLockedError,
    StoreWriteError,
    UnknownStoredAgentError,
    maintenance,
)
from agentkv.storage.maintenance import collect_garbage
from agentkv.storage.records import BlockRecord, TurnRecord
from agentkv.storage.schema import open_index, schema_version
from agentkv.storage.tensor_files import (
    FileOps,
    HostTensor,
    read_tensor_file,
    read_tensor_file_into,
    write_tensor_file,
)

VOCAB = 768
BLOCK = 16
GEN = 8  # tokens generated per turn
FOREIGN = "f" * 32  # a fingerprint no test model has


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(loaded_models):
    """The tiny llama and its tokenizer."""
    return loaded_models["llama"]


def _engine(model, tokenizer, store: CacheStore):
    return make_engine(model, tokenizer, block_size=BLOCK, total_blocks=64, store=store)


def _turn(engine, agent_id: str, prompt: list[int]):
    engine.submit(agent_id, prompt, max_tokens=GEN)
    (completion,) = run_all(engine).values()
    return completion


def _turns(engine, prompts: dict[str, list[int]]) -> dict:
    for agent_id, prompt in prompts.items():
        engine.submit(agent_id, prompt, max_tokens=GEN)
    return {c.agent_id: c for c in run_all(engine).values()}


def _assert_exact(llama, context: list[int], prompt: list[int], completion) -> None:
    """The completion is what mlx-lm computes from scratch for the whole context."""
    model, tokenizer = llama
    assert completion.finish_reason != "error", completion.error
    expected = scratch_tokens(model, context + prompt, GEN, eos=eos_ids(tokenizer))
    assert completion.token_ids == expected


def _prompts(seed: int, names, n: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    return {name: random_tokens(rng, n, VOCAB) for name in names}


def _files(root: Path, sub: str = "") -> set[str]:
    """Paths (relative to root) of everything but directories under root/sub."""
    return {p.relative_to(root).as_posix() for p in (root / sub).rglob("*") if not p.is_dir()}


def _index(root: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """Rows of a query on the index, through a connection of our own."""
    db = sqlite3.connect(root / "index.db")
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def _index_dump(root: Path) -> dict[str, list[tuple]]:
    return {
        table: _index(root, f"SELECT * FROM {table} ORDER BY 1, 2")
        for table in ("agents", "agent_blocks", "blocks")
    }


def _block_file(root: Path, block_hash: str) -> Path:
    return root / "blocks" / block_hash[:2] / f"{block_hash}.safetensors"


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _record(agent_id: str, fingerprint: str, *, blocks: int = 1, tail: int = 4) -> TurnRecord:
    """A turn of small synthetic tensors (no model): `blocks` full blocks plus a tail."""
    return synthetic_turn(agent_id, fingerprint, blocks=blocks, tail=tail, block_size=BLOCK)


class FaultyOps(FileOps):
    """File ops whose `method` fails with `err` once `allowed` more calls have succeeded.

    `allowed=None` never fails. `delay` seconds pass before each failure (a slow disk).
    Only the store's writer thread calls these; tests change `allowed` between flushes.
    """

    def __init__(self, method: str, err: int, allowed: int | None = None, delay: float = 0.0):
        self.method, self.err, self.allowed, self.delay = method, err, allowed, delay
        self.failures = 0

    def _check(self, method: str) -> None:
        if method != self.method or self.allowed is None:
            return
        if self.allowed > 0:
            self.allowed -= 1
            return
        time.sleep(self.delay)
        self.failures += 1
        raise OSError(self.err, os.strerror(self.err))

    def open_new(self, path: Path) -> int:
        """Create the temp file, unless it is this method's turn to fail."""
        self._check("open_new")
        return super().open_new(path)

    def writev(self, fd: int, buffers: list) -> int:
        """Write, unless it is this method's turn to fail."""
        self._check("writev")
        return super().writev(fd, buffers)


# -- tensor files --------------------------------------------------------------------------

_RNG = np.random.default_rng(0)
TENSORS = {
    "float32": HostTensor("float32", _RNG.standard_normal((3, 5)).astype(np.float32)),
    "float16": HostTensor("float16", _RNG.standard_normal((2, 3, 4)).astype(np.float16)),
    "bfloat16": HostTensor("bfloat16", _RNG.integers(0, 2**16, (4, 7), dtype=np.uint16)),
    "int32": HostTensor("int32", np.arange(-5, 6, dtype=np.int32)),
    "empty": HostTensor("float32", np.zeros((0, 4), dtype=np.float32)),
    "odd": HostTensor("float16", _RNG.standard_normal((1, 3, 5, 7)).astype(np.float16)),
    "strided": HostTensor("float32", _RNG.standard_normal((6, 5)).astype(np.float32).T),
    "scalar": HostTensor("float32", np.array(2.5, dtype=np.float32)),
    "one": HostTensor("int32", np.array([7], dtype=np.int32)),
    "ones": HostTensor("float32", np.ones((1, 1, 1), dtype=np.float32)),
}
META = {"format": "test", "fingerprint": "abc", "layers": json.dumps([{"i": 0}]), "n": "3"}


@pytest.mark.parametrize("name", TENSORS)
def test_tensor_file_round_trip(tmp_path, name):
    """Every dtype and shape comes back bit for bit, with its metadata and checksum."""
    path = tmp_path / "t.safetensors"
    written = write_tensor_file(path, {name: TENSORS[name]}, META)
    meta, tensors = read_tensor_file(path)
    assert meta == {**META, "checksum": written.checksum}
    got = tensors[name]
    assert got.dtype == TENSORS[name].dtype
    assert got.data.shape == TENSORS[name].data.shape
    assert got.data.dtype == TENSORS[name].data.dtype
    np.testing.assert_array_equal(got.data, TENSORS[name].data)
    assert written.nbytes == path.stat().st_size


def test_tensor_file_opens_with_safetensors(tmp_path):
    """Plain safetensors: the library reads every tensor; bfloat16 is tagged BF16."""
    path = tmp_path / "all.safetensors"
    write_tensor_file(path, TENSORS, META)
    with safetensors.safe_open(path, "numpy") as f:
        assert list(f.keys()) == sorted(TENSORS)
        assert f.metadata() == read_tensor_file(path)[0]
        for name, t in TENSORS.items():
            if t.dtype == "bfloat16":  # numpy has no bfloat16: check the header only
                assert f.get_slice(name).get_dtype() == "BF16"
                assert f.get_slice(name).get_shape() == list(t.data.shape)
            else:
                np.testing.assert_array_equal(f.get_tensor(name), t.data)
    _, tensors = read_tensor_file(path)
    for name, t in TENSORS.items():
        np.testing.assert_array_equal(tensors[name].data, t.data)


def test_tensor_file_write_is_atomic(tmp_path):
    """No temp file is left; a failed overwrite keeps the old file whole."""
    path = tmp_path / "t.safetensors"
    write_tensor_file(path, {"x": TENSORS["float32"]}, META)
    write_tensor_file(path, {"x": TENSORS["odd"]}, META)  # overwrite in place
    assert os.listdir(tmp_path) == ["t.safetensors"]
    before = path.read_bytes()
    for ops in (FaultyOps("writev", errno.ENOSPC, 0), FaultyOps("open_new", errno.EROFS, 0)):
        with pytest.raises(OSError) as info:
            write_tensor_file(path, {"x": TENSORS["int32"]}, META, ops)
        assert info.value.errno == ops.err
        assert os.listdir(tmp_path) == ["t.safetensors"]
        assert path.read_bytes() == before


def test_leftover_temp_file_does_not_block_writes(tmp_path):
    """A temp file a crashed writer left (same pid, e.g. pid 1 in a container) is no obstacle."""
    path = tmp_path / "t.safetensors"
    (tmp_path / f".t.safetensors.{os.getpid()}.tmp").write_bytes(b"torn")
    write_tensor_file(path, {"x": TENSORS["float32"]}, META)
    np.testing.assert_array_equal(read_tensor_file(path)[1]["x"].data, TENSORS["float32"].data)


def _header_bytes(raw: bytes) -> tuple[int, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8 : 8 + n]


def _flip_data(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 0x01])


def _truncate(raw: bytes) -> bytes:
    return raw[:-10]


def _garbage_header(raw: bytes) -> bytes:
    n, _ = _header_bytes(raw)
    return raw[:8] + b"\x00garbage" * (n // 8) + raw[8 + n :]


def _huge_header_length(raw: bytes) -> bytes:
    return struct.pack("<Q", 2**40) + raw[8:]


def _header_not_object(raw: bytes) -> bytes:
    n, _ = _header_bytes(raw)
    return raw[:8] + b"[]".ljust(n) + raw[8 + n :]


def _shape_off_by_one(raw: bytes) -> bytes:
    return raw.replace(b'"shape":[3,5]', b'"shape":[3,4]', 1)


def _shorter_than_length_field(raw: bytes) -> bytes:
    return raw[:5]


@pytest.mark.parametrize(
    "damage",
    [
        _flip_data,
        _truncate,
        _garbage_header,
        _huge_header_length,
        _header_not_object,
        _shape_off_by_one,
        _shorter_than_length_field,
    ],
)
def test_damaged_tensor_file_raises_corrupt_file_error(tmp_path, damage):
    """Every kind of damage is a CorruptFileError, never a crash or wrong data."""
    path = tmp_path / "t.safetensors"
    write_tensor_file(path, {"x": TENSORS["float32"], "e": TENSORS["empty"]}, META)
    raw = path.read_bytes()
    damaged = damage(raw)
    assert damaged != raw
    path.write_bytes(damaged)
    with pytest.raises(CorruptFileError) as info:
        read_tensor_file(path)
    assert info.value.path == path


def _into(path):
    """read_tensor_file_into with destinations made from what the file should hold."""
    dests = {
        "x": HostTensor("float32", np.zeros((3, 5), np.float32)),
        "e": HostTensor("float32", np.zeros((0, 4), np.float32)),
    }
    return read_tensor_file_into(path, dests), dests


@pytest.mark.parametrize(
    "damage",
    [_flip_data, _truncate, _garbage_header, _huge_header_length, _header_not_object]
    + [_shape_off_by_one, _shorter_than_length_field],
)
def test_damaged_tensor_file_read_into_raises_corrupt_file_error(tmp_path, damage):
    """The restore path's reader catches the same damage as the plain one."""
    path = tmp_path / "t.safetensors"
    write_tensor_file(path, {"x": TENSORS["float32"], "e": TENSORS["empty"]}, META)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptFileError) as info:
        _into(path)
    assert info.value.path == path


@pytest.mark.parametrize("name", [n for n in TENSORS if n != "strided"])
def test_tensor_file_read_into_strided_rows_of_a_larger_buffer(tmp_path, name):
    """Bytes land in a strided view (rows of a bigger buffer) and nowhere else."""
    t = TENSORS[name]
    c = HostTensor("float32", np.arange(2 * 3 * 5 * 7, dtype=np.float32).reshape(2, 3, 5, 7))
    path = tmp_path / "t.safetensors"
    write_tensor_file(path, {"a": t, "b": TENSORS["odd"], "c": c}, META)
    # Each tensor's destination is every other row block of a buffer twice its size.
    big_a = np.full((2, *t.data.shape), 7, dtype=t.data.dtype)
    big_b = np.full((1, 3, 10, 7), 7, dtype=np.float16)
    # Rows whose leading dimensions cannot be taken as one (3 of 4 heads, 2 batches).
    big_c = np.full((2, 4, 10, 7), 7, dtype=np.float32)
    dests = {
        "a": HostTensor(t.dtype, big_a[1, ...]),
        "b": HostTensor("float16", big_b[:, :, 2:7, :]),
        "c": HostTensor("float32", big_c[:, 1:, 2:7, :]),
    }
    meta = read_tensor_file_into(path, dests)
    assert meta == read_tensor_file(path)[0]
    np.testing.assert_array_equal(big_a[1, ...], t.data)
    np.testing.assert_array_equal(big_b[:, :, 2:7, :], TENSORS["odd"].data)
    np.testing.assert_array_equal(big_c[:, 1:, 2:7, :], c.data)
    assert (big_a[0] == 7).all()
    assert (big_b[:, :, :2] == 7).all() and (big_b[:, :, 7:] == 7).all()
    assert (big_c[:, 0] == 7).all() and (big_c[:, :, :2] == 7).all()
    assert (big_c[:, :, 7:] == 7).all()


@pytest.mark.parametrize(
    "dests",
    [
        {"x": HostTensor("float32", np.zeros((3, 5), np.float32))},  # one tensor missing
        {
            "x": HostTensor("float32", np.zeros((3, 4), np.float32)),  # other shape
            "e": HostTensor("float32", np.zeros((0, 4), np.float32)),
        },
        {
            "x": HostTensor("float16", np.zeros((3, 5), np.float16)),  # other dtype
            "e": HostTensor("float32", np.zeros((0, 4), np.float32)),
        },
    ],
    ids=["missing", "shape", "dtype"],
)
def test_tensor_file_read_into_refuses_another_layout(tmp_path, dests):
    """A file that does not hold exactly the expected tensors is not read into buffers."""
    path = tmp_path / "t.safetensors"
    write_tensor_file(path, {"x": TENSORS["float32"], "e": TENSORS["empty"]}, META)
    with pytest.raises(CorruptFileError, match="expected"):
        read_tensor_file_into(path, dests)


def test_missing_tensor_file_raises_corrupt_file_error(tmp_path):
    """A missing file is reported the same way as a damaged one."""
    with pytest.raises(CorruptFileError, match="missing"):
        read_tensor_file(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    ("old", "new"),
    [(b'"F32"', b'"I32"'), (b'"fingerprint":"abc"', b'"fingerprint":"abd"')],
    ids=["dtype-tag", "metadata-value"],
)
def test_tampered_header_is_detected(tmp_path, old, new):
    """A header edited after writing (same length, valid JSON) must not read back."""
    path = tmp_path / "t.safetensors"
    write_tensor_file(path, {"x": TENSORS["float32"]}, META)
    raw = path.read_bytes()
    assert raw.count(old) == 1
    path.write_bytes(raw.replace(old, new))
    with pytest.raises(CorruptFileError):
        read_tensor_file(path)


# -- schema --------------------------------------------------------------------------------

DOCUMENTED = {
    "meta": ["key", "value"],
    "models": ["fingerprint", "model_id", "config", "block_size", "created"],
    "agents": [
        "agent_id",
        "fingerprint",
        "tokens",
        "token_count",
        "stored_tokens",
        "state_file",
        "state_checksum",
        "created",
        "last_used",
        "pinned",
        "state_bytes",
    ],
    "agent_blocks": ["agent_id", "fingerprint", "seq", "block_hash"],
    "blocks": [
        "hash",
        "fingerprint",
        "path",
        "bytes",
        "checksum",
        "token_count",
        "refcount",
        "created",
        "last_used",
    ],
}


def test_fresh_index_has_schema_v1_and_documented_tables(tmp_path):
    """A new index is at version 1 with the tables and columns `schema.py` documents."""
    db = open_index(tmp_path / "index.db")
    assert schema_version(db) == 1
    assert set(db.table_names()) == set(DOCUMENTED)
    for table, columns in DOCUMENTED.items():
        assert [c.name for c in db[table].columns] == columns, table
    assert db["agents"].pks == ["agent_id", "fingerprint"]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.conn.close()
    again = open_index(tmp_path / "index.db")  # reopening migrates nothing
    assert schema_version(again) == 1
    again.conn.close()


def test_index_from_a_newer_agentkv_is_refused(tmp_path):
    """schema_version 999 raises StorageError and is left as it was."""
    open_index(tmp_path / "index.db").conn.close()
    db = sqlite3.connect(tmp_path / "index.db")
    db.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StorageError, match="newer"):
        open_index(tmp_path / "index.db")
    with pytest.raises(StorageError, match="newer"):
        CacheStore(tmp_path)
    assert _index(tmp_path, "SELECT value FROM meta WHERE key = 'schema_version'") == [("999",)]


def test_index_that_is_not_a_database_is_refused(tmp_path):
    """A garbage index.db raises StorageError, not a raw sqlite3 error."""
    (tmp_path / "index.db").write_bytes(b"not a database" * 100)
    with pytest.raises(StorageError):
        CacheStore(tmp_path)


# -- shared prefixes -----------------------------------------------------------------------


def test_shared_prefix_is_stored_once_and_survives_deleting_one_agent(llama, tmp_path):
    """Two agents with one system prompt share its block files (refcount 2); deleting one
    keeps them for the other, which still resumes exactly after a restart."""
    model, tokenizer = llama
    rng = np.random.default_rng(1)
    system = random_tokens(rng, 4 * BLOCK, VOCAB)
    prompts = {
        "a": system + random_tokens(rng, 10, VOCAB),
        "b": system + random_tokens(rng, 12, VOCAB),
    }
    engine = _engine(model, tokenizer, CacheStore(tmp_path))
    fp = engine.spec.fingerprint
    for agent_id, c in _turns(engine, prompts).items():
        _assert_exact(llama, [], prompts[agent_id], c)
    store = engine.store
    store.flush()
    a, b = store.agent("a", fp), store.agent("b", fp)
    shared = a.block_hashes[:4]
    assert b.block_hashes[:4] == shared and a.block_hashes[4] != b.block_hashes[4]
    refcounts = dict(_index(tmp_path, "SELECT hash, refcount FROM blocks"))
    assert {refcounts[h] for h in shared} == {2}
    assert {refcounts[h] for h in a.block_hashes[4:] + b.block_hashes[4:]} == {1}
    distinct = set(a.block_hashes) | set(b.block_hashes)
    assert _files(tmp_path, "blocks") == {
        _block_file(tmp_path, h).relative_to(tmp_path).as_posix() for h in distinct
    }
    assert store.counters["blocks_written"] == len(distinct)  # the shared ones once

    engine.delete_agent("a")
    store.flush()
    assert store.agent("a", fp) is None
    refcounts = dict(_index(tmp_path, "SELECT hash, refcount FROM blocks"))
    assert {refcounts[h] for h in b.block_hashes} == {1}
    assert {refcounts.get(h, 0) for h in a.block_hashes[4:]} == {0}  # a's own: garbage
    assert all(_block_file(tmp_path, h).exists() for h in b.block_hashes)
    context = engine.agent_tokens("b")
    engine.close()

    again = _engine(model, tokenizer, CacheStore(tmp_path))
    c = _turn(again, "b", [5, 6, 7])
    _assert_exact(llama, context, [5, 6, 7], c)
    assert c.usage.restored_tokens == len(context) and c.usage.recomputed_tokens == 0
    assert again.store.agent("a", fp) is None
    again.close()


# -- disk full, read-only ------------------------------------------------------------------


def test_a_turn_whose_write_failed_is_written_again_at_close(llama, tmp_path):
    """Disk full for one write, on an agent's last turn before a clean stop: close() queues
    that agent again (the space is back), so the turn is not lost; after a restart its
    whole context is restored and the next turn is exact."""
    model, tokenizer = llama
    prompts = _prompts(3, ["first", "second", "third"], 30)
    ops = FaultyOps("writev", errno.ENOSPC)
    engine = _engine(model, tokenizer, CacheStore(tmp_path, file_ops=ops))
    fp = engine.spec.fingerprint
    _turn(engine, "a", prompts["first"])
    engine.store.flush()
    ops.allowed = 0  # the next write fails...
    _turn(engine, "a", prompts["second"])
    with pytest.raises(StoreWriteError):
        engine.store.flush()
    assert engine.store.unsaved("a", fp) is not None
    ops.allowed = None  # ...and then the disk has room again
    context = engine.agent_tokens("a")
    engine.close()

    again = _engine(model, tokenizer, CacheStore(tmp_path))
    assert again.store.agent("a", fp).tokens == context
    c = _turn(again, "a", prompts["third"])
    _assert_exact(llama, context, prompts["third"], c)
    assert c.usage.restored_tokens == len(context)
    again.close()


@pytest.mark.parametrize(
    ("method", "err"),
    [("writev", errno.ENOSPC), ("open_new", errno.EROFS)],
    ids=["enospc", "erofs"],
)
def test_failed_writes_keep_serving_and_keep_the_last_durable_state(llama, tmp_path, method, err):
    """Writes fail midway through a turn: completions stay exact, flush raises, the disk
    keeps the previous turn intact (restorable exactly), and no temp file is left."""
    model, tokenizer = llama
    prompts = _prompts(2, ["first", "second", "third"], 44)
    ops = FaultyOps(method, err)
    engine = _engine(model, tokenizer, CacheStore(tmp_path, file_ops=ops))
    fp = engine.spec.fingerprint
    _turn(engine, "a", prompts["first"])
    engine.store.flush()
    durable = engine.store.agent("a", fp)
    context = engine.agent_tokens("a")
    assert durable.tokens == context and durable.state_file is not None

    ops.allowed = 1  # one more block file goes through, then the disk is full / read-only
    c = _turn(engine, "a", prompts["second"])
    _assert_exact(llama, context, prompts["second"], c)
    with pytest.raises(StoreWriteError):
        engine.store.flush()
    later = engine.agent_tokens("a")
    c = _turn(engine, "a", prompts["third"])  # served from memory
    _assert_exact(llama, later, prompts["third"], c)
    assert c.usage.cached_tokens == len(later) and c.usage.restored_tokens == 0
    with pytest.raises(StoreWriteError):
        engine.store.flush()
    assert ops.failures == 2
    assert engine.store.counters["write_errors"] == 2
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    engine.close()  # logs the failed writes, does not raise

    store = CacheStore(tmp_path)
    stored = store.agent("a", fp)
    assert stored.tokens == context
    assert stored.block_hashes == durable.block_hashes
    assert (stored.state_file, stored.state_checksum) == (
        durable.state_file,
        durable.state_checksum,
    )
    assert store.verify().corrupt == []
    orphans = store.gc(fp).orphan_files  # the one block written before the failure
    assert len(orphans) == 1 and orphans[0].startswith("blocks/")
    again = _engine(model, tokenizer, store)
    c = _turn(again, "a", [5, 6, 7])
    _assert_exact(llama, context, [5, 6, 7], c)
    assert c.usage.restored_tokens == len(context)
    again.close()


def test_turn_after_the_disk_frees_up_is_durable_again(llama, tmp_path):
    """A turn that could not be written is followed by one that is, and restores exactly."""
    model, tokenizer = llama
    prompts = _prompts(3, ["first", "second"], 40)
    ops = FaultyOps("writev", errno.ENOSPC, allowed=0)
    engine = _engine(model, tokenizer, CacheStore(tmp_path, file_ops=ops))
    _turn(engine, "a", prompts["first"])
    with pytest.raises(StoreWriteError):
        engine.store.flush()
    ops.allowed = None
    _turn(engine, "a", prompts["second"])
    engine.store.flush()
    context = engine.agent_tokens("a")
    engine.close()

    again = _engine(model, tokenizer, CacheStore(tmp_path))
    assert again.store.verify().corrupt == []
    assert again.store.gc(again.spec.fingerprint).orphan_files == []
    c = _turn(again, "a", [5, 6, 7])
    _assert_exact(llama, context, [5, 6, 7], c)
    assert c.usage.restored_tokens == len(context)
    again.close()


def test_failed_write_is_reported_by_flush_not_by_submit(llama, tmp_path):
    """Looking an agent up (here, one whose delete is queued behind failing writes) never
    raises other turns' failures, which `flush` must still report."""
    model, tokenizer = llama
    prompts = _prompts(4, ["x", "y", "y2"], 20)
    ops = FaultyOps("writev", errno.ENOSPC, allowed=0, delay=0.3)  # a slow, full disk
    engine = _engine(model, tokenizer, CacheStore(tmp_path, file_ops=ops))
    _turns(engine, {"x": prompts["x"], "y": prompts["y"]})
    engine.delete_agent("y")  # queued behind the two failing writes
    c = _turn(engine, "y", prompts["y2"])  # the store is asked about "y": must not raise
    _assert_exact(llama, [], prompts["y2"], c)
    with pytest.raises(StoreWriteError):
        engine.store.flush()
    engine.close()


# -- disk budget ---------------------------------------------------------------------------


def _raw_block_bytes(model) -> int:
    """Bytes of one block's K/V tensors (files add a small header)."""
    spec = ModelCacheSpec.from_model(model, block_size=BLOCK)
    return sum(
        layer.n_kv_heads
        * (layer.k_head_dim + layer.v_head_dim)
        * BLOCK
        * np.dtype(layer.dtype).itemsize
        for layer in spec.layers
    )


def test_pinning_what_the_store_does_not_hold_is_a_typed_error(tmp_path):
    """A pin that could not apply is refused, never silently dropped: an agent not stored
    (or of another model), and arguments of the wrong type. A queued turn's agent counts."""
    store = CacheStore(tmp_path)
    store.save_turn(_record("a", FOREIGN))  # queued: pinnable at once
    store.set_pinned("a", FOREIGN)
    for agent_id, fingerprint in (("nobody", FOREIGN), ("a", "e" * 32)):
        with pytest.raises(UnknownStoredAgentError):
            store.set_pinned(agent_id, fingerprint)
    for args in ((["a"], FOREIGN, True), ("a", FOREIGN, "yes"), ("a", FOREIGN, None)):
        with pytest.raises(TypeError):
            store.set_pinned(*args)
    store.flush()
    assert store.agent("a", FOREIGN).pinned
    store.close()


def test_disk_budget_evicts_least_recently_used_unpinned_agents(llama, tmp_path):
    """Over budget, the LRU unpinned agents lose their files but keep their tokens; a pinned
    agent stays; an evicted agent that comes back is recomputed exactly."""
    model, tokenizer = llama
    # Every context is 3 full blocks plus a 4-token tail: three agents fit, four do not.
    budget = 11 * _raw_block_bytes(model)
    names = ["p", "a0", "a1", "a2", "a3"]
    prompts = _prompts(5, names, 3 * BLOCK + 4 - GEN)
    engine = _engine(model, tokenizer, CacheStore(tmp_path, disk_budget=budget))
    store, fp = engine.store, engine.spec.fingerprint
    contexts, before = {}, {}
    for name in names:  # one at a time: last_used follows this order
        _turn(engine, name, prompts[name])
        if name == "p":
            store.set_pinned("p", fp)
        store.flush()
        contexts[name] = engine.agent_tokens(name)
        before[name] = store.agent(name, fp)
        assert len(contexts[name]) == 3 * BLOCK + 4 and len(before[name].block_hashes) == 3

    assert store.counters["evicted_agents"] == 2
    for name in ("a0", "a1"):  # the least recently used, p being pinned
        stored = store.agent(name, fp)
        assert stored.tokens == contexts[name] and stored.stored_tokens == 0
        assert stored.block_hashes == []
        # What is left of it: a state file of its tokens alone (the index's only copy else).
        assert stored.state_file != before[name].state_file
        meta, tensors = read_tensor_file(tmp_path / stored.state_file)
        assert (
            meta["holds"] == "tokens"
            and tensors["context.tokens"].data.tolist() == (contexts[name])
        )
        assert not any(_block_file(tmp_path, h).exists() for h in before[name].block_hashes)
        assert not (tmp_path / before[name].state_file).exists()
    kept = [h for name in ("p", "a2", "a3") for h in before[name].block_hashes]
    assert _files(tmp_path, "blocks") == {
        _block_file(tmp_path, h).relative_to(tmp_path).as_posix() for h in kept
    }
    for name in ("p", "a2", "a3"):
        assert store.agent(name, fp).stored_tokens == len(contexts[name])
    assert store.stats()["block_bytes"] <= budget
    assert store.agent("p", fp).pinned
    engine.close()

    again = _engine(model, tokenizer, CacheStore(tmp_path, disk_budget=budget))
    c = _turn(again, "a0", [5, 6, 7])
    _assert_exact(llama, contexts["a0"], [5, 6, 7], c)
    assert c.usage.recomputed_tokens == len(contexts["a0"]) and c.usage.restored_tokens == 0
    c = _turn(again, "p", [8, 9])
    _assert_exact(llama, contexts["p"], [8, 9], c)
    assert c.usage.restored_tokens == len(contexts["p"])
    again.store.flush()
    assert again.store.agent("p", fp).stored_tokens > 0  # still never evicted
    again.close()


def test_disk_budget_frees_deleted_agents_blocks_before_evicting_live_ones(llama, tmp_path):
    """Blocks nobody references any more go first; a live agent is evicted only if needed."""
    model, tokenizer = llama
    budget = 11 * _raw_block_bytes(model)
    names = ["gone", "keep", "n1", "n2"]
    prompts = _prompts(6, names, 3 * BLOCK + 4 - GEN)
    engine = _engine(model, tokenizer, CacheStore(tmp_path, disk_budget=budget))
    store, fp = engine.store, engine.spec.fingerprint
    for name in names:
        _turn(engine, name, prompts[name])
        if name == "keep":
            engine.delete_agent("gone")  # its 3 blocks become unreferenced
        store.flush()
    # n2 took the store over budget; dropping gone's blocks is enough to get under it.
    assert store.counters["evicted_agents"] == 0
    assert store.agent("keep", fp).stored_tokens == len(engine.agent_tokens("keep"))
    assert _index(tmp_path, "SELECT COUNT(*) FROM blocks WHERE refcount = 0") == [(0,)]
    assert store.stats()["block_bytes"] <= budget
    engine.close()


# -- gc and verify -------------------------------------------------------------------------


def _litter(root: Path, live_state: str, live_block: str) -> tuple[set[str], Path]:
    """Orphans gc must find, and a quarantined file it must leave; returns both."""
    stray = root / "blocks" / "00" / "stray.safetensors"
    stray.parent.mkdir()
    stray.write_bytes(b"x" * 100)
    block_tmp = _block_file(root, live_block).with_name(".half.safetensors.1.ab.tmp")
    block_tmp.write_bytes(b"torn")
    state_tmp = (root / live_state).with_name(".old.safetensors.2.cd.tmp")
    state_tmp.write_bytes(b"torn")
    pipe = stray.with_name("pipe.safetensors")  # not a file: listed all the same
    os.mkfifo(pipe)
    quarantined = root / "quarantine" / "bad.safetensors.123"
    quarantined.write_bytes(b"evidence")
    orphans = {p.relative_to(root).as_posix() for p in (stray, block_tmp, state_tmp, pipe)}
    return orphans, quarantined


def test_gc_dry_run_lists_and_real_run_removes_only_garbage(llama, tmp_path):
    """gc finds orphan files, unreferenced blocks and another model's rows; the dry run
    deletes nothing; the real run leaves every live agent restorable and quarantine alone."""
    model, tokenizer = llama
    prompts = _prompts(7, ["live1", "live2", "gone"], 36)
    engine = _engine(model, tokenizer, CacheStore(tmp_path))
    store, fp = engine.store, engine.spec.fingerprint
    _turns(engine, prompts)
    store.flush()
    gone = store.agent("gone", fp).block_hashes
    engine.delete_agent("gone")
    alien = _record("alien", FOREIGN)
    store.save_turn(alien)
    store.flush()
    live = store.agent("live1", fp)
    orphans, quarantined = _litter(tmp_path, live.state_file, live.block_hashes[0])
    files, rows = _files(tmp_path), _index_dump(tmp_path)

    report = store.gc(fp)
    assert report.dry_run
    assert set(report.orphan_files) == orphans
    assert set(report.unreferenced_blocks) == set(gone)
    assert report.foreign_agents == [f"alien@{FOREIGN}"]
    assert report.foreign_blocks == [b.block_hash for b in alien.blocks]
    assert report.bytes_freed > 0
    assert _files(tmp_path) == files and _index_dump(tmp_path) == rows  # nothing deleted

    report = store.gc(fp, dry_run=False)
    assert set(report.orphan_files) == orphans
    assert not any((tmp_path / rel).exists() for rel in orphans)
    assert not any(_block_file(tmp_path, h).exists() for h in gone + report.foreign_blocks)
    assert _index(tmp_path, "SELECT COUNT(*) FROM agents WHERE fingerprint != ?", (fp,)) == [(0,)]
    assert _index(tmp_path, "SELECT COUNT(*) FROM blocks WHERE fingerprint != ?", (fp,)) == [(0,)]
    assert quarantined.read_bytes() == b"evidence"
    assert _files(tmp_path, "agents") == {store.agent(a, fp).state_file for a in ("live1", "live2")}
    again = store.gc(fp)
    assert (again.orphan_files, again.unreferenced_blocks, again.foreign_agents) == ([], [], [])
    assert store.verify().corrupt == []
    contexts = {a: engine.agent_tokens(a) for a in ("live1", "live2")}
    engine.close()

    after = _engine(model, tokenizer, CacheStore(tmp_path))
    for agent_id, c in _turns(after, {a: [5, 6, 7] for a in contexts}).items():
        _assert_exact(llama, contexts[agent_id], [5, 6, 7], c)
        assert c.usage.restored_tokens == len(contexts[agent_id])
    after.close()


def test_verify_reports_files_changed_behind_the_stores_back(tmp_path):
    """verify re-reads every indexed file and names the ones whose bytes changed."""
    store = CacheStore(tmp_path)
    for agent_id in ("a", "b"):
        store.save_turn(_record(agent_id, FOREIGN, blocks=2))
    report = store.verify()
    assert (report.checked, report.corrupt) == (6, [])  # 4 blocks, 2 state files
    block = store.agent("a", FOREIGN).block_hashes[1]
    state = store.agent("b", FOREIGN).state_file
    _flip_last_byte(_block_file(tmp_path, block))
    (tmp_path / state).write_bytes((tmp_path / state).read_bytes()[:-3])
    piped = _block_file(tmp_path, store.agent("b", FOREIGN).block_hashes[0])
    piped.unlink()
    os.mkfifo(piped)  # reported, not waited on
    report = store.verify()
    assert report.checked == 6
    assert sorted(report.corrupt) == sorted(
        [_block_file(tmp_path, block).relative_to(tmp_path).as_posix(), state]
        + [piped.relative_to(tmp_path).as_posix()]
    )
    assert list((tmp_path / "quarantine").iterdir()) == []  # verify only reports
    store.close()


def test_verify_beside_a_live_writer_reports_no_file_it_replaced(tmp_path, monkeypatch):
    """verify (as `daemonctl verify` runs it, beside a daemon) lists the files, then reads
    them; a turn landing in between replaces an agent's state file (the old one removed).
    That file is not reported corrupt: the index no longer lists it. A file still listed
    and really bad is."""
    store = CacheStore(tmp_path)
    for agent_id in ("a", "b"):
        store.save_turn(_record(agent_id, FOREIGN, blocks=2))
    store.flush()
    old_state = store.agent("a", FOREIGN).state_file
    _flip_last_byte(_block_file(tmp_path, store.agent("b", FOREIGN).block_hashes[1]))
    real_read = maintenance.read_tensor_file

    def read_while_a_turn_lands(path, **kw):
        if path.name == Path(old_state).name and path.exists():
            store.save_turn(_record("a", FOREIGN, blocks=2, tail=5))  # a new state file
            store.flush()
            assert not path.exists()
        return real_read(path, **kw)

    monkeypatch.setattr(maintenance, "read_tensor_file", read_while_a_turn_lands)
    report = maintenance.verify_store(tmp_path)
    assert store.agent("a", FOREIGN).state_file != old_state
    bad_block = _block_file(tmp_path, store.agent("b", FOREIGN).block_hashes[1])
    assert report.corrupt == [bad_block.relative_to(tmp_path).as_posix()]
    store.close()


def test_gc_from_another_process_never_deletes_a_block_being_committed(tmp_path):
    """gc may be started from daemonctl while the daemon writes: a real gc is refused while
    the store is open elsewhere (a dry run only lists), so it never makes index holes."""
    refused = []

    class GcAfterRename(FileOps):
        def replace(self, src: Path, dst: Path) -> None:
            super().replace(src, dst)
            if dst.parent.parent.name == "blocks":
                try:
                    collect_garbage(tmp_path, dry_run=False)  # what `daemonctl gc` would do now
                except StoreLockedError:
                    refused.append(dst)
                collect_garbage(tmp_path, dry_run=True)  # listing is always allowed

    store = CacheStore(tmp_path, file_ops=GcAfterRename())
    store.save_turn(_record("a", FOREIGN))
    store.flush()
    assert refused
    assert store.verify().corrupt == []
    store.close()


# -- agent ids are never paths -------------------------------------------------------------

AGENT_FILE = re.compile(r"^agents/[0-9a-f]{32}/[0-9a-f]+\.safetensors$")


def test_odd_agent_ids_only_name_hashed_directories(llama, tmp_path):
    """Valid ids with `:@+.` produce files only under agents/<hex key>/."""
    model, tokenizer = llama
    ids = ["a:b@c+d", "x..y", "Z.-_:@+9"]
    prompts = _prompts(8, ids, 20)
    engine = _engine(model, tokenizer, CacheStore(tmp_path))
    with pytest.raises(InvalidRequestError):
        engine.submit("../../etc", [1, 2, 3], max_tokens=GEN)
    for agent_id, c in _turns(engine, prompts).items():
        _assert_exact(llama, [], prompts[agent_id], c)
    engine.store.flush()
    states = {engine.store.agent(a, engine.spec.fingerprint).state_file for a in ids}
    assert _files(tmp_path, "agents") == states and len(states) == 3
    assert all(AGENT_FILE.match(rel) for rel in states)
    everything = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")]
    assert not [p for p in everything for a in ids if a in p]
    engine.close()


@pytest.mark.parametrize("agent_id", ["../../etc", "/abs/path", "a/b", "..", "x\x00y", ""])
def test_hostile_agent_ids_stay_inside_the_store(tmp_path, agent_id):
    """The store itself never trusts an id as a path, even one the daemon would refuse."""
    root = tmp_path / "store"
    store = CacheStore(root)
    store.save_turn(_record(agent_id, FOREIGN))
    store.flush()
    stored = store.agent(agent_id, FOREIGN)
    assert AGENT_FILE.match(stored.state_file)
    assert _files(root, "agents") == {stored.state_file}
    assert [p.name for p in tmp_path.iterdir()] == ["store"]
    meta, tensors = store.read_state(stored)
    assert meta["tail_tokens"] == "4" and set(tensors) == {"tail.k.0", "tail.v.0"}
    store.close()


# -- restores read the index, then exactly that agent's files --------------------------------


def _agent_files(root: Path, agent_id: str) -> list[Path]:
    rows = _index(
        root,
        "SELECT b.path FROM agent_blocks a JOIN blocks b ON a.block_hash = b.hash "
        "WHERE a.agent_id = ? ORDER BY a.seq",
        (agent_id,),
    )
    (state,) = _index(root, "SELECT state_file FROM agents WHERE agent_id = ?", (agent_id,))
    return [root / r[0] for r in rows] + [root / state[0]]


def test_restore_reads_exactly_that_agents_files_once(llama, tmp_path):
    """Opening reads the index only; restoring reads that agent's block and state files once
    (another agent's files, damaged, go unnoticed); later turns read nothing."""
    model, tokenizer = llama
    prompts = _prompts(9, ["reader", "other"], 44)
    engine = _engine(model, tokenizer, CacheStore(tmp_path))
    _turns(engine, prompts)
    context = engine.agent_tokens("reader")
    engine.close()
    blocks = len(_agent_files(tmp_path, "reader")) - 1
    for path in _agent_files(tmp_path, "other"):
        _flip_last_byte(path)  # reading any of these would quarantine it

    store = CacheStore(tmp_path)
    assert not any(store.counters.values())
    again = _engine(model, tokenizer, store)
    c = _turn(again, "reader", [5, 6, 7])
    _assert_exact(llama, context, [5, 6, 7], c)
    assert c.usage.restored_tokens == len(context)
    reads = {k: store.counters[k] for k in ("blocks_read", "states_read", "corrupt_files")}
    assert reads == {"blocks_read": blocks, "states_read": 1, "corrupt_files": 0}
    assert list((tmp_path / "quarantine").iterdir()) == []
    later = again.agent_tokens("reader")
    c = _turn(again, "reader", [9])
    _assert_exact(llama, later, [9], c)
    assert c.usage.restored_tokens == 0 and c.usage.cached_tokens == len(later)
    assert {k: store.counters[k] for k in reads} == reads
    again.close()


def test_budget_eviction_keeps_blocks_a_queued_turn_lists_without_bytes(tmp_path):
    """A turn queued with a shared block it did not send (already on disk) still finds it,
    even when the disk budget evicts the block's other owner while the turn waits."""
    fp = "a" * 32
    store = CacheStore(tmp_path)
    store.save_turn(_record("x", fp, blocks=1))
    store.flush()
    used = store.stats()["block_bytes"]
    store.close()

    store = CacheStore(tmp_path, disk_budget=used + 64)
    (shared,) = store.agent("x", fp).block_hashes
    follower = _record("y", fp, blocks=0)
    follower.blocks = [BlockRecord(shared, BLOCK, None)]  # on disk already: no bytes sent
    follower.stored_tokens += BLOCK
    follower.tokens = list(range(follower.stored_tokens))
    store.save_turn(_record("z", fp, blocks=3))  # over budget: evicts x, the LRU agent
    store.save_turn(follower)
    store.flush()  # raises StoreWriteError if the block went with x
    assert store.agent("x", fp).block_hashes == []  # evicted (and z after y, over budget)
    assert store.agent("y", fp).block_hashes == [shared]
    assert _block_file(tmp_path, shared).exists()
    assert _index(tmp_path, "SELECT refcount FROM blocks WHERE hash = ?", (shared,)) == [(1,)]
    store.close()


def test_read_blocks_into_takes_jobs_as_they_come_and_never_leaves_a_read_running(tmp_path):
    """Jobs may come from a generator (reads start while later jobs are made); if it fails
    midway, the reads already started have finished when the error reaches the caller."""
    fp = "c" * 32
    turn = synthetic_turn("reader", fp, blocks=3, tail=0, block_size=BLOCK)
    store = CacheStore(tmp_path)
    store.save_turn(turn)
    store.flush()

    def dests_for(block: BlockRecord) -> dict[str, HostTensor]:
        return {n: HostTensor(t.dtype, np.zeros_like(t.data)) for n, t in block.tensors.items()}

    targets = [dests_for(b) for b in turn.blocks]
    jobs = ((b.block_hash, d) for b, d in zip(turn.blocks, targets, strict=True))
    assert store.read_blocks_into(fp, jobs) == [True, True, True]
    for block, dests in zip(turn.blocks, targets, strict=True):
        for name, t in block.tensors.items():
            assert np.array_equal(dests[name].data, t.data)

    started = dests_for(turn.blocks[0])

    def failing():
        yield turn.blocks[0].block_hash, started
        raise RuntimeError("the caller failed")

    with pytest.raises(RuntimeError, match="the caller failed"):
        store.read_blocks_into(fp, failing())
    for name, t in turn.blocks[0].tensors.items():  # its read had finished, not abandoned
        assert np.array_equal(started[name].data, t.data)
    store.close()
