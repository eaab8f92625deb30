"""Model fingerprints: what makes a stored cache belong to one model and no other.

Two ways, both cheap at any model size:

- `model_fingerprint(model_dir)`, from the files: config.json, the tokenizer files (small),
  and for each safetensors weight file its name, size and header (tensor names, dtypes,
  shapes, offsets), plus a few bytes at the start, middle and end of every tensor's data.
  Changing the config, the tokenizer or any weight file's layout changes it; so does
  fine-tuning or re-quantizing any tensor into a file of identical layout (such a change
  alters the tensor's values throughout, so its samples too). It reads kilobytes, not the
  gigabytes of weights.
- `weights_fingerprint(model)`, from a loaded model: its config, and each parameter's name,
  shape, dtype and values sampled the same way. Used when no model directory is at hand.

Not a content hash: an edit confined to values between the samples goes unseen. Any real
change of weights (training, merging, quantizing) touches them throughout.
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
SAMPLE = 32  # bytes (file) or elements (loaded model) taken at each of three places
MAX_HEADER = 100 * 2**20


def model_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """Fingerprint a model directory from its config, tokenizer, weight-file headers and
    samples of every tensor's data; or a GGUF file (``gguf_fingerprint``)."""
    root = Path(model_dir)
    if root.is_file():
        return gguf_fingerprint(root)
    h = hashlib.sha256(b"agentkv-model-v2")
    for name in ("config.json", *TOKENIZER_FILES):
        path = root / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    for path in sorted(root.glob("*.safetensors")):
        h.update(path.name.encode() + b"\0" + _weights_signature(path))
    return h.hexdigest()[:32]


def gguf_fingerprint(path: str | os.PathLike[str], header=None) -> str:
    """Fingerprint a GGUF file from its size, its whole header (metadata: architecture,
    tokenizer, chat template; tensor names, types, shapes, offsets) and the start, middle
    and end bytes of every tensor.

    Args:
        path: the GGUF file.
        header: its ``gguf.GGUFHeader`` if already read (else it is read here).

    Raises:
        ModelNotFoundError: not a complete GGUF file.
    """
    from .gguf import read_header

    header = header or read_header(path)
    h = hashlib.sha256(b"agentkv-gguf-v1")
    h.update(str(header.size).encode() + b"\0" + header.header_bytes)
    with open(path, "rb") as f:
        for t in header.tensors:
            for at in _sample_offsets(t.start, t.stop, SAMPLE):
                f.seek(at)
                h.update(f.read(min(SAMPLE, t.stop - at)))
    return h.hexdigest()[:32]


def _weights_signature(path: Path) -> bytes:
    """Size, header, and the start, middle and end bytes of each tensor the header lists
    (of the whole data section when the header is not a safetensors one)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        header = f.read(min(n, MAX_HEADER))
        base = 8 + n
        spans = _tensor_spans(header) or [(0, max(0, size - base))]
        parts = [str(size).encode(), header]
        for start, stop in spans:
            for at in _sample_offsets(start, stop, SAMPLE):
                f.seek(base + at)
                parts.append(f.read(min(SAMPLE, stop - at)))
    return b"".join(parts)


def _tensor_spans(header: bytes) -> list[tuple[int, int]]:
    """Each tensor's (start, stop) in the data section, or [] if the header is unreadable."""
    try:
        entries = json.loads(header)
        spans = [
            (int(e["data_offsets"][0]), int(e["data_offsets"][1]))
            for name, e in entries.items()
            if name != "__metadata__"
        ]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return []
    return sorted((a, b) for a, b in spans if 0 <= a <= b)


def _sample_offsets(start: int, stop: int, width: int) -> list[int]:
    """Where the start, middle and end samples of [start, stop) begin."""
    if stop - start <= 3 * width:
        return [start]
    return [start, start + (stop - start) // 2, stop - width]


def weights_fingerprint(model) -> str:
    """Hash a model's config plus each weight's name, shape, dtype and values sampled at
    its start, middle and end.

    Cheap at any model size (a few elements per tensor), yet two random seeds, two
    checkpoints or a fine-tune of any layer almost surely differ there.
    """
    h = hashlib.sha256(b"agentkv-weights-v2")
    args = getattr(model, "args", None)
    config = vars(args) if args is not None and hasattr(args, "__dict__") else {}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        flat = value.reshape(-1)
        for at in _sample_offsets(0, flat.size, SAMPLE):
            sample = flat[at : at + SAMPLE]
            if sample.dtype == mx.bfloat16:
                sample = sample.astype(mx.float32)
            h.update(memoryview(sample).tobytes())
    return h.hexdigest()[:32]
