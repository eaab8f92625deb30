"""Model fingerprints: what makes a stored cache belong to one model and no other.

Two ways, both cheap at any model size:

- `model_fingerprint(model_dir)`, from the files: config.json, the tokenizer files (small),
  and for each safetensors weight file its name, size and header (tensor names, dtypes,
  shapes, offsets). Changing the config, the tokenizer or any weight file's layout changes
  it; it reads kilobytes, not the gigabytes of weights. Re-quantizing or fine-tuning into a
  file of identical layout would not change a header, so the file's size and the first and
  last 64 KiB of tensor data are hashed too.
- `weights_fingerprint(model)`, from a loaded model: its config, and each parameter's name,
  shape, dtype and first values. Used when no model directory is at hand.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)
SAMPLE = 64 * 1024


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """Fingerprint a model directory from its config, tokenizer and weight-file headers."""
    root = Path(model_dir)
    h = hashlib.sha256(b"agentkv-model-v1")
    for name in ("config.json", *TOKENIZER_FILES):
        path = root / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    for path in sorted(root.glob("*.safetensors")):
        h.update(path.name.encode() + b"\0" + _weights_signature(path))
    return h.hexdigest()[:32]


def _weights_signature(path: Path) -> bytes:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        header = f.read(min(n, 100 * 2**20))
        first = f.read(SAMPLE)
        f.seek(max(8 + n, size - SAMPLE))
        last = f.read(SAMPLE)
    return str(size).encode() + header + first + last


def weights_fingerprint(model) -> str:
    """Hash a model's config plus each weight's name, shape, dtype and first values.

    Cheap at any model size (a few elements per tensor), yet two random seeds or two
    checkpoints of one architecture almost surely differ in their leading values.
    """
    h = hashlib.sha256()
    args = getattr(model, "args", None)
    config = vars(args) if args is not None and hasattr(args, "__dict__") else {}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        head = value.reshape(-1)[:16]
        if head.dtype == mx.bfloat16:
            head = head.astype(mx.float32)
        h.update(memoryview(head).tobytes())
    return h.hexdigest()[:32]
