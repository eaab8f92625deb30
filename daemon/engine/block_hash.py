"""Content hashes of KV-cache blocks: each full block of tokens hashed with the model's
fingerprint and chained to the hash of the block before it, so equal hashes mean equal
prefixes under the same model (vLLM's prefix caching). Pure Python, no mlx.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)
"""Chained content hash of one full block: identifies the block's tokens *and* its prefix."""

# Parent of the first block of a sequence; distinct from any sha256 digest in practice.
_ROOT_HASH = b"agentkv-root-block".ljust(32, b"\0")
# array's "i" is 4 bytes on every platform CPython supports, but check rather than assume.
_INT32 = next(code for code in ("i", "l") if array(code).itemsize == 4)
_BIG_ENDIAN = sys.byteorder == "big"


def _pack_tokens(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian int32 bytes (the hash input must not depend on the host)."""
    packed = array(_INT32, token_ids)
    if _BIG_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def _fingerprint_prefix(fingerprint: str) -> bytes:
    """Length-prefixed fingerprint, so fingerprint and token bytes cannot run into each other."""
    encoded = fingerprint.encode()
    return len(encoded).to_bytes(4, "little") + encoded


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], fingerprint: str) -> BlockHash:
    """Hash one block of tokens, chained to the hash of the block before it.

    Args:
        parent: hash of the previous block of the sequence, or None for the first block.
        token_ids: the block's token ids (each must fit in int32).
        fingerprint: identifies the model (and anything else that changes the KV values).

    Returns:
        A 32-byte sha256 digest. Equal prefixes under the same fingerprint give equal chains.
    """
    digest = hashlib.sha256(parent if parent is not None else _ROOT_HASH)
    digest.update(_fingerprint_prefix(fingerprint))
    digest.update(_pack_tokens(token_ids))
    return BlockHash(digest.digest())


def chain_hashes(
    token_ids: Sequence[int],
    block_size: int,
    fingerprint: str,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Hash every full block of a token sequence, each chained to the one before.

    Gives the same hashes as calling `hash_block` block by block, but packs the tokens once.

    Args:
        token_ids: the sequence's token ids.
        block_size: tokens per block (>= 1).
        fingerprint: identifies the model; see `hash_block`.
        parent: hash of the block preceding ``token_ids[0]``, or None at the sequence start.

    Returns:
        One hash per full block; a trailing partial block gets none.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    packed = memoryview(_pack_tokens(token_ids))
    fp_prefix = _fingerprint_prefix(fingerprint)
    stride = block_size * 4
    hashes: list[BlockHash] = []
    prev = parent if parent is not None else _ROOT_HASH
    for start in range(0, (len(token_ids) // block_size) * stride, stride):
        digest = hashlib.sha256(prev)
        digest.update(fp_prefix)
        digest.update(packed[start : start + stride])
        prev = digest.digest()
        hashes.append(BlockHash(prev))
    return hashes
