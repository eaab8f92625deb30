"""Where the store's files live, and the checks every path read from the index goes through.

The store names its files itself: `blocks/<ab>/<hash>.safetensors` (ab: the hash's first two
hex digits) and `agents/<key>/<gen>.safetensors` (key: a hash of the agent id, gen: hex).
The index records those names, but an index can be damaged or edited, so a name read back
from it is used only if it is one the store could have written, and only if no symlink
leads it out of the store. Anything else is a corrupt row: the file is never read, moved
or deleted.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

BLOCK_HASH = re.compile(r"(?:[0-9a-f]{2}){1,64}")  # a hex digest (sha256 for the engine)
STATE_FILE = re.compile(r"agents/([0-9a-f]{32})/[0-9a-f]{1,32}\.safetensors")


def is_block_hash(value: object) -> bool:
    """True for a lowercase hex digest: the only block hashes the store names files after."""
    return isinstance(value, str) and BLOCK_HASH.fullmatch(value) is not None


def block_rel(block_hash: str) -> str:
    """A block's file, relative to the store's root.

    Raises:
        ValueError: not a block hash (see `is_block_hash`).
    """
    if not is_block_hash(block_hash):
        raise ValueError(f"not a block hash: {block_hash!r}")
    return f"blocks/{block_hash[:2]}/{block_hash}.safetensors"


def agent_key(agent_id: str) -> str:
    """A file-system-safe name for an agent (ids are never used as paths)."""
    return hashlib.sha256(agent_id.encode()).hexdigest()[:32]


def is_state_rel(rel: object, agent_id: str) -> bool:
    """True if `rel` is a state file name the store writes for that agent."""
    if not isinstance(rel, str):
        return False
    match = STATE_FILE.fullmatch(rel)
    return match is not None and match.group(1) == agent_key(agent_id)


class Containment:
    """Checks that a path under the root reaches no further than the root.

    Every component below the root must be a real directory or file, not a symlink (a
    symlink may point anywhere, and a quarantine move or an unlink would then act on a file
    outside the store). Directories already checked are remembered: only the store creates
    them.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: set[Path] = set()

    def contains(self, path: Path, *, link_ok: bool = False) -> bool:
        """True if `path` (a store-named path under the root) stays inside the store.

        A file that does not exist is contained (reading it fails as "missing").

        Args:
            path: the path.
            link_ok: the last component may be a symlink: right for an unlink or a rename,
                which act on the link itself, and for a read that opens with O_NOFOLLOW;
                never for another read.
        """
        if path.parent in self._dirs and path.name not in ("", ".", ".."):
            return self._not_a_link(path, link_ok)  # its directories are known good
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return False
        if not rel.parts or ".." in rel.parts:
            return False
        parent = self.root
        for part in rel.parts[:-1]:
            parent = parent / part
            if parent in self._dirs:
                continue
            try:
                mode = os.lstat(parent).st_mode
            except FileNotFoundError:
                return True  # nothing there to lead anywhere: reading it fails as missing
            except OSError:
                return False
            if not stat.S_ISDIR(mode):
                return False
            self._dirs.add(parent)
        return self._not_a_link(path, link_ok)

    @staticmethod
    def _not_a_link(path: Path, link_ok: bool) -> bool:
        try:
            return link_ok or not stat.S_ISLNK(os.lstat(path).st_mode)
        except FileNotFoundError:
            return True
        except OSError:
            return False
