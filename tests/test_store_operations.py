"""The store's inside, tested directly: its operations (each a frozen value applying itself
through a real `Writer`: real files, real SQLite on tmp_path), the queued-write bookkeeping
(`PendingWrites`, `Outcomes`) and the settle signal a daemon's loop waits on.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
from pathlib import Path
from typing import ClassVar

import pytest
from refs import synthetic_turn

from agentkv.storage import CacheStore, GcReport, StoreWriteError
from agentkv.storage.cache_files import CacheFiles, prepare_root
from agentkv.storage.lookups import CorruptRows
from agentkv.storage.operations import (
    Delete,
    Evict,
    ForgetBlock,
    Gc,
    Pin,
    RegisterModel,
    StoreOp,
    WriteTurn,
)
from agentkv.storage.pending import Outcomes, PendingWrites, Shown
from agentkv.storage.records import BlockRecord
from agentkv.storage.store import COUNTERS
from agentkv.storage.tensor_files import FileOps, read_tensor_meta
from agentkv.storage.writer import Writer

FP = "f" * 32
BLOCK = 16


def _turn(agent_id: str, blocks: int = 2, tail: int = 4):
    return synthetic_turn(agent_id, FP, blocks=blocks, tail=tail, block_size=BLOCK)


def _rows(root: Path, sql: str, args: tuple = ()) -> list[tuple]:
    db = sqlite3.connect(root / "index.db")
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


class _WriterRig:
    """A Writer over a real store directory, with the pieces CacheStore gives it."""

    def __init__(self, root: Path, *, read_only: bool = False, disk_budget=None) -> None:
        prepare_root(root, FileOps())
        self.root = root
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.pending = PendingWrites([])
        self.outcomes = Outcomes()
        self.rows = CorruptRows(self.counters, threading.Lock())
        self.writer = Writer(
            CacheFiles(root, FileOps()),
            self.pending,
            self.outcomes,
            self.rows,
            self.counters,
            disk_budget=disk_budget,
            max_pending=4,
            read_only=read_only,
        )

    def run(self, *ops) -> None:
        for op in ops:
            self.writer.submit(op)
        self.writer.drain(60)

    def agent_row(self, agent_id: str) -> tuple | None:
        found = _rows(
            self.root,
            "SELECT token_count, stored_tokens, state_file, pinned FROM agents "
            "WHERE agent_id = ? AND fingerprint = ?",
            (agent_id, FP),
        )
        return found[0] if found else None


@pytest.fixture
def rig(tmp_path):
    made = _WriterRig(tmp_path / "store")
    yield made
    made.writer.stop()


# -- the operations ------------------------------------------------------------------------


def test_operations_are_frozen_values():
    """An operation is a value: equal by its fields, never changed once queued."""
    assert Delete("a", FP) == Delete("a", FP) != Evict("a", FP)
    assert Pin("a", FP, True) != Pin("a", FP, False)
    op = Delete("a", FP)
    with pytest.raises(dataclasses.FrozenInstanceError):
        op.agent = "b"  # type: ignore[misc]
    assert (op.agent_id, op.listed_blocks(), op.shown()) == ("a", [], Shown(("a", FP), None))
    assert RegisterModel(FP, "m", "{}", BLOCK).agent_id is None


def test_a_turn_is_shown_as_queued_and_lists_its_blocks():
    """What lookups see of a queued turn: its tokens and blocks, no files yet."""
    rec = _turn("a")
    op = WriteTurn(rec)
    shown = op.shown()
    assert shown.key == ("a", FP) and op.agent_id == "a"
    assert shown.agent.tokens == rec.tokens and shown.agent.state_file is None
    assert shown.agent.block_hashes == [b.block_hash for b in rec.blocks]
    assert op.listed_blocks() == rec.blocks


def test_each_operation_applies_itself_through_the_writer(rig):
    """RegisterModel, WriteTurn, Pin, Evict and Delete change real files and index rows."""
    rec = _turn("a")
    rig.run(RegisterModel(FP, "my/model", '{"x": 1}', BLOCK), WriteTurn(rec))
    count, stored, state_file, pinned = rig.agent_row("a")
    assert (count, stored, pinned) == (len(rec.tokens), rec.stored_tokens, 0)
    meta = read_tensor_meta(rig.root / state_file)
    assert (meta["model_id"], meta["model_block_size"]) == ("my/model", str(BLOCK))
    for b in rec.blocks:
        assert (rig.root / "blocks" / b.block_hash[:2] / f"{b.block_hash}.safetensors").exists()
    assert rig.counters["turns_written"] == 1 and rig.counters["blocks_written"] == 2

    rig.run(Pin("a", FP, True))
    assert rig.agent_row("a")[3] == 1

    rig.run(Evict("a", FP))  # its cache goes, its tokens stay (in a context file too)
    count, stored, context_file, _ = rig.agent_row("a")
    assert (count, stored) == (len(rec.tokens), 0)
    assert context_file != state_file and not (rig.root / state_file).exists()
    assert read_tensor_meta(rig.root / context_file)["holds"] == "tokens"

    rig.run(Delete("a", FP))
    assert rig.agent_row("a") is None and not (rig.root / context_file).exists()
    assert rig.counters["write_errors"] == 0 and rig.outcomes.take_errors() == []


def test_forget_block_quarantines_the_file_and_cuts_its_agents(rig):
    """A corrupt block: its row goes, its agent keeps the blocks before it, the file is
    moved to quarantine/ (not deleted)."""
    rec = _turn("a", blocks=3)
    rig.run(WriteTurn(rec))
    second = rec.blocks[1].block_hash
    path = rig.root / "blocks" / second[:2] / f"{second}.safetensors"
    rig.run(ForgetBlock(path, second))
    assert not path.exists()
    assert [p.name.split(".")[0] for p in (rig.root / "quarantine").iterdir()] == [second]
    listed = _rows(rig.root, "SELECT block_hash FROM agent_blocks ORDER BY seq")
    assert listed == [(rec.blocks[0].block_hash,)]
    assert rig.agent_row("a")[1] == BLOCK  # stored_tokens: the first block only


def test_gc_answers_its_caller_and_keeps_blocks_queued_turns_list(rig):
    """A gc op hands its report to the caller's future; an unreferenced block a queued
    turn lists without its bytes is kept."""
    rig.run(WriteTurn(_turn("a", blocks=1)), Delete("a", FP))
    kept = _rows(rig.root, "SELECT hash FROM blocks")[0][0]
    gate = threading.Event()
    rig.writer.submit(_Hold(gate))  # holds the writer: the next turn stays queued
    rig.writer.submit(WriteTurn(_listing("b", kept)))
    gc = Gc(None, False)
    gate.set()
    rig.run(gc)
    report = gc.done.result(60)
    assert isinstance(report, GcReport) and kept not in report.unreferenced_blocks
    assert _rows(rig.root, "SELECT refcount FROM blocks WHERE hash = ?", (kept,)) == [(1,)]


def test_failures_are_recorded_by_the_operation(tmp_path):
    """On a writer that cannot write: a turn is unsaved and counted, a delete is
    undeleted, a gc's error goes to its caller alone (not counted, not flushed)."""
    rig = _WriterRig(tmp_path / "store", read_only=True)
    try:
        gc = Gc(None, False)
        rig.run(WriteTurn(_turn("a")), Delete("b", FP), gc)
        with pytest.raises(StoreWriteError):
            gc.done.result(60)
        assert "read-only" in rig.outcomes.unsaved(("a", FP))
        assert "read-only" in rig.outcomes.delete_error(("b", FP))
        assert rig.counters["write_errors"] == 2
        errors = rig.outcomes.take_errors()
        assert [e.split(":")[0] for e in errors] == ["turn", "delete"]
        assert rig.outcomes.take_errors() == []
    finally:
        rig.writer.stop()


@dataclasses.dataclass(frozen=True, slots=True)
class _Hold(StoreOp):
    """Holds the writer thread until `gate` is set."""

    kind: ClassVar[str] = "hold"
    gate: threading.Event

    def apply(self, writer) -> None:
        assert self.gate.wait(60)


def _listing(agent_id: str, block_hash: str):
    """A turn that lists `block_hash` without its bytes (on disk when the engine looked)."""
    rec = _turn(agent_id, blocks=1, tail=0)
    return dataclasses.replace(rec, blocks=[BlockRecord(block_hash, BLOCK, None)])


# -- the bookkeeping -----------------------------------------------------------------------


def test_the_latest_queued_operation_of_an_agent_is_what_lookups_see():
    """Overlay entries are replaced by later ones, and removed only by their own landing."""
    pending = PendingWrites([])
    turn, delete = WriteTurn(_turn("a")), Delete("a", FP)
    t1 = pending.add(turn.agent_id, turn.listed_blocks(), turn.shown())
    t2 = pending.add(delete.agent_id, delete.listed_blocks(), delete.shown())
    assert pending.shown(("a", FP)) == Shown(("a", FP), None)  # the delete hides it
    pending.settle(turn.agent_id, turn.listed_blocks(), t1)
    assert pending.shown(("a", FP)) == Shown(("a", FP), None) and not pending.is_settled("a")
    pending.settle(delete.agent_id, delete.listed_blocks(), t2)
    assert pending.shown(("a", FP)) is None and pending.is_settled("a")
    assert pending.all_shown() == []


def test_blocks_of_queued_turns_are_known_and_kept():
    """A queued block with bytes counts as held; one listed without bytes is kept from gc
    and the budget; both are forgotten once the turn lands."""
    pending = PendingWrites(["00" * 32])
    rec = _turn("a", blocks=2, tail=0)
    rec.blocks[1] = BlockRecord("00" * 32, BLOCK, None)
    ticket = pending.add("a", rec.blocks, None)
    new = rec.blocks[0].block_hash
    assert pending.has_block(new) and pending.has_block("00" * 32)
    assert pending.listed() == {new, "00" * 32}
    assert pending.unlisted([new, "11" * 32]) == ["11" * 32]
    assert pending.available_prefix(rec) == 2 and pending.needs_write(rec.blocks[0])
    pending.blocks_gone(["00" * 32])  # the budget took it meanwhile
    assert pending.available_prefix(rec) == 1
    pending.settle("a", rec.blocks, ticket)
    assert not pending.has_block(new) and pending.listed() == frozenset()


def test_settling_wakes_waiters_and_listeners_and_survives_a_bad_listener(caplog):
    """settle notifies the Condition and every listener; a listener that raises is
    logged, and the others still run."""
    pending = PendingWrites([])
    calls: list[str] = []
    pending.add_listener(lambda: (_ for _ in ()).throw(RuntimeError("bad listener")))
    pending.add_listener(lambda: calls.append("woken"))
    pending.add("a", [], None)
    assert pending.wait_settled("a", 0.05, lambda: True) is False  # nothing landed yet
    assert pending.wait_settled("a", 30, lambda: False) is True  # a dead writer: no wait
    waiter = threading.Thread(target=lambda: calls.append(pending.wait_settled("a", 30, bool)))
    waiter.start()
    with caplog.at_level(logging.ERROR, logger="agentkv.storage"):
        pending.settle("a", [], None)
    waiter.join(30)
    assert sorted(calls, key=str) == [True, "woken"]
    assert "listener failed" in caplog.text


def test_outcomes_clear_once_the_agent_lands():
    outcomes = Outcomes()
    outcomes.turn_failed(("a", FP), "disk full")
    outcomes.delete_failed(("b", FP), "disk full")
    outcomes.failed("turn", OSError("disk full"))
    assert outcomes.unsaved_agents(FP) == {"a": "disk full"}
    assert outcomes.unsaved_agents("0" * 32) == {}
    outcomes.landed(("a", FP))
    outcomes.landed(("b", FP))
    assert outcomes.unsaved(("a", FP)) is None and outcomes.delete_error(("b", FP)) is None
    assert outcomes.take_errors() == ["turn: disk full"]


# -- through CacheStore --------------------------------------------------------------------


def test_store_calls_on_settled_after_each_write_lands(tmp_path):
    """`on_settled` listeners run once per landed operation, after `is_settled` is true."""
    store = CacheStore(tmp_path)
    seen: list[bool] = []
    store.on_settled(lambda: seen.append(store.is_settled("a")))
    store.save_turn(_turn("a"))
    store.flush()
    store.set_pinned("a", FP, True)
    store.flush()
    assert seen == [True, True]
    store.close()


def test_fingerprints_of_an_agent_include_queued_writes(tmp_path):
    """The models an agent is stored for: indexed, plus queued turns, minus queued deletes."""
    store = CacheStore(tmp_path)
    other = "e" * 32
    store.save_turn(_turn("a"))
    store.save_turn(synthetic_turn("a", other, blocks=1, tail=2, block_size=BLOCK))
    assert store.fingerprints_of("a") == sorted([FP, other])
    store.flush()
    store.delete_agent("a", other)
    assert store.fingerprints_of("a") == [FP] and store.fingerprints_of("b") == []
    store.flush()
    assert store.fingerprints_of("a") == [FP]
    store.close()
