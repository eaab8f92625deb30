"""What crosses between the engine and the store: host buffers in, index rows out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .tensor_files import HostTensor


@dataclass(slots=True)
class BlockRecord:
    """One full block of an agent's context.

    Attributes:
        block_hash: the chained content hash, hex.
        token_count: tokens in the block.
        tensors: the block's K/V as host tensors, or None when it is already on disk.
    """

    block_hash: str
    token_count: int
    tensors: dict[str, HostTensor] | None = None


@dataclass(slots=True)
class TurnRecord:
    """An agent's whole state after a turn, to be made durable.

    Attributes:
        agent_id: the agent.
        fingerprint: the model it belongs to.
        tokens: every token of the context (the source of truth).
        stored_tokens: tokens the blocks plus the state file cover.
        blocks: the agent's full blocks in order.
        state: tensors that are not block-shaped (tail rows, windows, recurrent states).
        state_meta: str -> str metadata describing `state` (offsets, layer layout).
        layout: str -> str metadata common to every file of this model (dtype, layers).
    """

    agent_id: str
    fingerprint: str
    tokens: list[int]
    stored_tokens: int
    blocks: list[BlockRecord] = field(default_factory=list)
    state: dict[str, HostTensor] = field(default_factory=dict)
    state_meta: dict[str, str] = field(default_factory=dict)
    layout: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class StoredAgent:
    """An agent as the index knows it."""

    agent_id: str
    fingerprint: str
    tokens: list[int]
    stored_tokens: int
    block_hashes: list[str]
    state_file: str | None
    state_checksum: str | None
    pinned: bool
    last_used: float
    state_bytes: int = 0  # the state file's size as written (0: no state file, or queued)


@dataclass(slots=True)
class GcReport:
    """What `gc` removed (or would remove, on a dry run)."""

    dry_run: bool
    orphan_files: list[str] = field(default_factory=list)
    foreign_blocks: list[str] = field(default_factory=list)
    unreferenced_blocks: list[str] = field(default_factory=list)
    foreign_agents: list[str] = field(default_factory=list)
    bytes_freed: int = 0


@dataclass(slots=True)
class VerifyReport:
    """What `verify` checked and found."""

    checked: int = 0
    bytes_checked: int = 0
    corrupt: list[str] = field(default_factory=list)


def pack_tokens(tokens: list[int]) -> bytes:
    """Token ids as little-endian int32 bytes (the index's `tokens` column)."""
    return np.asarray(tokens, dtype="<i4").tobytes()


def context_digest(tokens: list[int]) -> str:
    """sha256 of a context's token ids (packed as in the index): what a state file is of."""
    return hashlib.sha256(pack_tokens(tokens)).hexdigest()


def unpack_tokens(blob: bytes) -> list[int]:
    """Inverse of `pack_tokens`."""
    return np.frombuffer(blob, dtype="<i4").tolist()
