"""What crosses between the engine and the store: host buffers in, index rows out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .paths import is_block_hash
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


@dataclass(frozen=True, slots=True)
class WrittenBlock:
    """A block file written for a turn, for its index row."""

    block_hash: str
    nbytes: int
    checksum: str
    token_count: int


@dataclass(frozen=True, slots=True)
class StateFile:
    """A state file written: its path relative to the store's root, checksum and size."""

    rel: str
    checksum: str
    nbytes: int


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
    """What `verify` checked and found.

    Attributes:
        index_error: why the index itself is unusable (missing beside cache files, or
            damaged: what SQLite's integrity check or a read said), None when it is sound.
            Files are not checked then: the index no longer says which are live.
        affected_agents: with index_error, the agents whose rows cannot be read (or, when
            none of the index can, every agent the state files name).
    """

    checked: int = 0
    bytes_checked: int = 0
    corrupt: list[str] = field(default_factory=list)
    index_error: str | None = None
    affected_agents: list[str] = field(default_factory=list)


@dataclass(slots=True)
class RebuildReport:
    """What rebuilding an index from the store's files found (and, unless a dry run, wrote).

    Attributes:
        dry_run: nothing was written.
        models: fingerprints of the models recorded.
        blocks: block files indexed (every block file that checked out).
        agents: agents recovered whole or in part, as `agent_id@fingerprint`.
        restored_tokens: context tokens of those agents.
        cut_agents: agents recovered with their tokens but less cache than their state file
            described (a block file missing or bad): one line each, saying why.
        lost_agents: agents whose context cannot be recovered: one line each (their newest
            state file holds no token list: written by an older agentkv).
        bad_files: files that failed their checksum or are not the store's: left where they
            are (`gc` removes them once the index is back).
        old_index: where the replaced index.db was moved (None: there was none).
    """

    dry_run: bool
    models: list[str] = field(default_factory=list)
    blocks: int = 0
    agents: list[str] = field(default_factory=list)
    restored_tokens: int = 0
    cut_agents: list[str] = field(default_factory=list)
    lost_agents: list[str] = field(default_factory=list)
    bad_files: list[str] = field(default_factory=list)
    old_index: str | None = None


def pack_tokens(tokens: list[int]) -> bytes:
    """Token ids as little-endian int32 bytes (the index's `tokens` column)."""
    return np.asarray(tokens, dtype="<i4").tobytes()


def context_digest(tokens: list[int]) -> str:
    """sha256 of a context's token ids (packed as in the index): what a state file is of."""
    return hashlib.sha256(pack_tokens(tokens)).hexdigest()


def unpack_tokens(blob: bytes) -> list[int]:
    """Inverse of `pack_tokens`."""
    return np.frombuffer(blob, dtype="<i4").tolist()


TOKENS_TENSOR = "context.tokens"  # a state file's token ids (int32)
BLOCKS_TENSOR = "context.blocks"  # its agent's block hashes, one row of bytes each (uint8)
CONTEXT_TENSORS = (TOKENS_TENSOR, BLOCKS_TENSOR)


def context_tensors(tokens: list[int], block_hashes: list[str]) -> dict[str, HostTensor]:
    """What a state file holds of its agent's context besides the cache: the token ids and
    the block list (hashes of one length; any other list is left out, rebuilt from none)."""
    out = {TOKENS_TENSOR: HostTensor("int32", np.asarray(tokens, dtype="<i4"))}
    if not all(is_block_hash(h) for h in block_hashes):
        return out
    raw = [bytes.fromhex(h) for h in block_hashes]
    if raw and len({len(r) for r in raw}) == 1:
        rows = np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(len(raw), len(raw[0]))
        out[BLOCKS_TENSOR] = HostTensor("uint8", rows)
    return out


def context_of(tensors: dict[str, HostTensor]) -> tuple[list[int], list[str]] | None:
    """(token ids, block hashes) a state file holds, or None for one written before state
    files held them."""
    tokens = tensors.get(TOKENS_TENSOR)
    if tokens is None or tokens.data.ndim != 1:
        return None
    blocks = tensors.get(BLOCKS_TENSOR)
    hashes = [] if blocks is None else [bytes(row).hex() for row in blocks.data]
    return np.asarray(tokens.data, dtype="<i4").tolist(), hashes
