"""The store's cache files: block and state files written, read, removed and moved aside.

Every name comes from `paths.py` and is checked to stay inside the store before a file is
read, moved or deleted. Writes go through `tensor_files.write_tensor_file` (temp, fsync,
rename, fsync the directory); reads check the format version, the model and the block or
agent each file claims to be. Nothing here touches the index.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptFileError, StoreWriteError
from .paths import Containment, agent_key, block_rel, is_state_rel
from .records import (
    BlockRecord,
    StateFile,
    StoredAgent,
    TurnRecord,
    context_digest,
    context_tensors,
)
from .tensor_files import (
    FileOps,
    HostTensor,
    WrittenFile,
    read_tensor_file,
    read_tensor_file_into,
    write_tensor_file,
)

log = logging.getLogger("agentkv.storage")

FORMAT_VERSION = "1"
SUBDIRS = ("blocks", "agents", "quarantine")


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What state files record of their model, so a lost index is rebuilt whole."""

    model_id: str = ""
    config: str = ""
    block_size: int = 0


class CacheFiles:
    """The block and state files under a store's root.

    Args:
        root: the store directory.
        ops: the file-system calls to use (tests inject faults here).
    """

    def __init__(self, root: Path, ops: FileOps) -> None:
        self.root = root
        self.ops = ops
        self._paths = Containment(root)

    def block_path(self, block_hash: str) -> Path:
        """Where a block's file lives. Raises ValueError for a hash that is not hex."""
        return self.root / block_rel(block_hash)

    # -- writing ----------------------------------------------------------------------------

    def write_block(self, rec: TurnRecord, b: BlockRecord) -> WrittenFile:
        """Write one of a turn's blocks (its bytes must be present)."""
        path = self.block_path(b.block_hash)
        self.make_dir(path.parent)
        meta = {
            **rec.layout,
            "format": "agentkv-block",
            "format_version": FORMAT_VERSION,
            "fingerprint": rec.fingerprint,
            "block_hash": b.block_hash,
            "token_count": str(b.token_count),
        }
        return write_tensor_file(path, b.tensors, meta, self.ops)

    def write_state(self, rec: TurnRecord, model: ModelInfo) -> StateFile | None:
        """Write the agent's state file, or None for an agent with no tokens. Every turn
        writes one, holding besides the tensors that are not block-shaped (if any) the
        agent's id, its token ids and its block list: all the index knows of it, so a lost
        index is rebuilt from the files (`rebuild.py`)."""
        if not rec.tokens:
            return None
        key = agent_key(rec.agent_id)
        self.make_dir(self.root / "agents" / key)
        rel = f"agents/{key}/{time.time_ns():x}.safetensors"
        meta = {
            **rec.layout,
            **rec.state_meta,
            "format": "agentkv-state",
            "format_version": FORMAT_VERSION,
            "fingerprint": rec.fingerprint,
            "agent_key": key,
            "agent_id": rec.agent_id,
            "token_count": str(rec.stored_tokens),
            "context": context_digest(rec.tokens[: rec.stored_tokens]),
            "holds": "state" if rec.state else "tokens",
            "model_id": model.model_id,
            "model_config": model.config,
            "model_block_size": str(model.block_size),
        }
        tensors = {**rec.state, **context_tensors(rec.tokens, [b.block_hash for b in rec.blocks])}
        info = write_tensor_file(self.root / rel, tensors, meta, self.ops)
        return StateFile(rel, info.checksum, info.nbytes)

    def make_dir(self, directory: Path) -> None:
        """Create a file's directory if needed, durably; never one reached through a symlink."""
        if make_dir(directory):
            self.ops.fsync_dir(directory.parent)  # the new entry survives a crash
        if not self._paths.contains(directory):
            raise StoreWriteError(f"{directory} leads out of the store (a symlink)")

    # -- reading ----------------------------------------------------------------------------

    def read_block(self, block_hash: str, fingerprint: str) -> dict[str, HostTensor]:
        """A block's tensors, checksum verified. Raises CorruptFileError."""
        path = self.block_path(block_hash)
        self._check_contained(path)
        meta, tensors = read_tensor_file(path)
        _expect(meta, path, fingerprint=fingerprint, block_hash=block_hash)
        return tensors

    def read_block_into(self, block_hash: str, fingerprint: str, dests) -> None:
        """A block's tensors into caller-owned arrays (`read_tensor_file_into`)."""
        path = self.block_path(block_hash)
        self._check_contained(path, link_ok=True)  # opened with O_NOFOLLOW: never followed
        meta = read_tensor_file_into(path, dests)
        _expect(meta, path, fingerprint=fingerprint, block_hash=block_hash)

    def read_state(self, agent: StoredAgent) -> tuple[dict[str, str], dict[str, HostTensor]]:
        """An agent's state file as the index names it, checksum verified and checked to be
        that agent's and the one the index recorded. Raises CorruptFileError."""
        path = self.root / str(agent.state_file)
        if not is_state_rel(agent.state_file, agent.agent_id):
            raise CorruptFileError(path, "not a state file name of this agent")
        self._check_contained(path)
        meta, tensors = read_tensor_file(path, size=agent.state_bytes or None)
        _expect(meta, path, fingerprint=agent.fingerprint, agent_key=agent_key(agent.agent_id))
        if meta.get("checksum") != agent.state_checksum:
            raise CorruptFileError(path, "not the state file the index recorded")
        return meta, tensors

    def _check_contained(self, path: Path, *, link_ok: bool = False) -> None:
        if not self._paths.contains(path, link_ok=link_ok):
            raise CorruptFileError(path, "a symlink leads out of the store")

    # -- removing ---------------------------------------------------------------------------

    def unlink_state(self, rel: object, agent_id: str) -> bool:
        """Delete a state file, if its name is one the store gave this agent and it lies
        inside the store; False (nothing done) for anything else."""
        path = self.root / str(rel)
        if is_state_rel(rel, agent_id) and self._paths.contains(path, link_ok=True):
            path.unlink(missing_ok=True)
            return True
        return False

    def unlink_block(self, block_hash: object) -> bool:
        """Delete a block's file: the one named after the hash (a path column is never
        followed), and only inside the store. False for a hash that is not one."""
        try:
            path = self.block_path(block_hash)
        except ValueError:
            return False
        if self._paths.contains(path, link_ok=True):
            path.unlink(missing_ok=True)
        return True

    def quarantine(self, path: Path) -> None:
        """Move a file aside into quarantine/ (never one from outside the store)."""
        if not self._paths.contains(path, link_ok=True) or not os.path.lexists(path):
            return  # a link moves, not its target
        dest = self.root / "quarantine" / f"{path.name}.{time.time_ns():x}"
        try:
            self.ops.replace(path, dest)
        except OSError as move_err:
            log.error("cannot move %s aside: %s", path, move_err)


def prepare_root(root: Path, ops: FileOps) -> bool:
    """Create a store's directories (durably); True if its file system is read-only.

    Raises:
        StoreWriteError: they cannot be created (e.g. permissions).
    """
    if root.is_dir() and ops.is_read_only(root):
        log.info("store %s is on a read-only file system: opened read-only", root)
        wal = root / "index.db-wal"
        if wal.exists() and wal.stat().st_size:
            # SQLite opens a WAL index there only as immutable, which ignores the WAL: the
            # index is read as of its last checkpoint (older turns are recomputed).
            log.warning("store %s was not closed cleanly: its index's WAL is ignored", wal)
        return True
    try:
        if not root.is_dir():
            root.mkdir(parents=True)
            ops.fsync_dir(root.parent)
        if [sub for sub in SUBDIRS if make_dir(root / sub)]:
            ops.fsync_dir(root)  # the new directories survive a crash
    except OSError as exc:
        raise StoreWriteError(f"cannot create store at {root}: {exc}") from exc
    return False


def make_dir(directory: Path) -> bool:
    """Create a directory; True if it was created (it is then to be fsynced in its parent)."""
    try:
        directory.mkdir()
    except FileExistsError:
        return False
    return True


def _expect(meta: dict, path: Path, **want: str) -> None:
    if meta.get("format_version") != FORMAT_VERSION:
        raise CorruptFileError(path, f"format version {meta.get('format_version')!r}")
    for key, value in want.items():
        if meta.get(key) != value:
            raise CorruptFileError(path, f"{key} is {meta.get(key)!r}, expected {value!r}")
