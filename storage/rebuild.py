"""Rebuild a lost or damaged index from the store's files.

Every block file's metadata holds what the index knows of it (model fingerprint, block
hash, token count, layout, checksum), and every state file (one per agent and turn) holds
its agent's id, token ids, block list and model record besides its cache tensors. So the
index is rebuilt from the files alone: each file is read whole and its checksum verified,
each agent is taken from its newest good state file, its block list kept up to the first
block whose file is missing or bad, refcounts recounted from the block lists. The new index
is built in a temp file, fsynced, and renamed over index.db (the old one, if any, is kept
in quarantine/): a crash at any point leaves the old index or the new one.

What the files cannot give back (reported, see RebuildReport): agents whose newest state
file holds no token list (written by an agentkv before state files held them), agents the
disk budget evicted (their files are gone, their tokens were in the index alone), pins
(agents come back unpinned), and use times (taken from the files' modification times).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from . import index_scans
from .cache_files import FORMAT_VERSION
from .errors import CorruptFileError, IndexDamagedError, StorageError, StoreLockedError
from .locks import try_lock
from .paths import STATE_FILE, Containment, agent_key, block_rel, is_block_hash
from .records import RebuildReport, context_digest, context_of, pack_tokens
from .schema import has_cache_files, index_gone, lists_nothing, open_index
from .tensor_files import fsync_path, read_tensor_file, read_tensor_meta

log = logging.getLogger("agentkv.storage")


@dataclass(slots=True)
class _Block:
    """A block file that checked out."""

    fingerprint: str
    rel: str
    nbytes: int
    checksum: str
    token_count: int
    mtime: float
    block_size: int


@dataclass(slots=True)
class _Agent:
    """An agent's row as rebuilt from its newest state file."""

    agent_id: str
    fingerprint: str
    tokens: list[int]
    stored_tokens: int
    blocks: list[str]
    state: tuple[str, str, int] | None  # (rel, checksum, bytes)
    mtime: float


def rebuild_index(
    root: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    force: bool = False,
    progress: bool = False,
) -> RebuildReport:
    """Rebuild the store's index from its block and state files.

    Args:
        root: the store (the directory holding index.db, blocks/ and agents/).
        dry_run: only report what the new index would hold.
        force: rebuild even an index that is sound (it loses pins, and agents the files
            cannot give back); without it a sound index is refused.
        progress: show progress bars.

    Raises:
        StoreLockedError: a daemon (or another process) has the store open.
        StorageError: no store there, or the index is sound (and not `force`).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise StorageError(f"no store at {root}")
    lock = try_lock(root / "lock")
    if lock is None:
        raise StoreLockedError(
            f"store {root} is in use (a daemon is running): stop it before rebuilding its index"
        )
    try:
        if not force:
            _refuse_sound(root)
        report = RebuildReport(dry_run=dry_run)
        blocks = _scan_blocks(root, report, progress)
        agents = _scan_agents(root, blocks, report, progress)
        models = _models(root, blocks, agents)
        report.models = sorted(models)
        report.blocks = len(blocks)
        report.agents = sorted(f"{a.agent_id}@{a.fingerprint}" for a in agents)
        report.restored_tokens = sum(len(a.tokens) for a in agents)
        if not dry_run:
            report.old_index = _write_index(root, models, blocks, agents)
        return report
    finally:
        lock.close()


def _refuse_sound(root: Path) -> None:
    """Refuse to replace an index that opens and passes SQLite's integrity check."""
    if index_gone(root) is not None:
        return
    try:
        db = open_index(root / "index.db", read_only=True)
    except IndexDamagedError:
        return
    try:
        ok = index_scans.integrity_problems(db, 1) == ["ok"]
        # An index made empty over the files (what gc refuses) is no index of them.
        ok = ok and not (lists_nothing(db) and has_cache_files(root))
    except Exception:  # any failure to check it is damage enough
        ok = False
    finally:
        db.conn.close()
    if ok:
        raise StorageError(
            f"the index of store {root} is sound; rebuilding it would lose pins and any agent "
            "its files cannot give back (use --force to rebuild anyway)"
        )


def _store_files(root: Path, pattern: str, progress: bool, desc: str) -> list[Path]:
    """The store's cache files matching `pattern`, temp files left aside."""
    paths = sorted(p for p in root.glob(pattern) if not p.name.startswith("."))
    return list(tqdm(paths, desc=desc, unit="file", disable=not progress))


def _scan_blocks(root: Path, report: RebuildReport, progress: bool) -> dict[str, _Block]:
    """Every block file that is whole (checksum), the store's own and named after its hash."""
    inside = Containment(root)
    blocks: dict[str, _Block] = {}
    for path in _store_files(root, "blocks/*/*.safetensors", progress, "scan blocks"):
        rel = path.relative_to(root).as_posix()
        try:
            if not inside.contains(path):
                raise CorruptFileError(path, "a symlink")
            meta, _ = read_tensor_file(path)
            _expect_format(path, meta, "agentkv-block")
            h = meta.get("block_hash")
            if not is_block_hash(h) or block_rel(h) != rel:
                raise CorruptFileError(path, "not named after the block hash it holds")
            blocks[h] = _Block(
                _text(path, meta, "fingerprint"),
                rel,
                path.stat().st_size,
                meta["checksum"],
                _number(path, meta, "token_count"),
                path.stat().st_mtime,
                _number(path, meta, "block_size", 0),
            )
        except (CorruptFileError, OSError) as exc:
            report.bad_files.append(f"{rel}: {getattr(exc, 'reason', exc)}")
    return blocks


def _scan_agents(
    root: Path, blocks: dict[str, _Block], report: RebuildReport, progress: bool
) -> list[_Agent]:
    """Each agent from its newest good state file (per model)."""
    agents = []
    for (key, _), gens in _state_files(root, report, progress).items():
        for path in sorted(gens, key=lambda p: int(p.stem, 16), reverse=True):
            try:
                meta, tensors = read_tensor_file(path)
                _expect_format(path, meta, "agentkv-state")
            except CorruptFileError as exc:
                report.bad_files.append(f"{path.relative_to(root).as_posix()}: {exc.reason}")
                continue  # an older turn of the agent is better than none
            agent = _agent_of(root, path, meta, tensors, key, blocks, report)
            if agent is not None:
                agents.append(agent)
            break
    return agents


def _state_files(root: Path, report: RebuildReport, progress: bool) -> dict:
    """(agent key, fingerprint) -> its state files, by their headers (checked later)."""
    inside = Containment(root)
    groups: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for path in _store_files(root, "agents/*/*.safetensors", progress, "scan agents"):
        rel = path.relative_to(root).as_posix()
        try:
            if not inside.contains(path) or STATE_FILE.fullmatch(rel) is None:
                raise CorruptFileError(path, "not a state file the store names")
            meta = read_tensor_meta(path)
            if meta.get("agent_key") != path.parent.name:
                raise CorruptFileError(path, "of another agent than its directory's")
            groups[(path.parent.name, _text(path, meta, "fingerprint"))].append(path)
        except CorruptFileError as exc:
            report.bad_files.append(f"{rel}: {exc.reason}")
    return groups


def _agent_of(root, path, meta, tensors, key, blocks, report) -> _Agent | None:
    """The agent a good state file describes; None (reported lost) if it has no tokens."""
    rel = path.relative_to(root).as_posix()
    fp, agent_id, context = meta["fingerprint"], meta.get("agent_id"), context_of(tensors)
    if context is None or not isinstance(agent_id, str) or agent_key(agent_id) != key:
        report.lost_agents.append(
            f"agent {meta.get('agent_id') or '(id unknown, key ' + key + ')'} of model "
            f"{fp}: its state file {rel} holds no token list (written by an older agentkv)"
        )
        return None
    tokens, hashes = context
    stored, mtime = _number(path, meta, "token_count", -1), path.stat().st_mtime
    state = (rel, meta["checksum"], path.stat().st_size)
    agent = _Agent(agent_id, fp, tokens, stored, hashes, state, mtime)
    if not 0 <= stored <= len(tokens) or meta.get("context") != context_digest(tokens[:stored]):
        report.cut_agents.append(f"{agent_id}: its state file does not match its tokens")
        return _Agent(agent_id, fp, tokens, 0, [], None, mtime)  # recomputed on restore
    good = next(
        (i for i, h in enumerate(hashes) if h not in blocks or blocks[h].fingerprint != fp),
        len(hashes),
    )
    if good < len(hashes):
        report.cut_agents.append(
            f"{agent_id}: block {good} of {len(hashes)} is missing or bad; "
            f"its cache is kept up to it (the rest is recomputed)"
        )
        agent.blocks = hashes[:good]
        agent.stored_tokens = sum(blocks[h].token_count for h in agent.blocks)
        agent.state = None  # it belongs to the whole list
    return agent


def _models(root: Path, blocks: dict[str, _Block], agents: list[_Agent]) -> dict[str, tuple]:
    """fingerprint -> (model_id, config, block_size, created): from the newest state file
    of each model that recorded them, else the block files' block size."""
    models: dict[str, tuple] = {}
    for b in blocks.values():
        old = models.get(b.fingerprint, ("", "", b.block_size, b.mtime))
        models[b.fingerprint] = ("", "", old[2] or b.block_size, min(old[3], b.mtime))
    for a in sorted(agents, key=lambda a: a.mtime):
        old = models.get(a.fingerprint, ("", "", 0, a.mtime))
        if a.state is None:
            models[a.fingerprint] = old
            continue
        meta = read_tensor_meta(root / a.state[0])
        models[a.fingerprint] = (
            meta.get("model_id") or old[0],
            meta.get("model_config") or old[1],
            _number(root / a.state[0], meta, "model_block_size", 0)
            or _number(root / a.state[0], meta, "block_size", 0)
            or old[2],
            min(old[3], a.mtime),
        )
    return models


def _write_index(root: Path, models: dict, blocks: dict[str, _Block], agents: list) -> str | None:
    """Build the index in a temp file, fsync it, rename it over index.db. Returns where
    the old index went."""
    tmp = root / f".index.db.rebuild.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        db = open_index(tmp)
        try:
            _fill(db, models, blocks, agents)
            index_scans.checkpoint(db)
        finally:
            db.conn.close()  # the last connection: its WAL is checkpointed and removed
        fsync_path(tmp)
        return _swap_in(root, tmp)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)


def _fill(db, models: dict, blocks: dict[str, _Block], agents: list[_Agent]) -> None:
    """Every row, in one transaction (see `index_scans.fill`)."""
    index_scans.fill(
        db,
        [(fp, *rest) for fp, rest in models.items()],
        [
            (h, b.fingerprint, b.rel, b.nbytes, b.checksum, b.token_count, b.mtime, b.mtime)
            for h, b in blocks.items()
        ],
        [
            (a.agent_id, a.fingerprint, pack_tokens(a.tokens), len(a.tokens), a.stored_tokens)
            + (a.state or (None, None, 0))
            + (a.mtime, a.mtime)
            for a in agents
        ],
        [(a.agent_id, a.fingerprint, i, h) for a in agents for i, h in enumerate(a.blocks)],
    )


def _swap_in(root: Path, tmp: Path) -> str | None:
    """Rename the new index over index.db. The old index's WAL goes first (applied to the
    new index it would corrupt it), the old index is kept in quarantine/ (a hard link, so
    index.db never goes missing)."""
    aside = root / "quarantine"
    aside.mkdir(exist_ok=True)
    stamp = f"{time.time_ns():x}"
    for suffix in ("-wal", "-shm"):
        side = root / f"index.db{suffix}"
        if side.exists():
            os.replace(side, aside / f"index.db{suffix}.{stamp}")
    old, kept = root / "index.db", None
    if old.exists():
        kept = aside / f"index.db.{stamp}"
        try:
            os.link(old, kept)
        except OSError:
            shutil.copy2(old, kept)
    os.replace(tmp, old)
    fsync_path(root)
    fsync_path(aside)
    log.info("store %s: index rebuilt from its files (old index kept as %s)", root, kept)
    return None if kept is None else str(kept)


def _expect_format(path: Path, meta: dict, kind: str) -> None:
    if meta.get("format") != kind or meta.get("format_version") != FORMAT_VERSION:
        raise CorruptFileError(path, f"not an {kind} file of format {FORMAT_VERSION}")


def _text(path: Path, meta: dict, key: str) -> str:
    value = meta.get(key)
    if not isinstance(value, str) or not value:
        raise CorruptFileError(path, f"no {key} in its metadata")
    return value


def _number(path: Path, meta: dict, key: str, default: int | None = None) -> int:
    try:
        return int(meta[key])
    except (KeyError, TypeError, ValueError):
        if default is not None:
            return default
        raise CorruptFileError(path, f"{key} is {meta.get(key)!r}") from None
