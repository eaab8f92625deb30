"""What `CacheStore` queues for its writer thread: one frozen dataclass per operation.

Each operation says what it changes (`apply(writer)`, run on the writer thread in queue
order), whose writes it is (`agent_id`: a restore waits for them), what lookups see until it
lands (`shown()`), which blocks it lists (`listed_blocks()`: kept by gc and the disk budget
meanwhile), and what a failure means (`failed`) or a success clears (`landed`).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from .pending import Outcomes, Shown
from .records import BlockRecord, GcReport, StoredAgent, TurnRecord

if TYPE_CHECKING:
    from .writer import Writer


@dataclass(frozen=True, slots=True)
class StoreOp:
    """An operation for the writer thread (see the module docstring)."""

    kind: ClassVar[str] = "op"  # what the failure messages call it

    @property
    def agent_id(self) -> str | None:
        """The agent whose queued writes this is one of, or None."""
        return None

    def shown(self) -> Shown | None:
        """What lookups see of its agent until it lands; None: they read the index."""
        return None

    def listed_blocks(self) -> list[BlockRecord]:
        """The blocks it lists (kept on disk until it lands)."""
        return []

    def apply(self, writer: Writer) -> None:
        """Make the change: files first, then the index (removals the other way)."""
        raise NotImplementedError

    def landed(self, outcomes: Outcomes) -> None:
        """Record that it landed."""

    def failed(self, outcomes: Outcomes, exc: Exception) -> bool:
        """Record that it failed; True if it counts as a failed write (flush reports it)."""
        outcomes.failed(self.kind, exc)
        return True


@dataclass(frozen=True, slots=True)
class WriteTurn(StoreOp):
    """An agent's turn: its new blocks, state file and index rows."""

    kind: ClassVar[str] = "turn"
    record: TurnRecord

    @property
    def agent_id(self) -> str:
        return self.record.agent_id

    def shown(self) -> Shown:
        rec = self.record
        agent = StoredAgent(
            rec.agent_id,
            rec.fingerprint,
            rec.tokens,
            rec.stored_tokens,
            [b.block_hash for b in rec.blocks],
            None,  # its files are not written yet
            None,
            False,
            time.time(),
        )
        return Shown((rec.agent_id, rec.fingerprint), agent)

    def listed_blocks(self) -> list[BlockRecord]:
        return self.record.blocks

    def apply(self, writer: Writer) -> None:
        writer.write_turn(self.record)

    def landed(self, outcomes: Outcomes) -> None:
        outcomes.landed((self.record.agent_id, self.record.fingerprint))

    def failed(self, outcomes: Outcomes, exc: Exception) -> bool:
        outcomes.turn_failed((self.record.agent_id, self.record.fingerprint), str(exc))
        outcomes.failed(self.kind, exc)
        return True


@dataclass(frozen=True, slots=True)
class Delete(StoreOp):
    """Forget an agent: its row and block list (blocks it shared stay for the others)."""

    kind: ClassVar[str] = "delete"
    agent: str
    fingerprint: str

    @property
    def agent_id(self) -> str:
        return self.agent

    def shown(self) -> Shown:
        return Shown((self.agent, self.fingerprint), None)

    def apply(self, writer: Writer) -> None:
        writer.remove_agent(self.agent, self.fingerprint, keep_tokens=False)

    def landed(self, outcomes: Outcomes) -> None:
        outcomes.landed((self.agent, self.fingerprint))

    def failed(self, outcomes: Outcomes, exc: Exception) -> bool:
        outcomes.delete_failed((self.agent, self.fingerprint), str(exc))
        outcomes.failed(self.kind, exc)
        return True


@dataclass(frozen=True, slots=True)
class Evict(StoreOp):
    """Forget an agent's cache files but keep its tokens (it will be recomputed)."""

    kind: ClassVar[str] = "evict"
    agent: str
    fingerprint: str

    @property
    def agent_id(self) -> str:
        return self.agent

    def apply(self, writer: Writer) -> None:
        writer.remove_agent(self.agent, self.fingerprint, keep_tokens=True)


@dataclass(frozen=True, slots=True)
class Pin(StoreOp):
    """Pin or unpin an agent (the disk budget never evicts pinned agents)."""

    kind: ClassVar[str] = "pin"
    agent: str
    fingerprint: str
    pinned: bool

    @property
    def agent_id(self) -> str:
        return self.agent

    def apply(self, writer: Writer) -> None:
        writer.set_pinned(self.agent, self.fingerprint, self.pinned)


@dataclass(frozen=True, slots=True)
class RegisterModel(StoreOp):
    """Record a model's id and config (what state files then carry)."""

    kind: ClassVar[str] = "model"
    fingerprint: str
    model_id: str
    config: str
    block_size: int

    def apply(self, writer: Writer) -> None:
        writer.register_model(self.fingerprint, self.model_id, self.config, self.block_size)


@dataclass(frozen=True, slots=True)
class ForgetBlock(StoreOp):
    """A block file found corrupt: the index forgets it, then the file goes to quarantine."""

    kind: ClassVar[str] = "quarantined"
    path: Path
    block_hash: str

    def apply(self, writer: Writer) -> None:
        writer.forget_block(self.path, self.block_hash)


@dataclass(frozen=True, slots=True)
class ForgetState(StoreOp):
    """A state file found corrupt: the index forgets it, then the file goes to quarantine."""

    kind: ClassVar[str] = "quarantined"
    path: Path
    agent: str
    fingerprint: str
    state_file: str | None

    @property
    def agent_id(self) -> str:
        return self.agent

    def apply(self, writer: Writer) -> None:
        writer.forget_state(self.path, self.agent, self.fingerprint, self.state_file)


@dataclass(frozen=True, slots=True)
class Gc(StoreOp):
    """A real garbage collection, between two writes; its caller waits on `done`."""

    kind: ClassVar[str] = "gc"
    fingerprint: str | None
    progress: bool
    done: Future = field(default_factory=Future, compare=False)

    def apply(self, writer: Writer) -> None:
        report: GcReport = writer.collect_garbage(self.fingerprint, self.progress)
        self.done.set_result(report)

    def failed(self, outcomes: Outcomes, exc: Exception) -> bool:
        self.done.set_exception(exc)  # the caller waits for this one: the error is its own
        return False
