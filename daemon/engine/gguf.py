"""GGUF files (llama.cpp's format) as mlx-lm models: checked, converted once, cached.

``gguf_model_dir(path)`` turns a ``.gguf`` file into an ordinary mlx-lm model directory in
``models_cache_dir()``, keyed by the file's fingerprint, so that ``mlx_lm.load`` reads it
like any other model. What the conversion does:

- reads the file with ``mx.load`` (Q4_0, Q4_1 and Q8_0 tensors arrive as MLX affine
  quantized triples with group size 32; F32 and F16 as plain arrays; BF16 tensors, which
  mlx narrows to float16, are read here instead), after this module's own header check
  has proven the file complete;
- renames llama.cpp tensors to mlx-lm's names (``blk.N.attn_q`` ->
  ``model.layers.N.self_attn.q_proj`` ...) and writes a per-module quantization config
  (bits inferred from shapes: e.g. 4-bit layers beside an 8-bit embedding);
- undoes the row permutation llama.cpp's converter applies to ``attn_q``/``attn_k`` of
  llama models for its RoPE layout (qwen2/qwen3 files are not permuted);
- keeps the model float32: float weights and quantization scales/biases are widened, since
  on the CPU backend a float16 activation path runs many times slower;
- builds the tokenizer from the file's metadata (``gguf_tokenizer``).

Supported: architectures ``llama`` (which includes Mistral-style models), ``qwen2`` and
``qwen3``, byte-level BPE vocabularies; anything else is refused with
``UnsupportedModelError`` naming what is missing.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import ModelNotFoundError, UnsupportedModelError

if TYPE_CHECKING:
    import mlx.core as mx

GGUF_MAGIC = b"GGUF"
# Bump when the converted directory's contents change for the same GGUF file.
CONVERTER_VERSION = "v1"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Architectures whose q/k rows llama.cpp's converter permutes.
_PERMUTED = ("llama",)
_MAX_STRING = 64 * 2**20  # longest metadata string or array believed (a chat template, ...)

# ggml type id -> (block elements, block bytes); the types a header check can size.
_GGML_SIZES = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    30: (1, 2),  # BF16
}
# Types mlx loads natively; others it would dequantize to float16 through its gguf reader,
# untested here, so they are refused.
_LOADABLE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 30: "BF16"}
_BF16 = 30

# GGUF metadata value types: id -> struct format (scalars); 8 string, 9 array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_SCALARS |= {11: "<q", 12: "<d"}


@dataclass(slots=True, frozen=True)
class TensorInfo:
    """One tensor as the header lists it: byte span within the file and ggml type."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    start: int
    stop: int


@dataclass(slots=True, frozen=True)
class GGUFHeader:
    """A GGUF file's header, checked against the file's size.

    Attributes:
        metadata: key -> value (arrays of strings and numbers as lists).
        tensors: every tensor, with its absolute byte span.
        header_bytes: the raw bytes before the tensor data (metadata and tensor infos).
        size: the file's size.
    """

    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    header_bytes: bytes
    size: int


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse and check a GGUF file's header: every tensor must lie within the file.

    Raises:
        ModelNotFoundError: not a GGUF file, an unknown version, a corrupt header, or a
            file shorter than its tensors need (truncated).
        UnsupportedModelError: a tensor of a ggml type this module cannot size.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            return _parse(f, size, path)
    except (struct.error, UnicodeDecodeError, EOFError, MemoryError) as exc:
        raise ModelNotFoundError(f"{path} is not a readable GGUF file: corrupt header") from exc
    except OSError as exc:
        raise ModelNotFoundError(f"cannot read {path}: {exc}") from exc


def _parse(f: BinaryIO, size: int, path: Path) -> GGUFHeader:
    if f.read(4) != GGUF_MAGIC:
        raise ModelNotFoundError(f"{path} is not a GGUF file (no GGUF magic)")
    (version,) = _unpack(f, "<I")
    if version not in (2, 3):
        raise ModelNotFoundError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = _unpack(f, "<QQ")
    if n_tensors > size or n_kv > size:
        raise ModelNotFoundError(f"{path} is not a readable GGUF file: corrupt header")
    metadata = {}
    for _ in range(n_kv):
        key = _read_string(f)
        metadata[key] = _read_value(f, _unpack(f, "<I")[0])
    infos = [_read_tensor_info(f) for _ in range(n_tensors)]
    alignment = int(metadata.get("general.alignment", 32))
    if alignment <= 0:
        raise ModelNotFoundError(f"{path}: bad general.alignment {alignment}")
    header_end = f.tell()
    data = -(-header_end // alignment) * alignment
    tensors = tuple(_place(info, data, path) for info in infos)
    end = max((t.stop for t in tensors), default=data)
    if end > size:
        raise ModelNotFoundError(
            f"{path} is truncated: its tensors need {end} bytes, the file has {size}"
        )
    f.seek(0)
    return GGUFHeader(metadata, tensors, f.read(header_end), size)


def _place(info: tuple[str, tuple[int, ...], int, int], data: int, path: Path) -> TensorInfo:
    name, shape, ggml_type, offset = info
    if ggml_type not in _GGML_SIZES:
        raise UnsupportedModelError(f"{path}: tensor {name} has unknown ggml type {ggml_type}")
    block, nbytes = _GGML_SIZES[ggml_type]
    count = 1
    for dim in shape:
        count *= dim
    start = data + offset
    return TensorInfo(name, shape, ggml_type, start, start + -(-count // block) * nbytes)


def _unpack(f: BinaryIO, fmt: str) -> tuple[Any, ...]:
    raw = f.read(struct.calcsize(fmt))
    return struct.unpack(fmt, raw)  # struct.error when the file ends early


def _read_string(f: BinaryIO) -> str:
    (n,) = _unpack(f, "<Q")
    if n > _MAX_STRING:
        raise EOFError(f"string of {n} bytes")
    raw = f.read(n)
    if len(raw) != n:
        raise EOFError("file ends inside a string")
    return raw.decode("utf-8")


def _read_value(f: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind])[0]
    if kind == 8:
        return _read_string(f)
    if kind == 9:
        item, n = _unpack(f, "<IQ")
        if n > _MAX_STRING:
            raise EOFError(f"array of {n} items")
        if item in _SCALARS:  # one read for the whole array
            fmt = _SCALARS[item]
            return list(_unpack(f, f"<{n}{fmt[1:]}"))
        return [_read_value(f, item) for _ in range(n)]
    raise EOFError(f"unknown metadata value type {kind}")


def _read_tensor_info(f: BinaryIO) -> tuple[str, tuple[int, ...], int, int]:
    name = _read_string(f)
    (n_dims,) = _unpack(f, "<I")
    if n_dims > 8:
        raise EOFError(f"tensor {name} with {n_dims} dimensions")
    dims = _unpack(f, f"<{n_dims}Q")
    ggml_type, offset = _unpack(f, "<IQ")
    return name, tuple(reversed(dims)), ggml_type, offset  # ggml lists the fastest dim first


# -- conversion -----------------------------------------------------------------------------


def gguf_model_dir(path: str | os.PathLike[str]) -> Path:
    """The mlx-lm model directory converted from the GGUF file ``path``, converted on first
    use into ``models_cache_dir()`` (keyed by the file's fingerprint, so an edited file is
    converted again) and reused afterwards.

    Raises:
        ModelNotFoundError: not a complete GGUF file.
        UnsupportedModelError: an architecture, tensor type, tensor or tokenizer this
            converter does not handle.
    """
    from .fingerprint import gguf_fingerprint
    from .model_files import build_cached, models_cache_dir

    path = Path(path)
    header = read_header(path)
    check_supported(header, path)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:60]
    name = f"gguf-{stem}-{gguf_fingerprint(path, header)[:16]}-{CONVERTER_VERSION}"
    target = models_cache_dir() / name
    try:
        return build_cached(target, lambda d: convert(path, d, header))
    except OSError as exc:  # a read-only or full cache directory, ...
        raise ModelNotFoundError(f"cannot convert {path} into {target}: {exc}") from exc


def check_supported(header: GGUFHeader, path: Path) -> None:
    """Refuse, before any weight is read, what the conversion would get wrong.

    Raises:
        UnsupportedModelError: naming the architecture, tensor type or tokenizer.
    """
    from .gguf_tokenizer import check_tokenizer

    arch = header.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    for t in header.tensors:
        if t.ggml_type not in _LOADABLE_TYPES:
            raise UnsupportedModelError(
                f"{path}: tensor {t.name} has ggml type {t.ggml_type}; supported tensor "
                f"types: {', '.join(_LOADABLE_TYPES.values())}"
            )
    scaling = header.metadata.get(f"{arch}.rope.scaling.type", "none")
    rope_freqs = any(t.name == "rope_freqs.weight" for t in header.tensors)  # llama3 scaling
    if scaling not in ("none", "linear") or rope_freqs:
        raise UnsupportedModelError(f"{path}: RoPE scaling {scaling!r} is not supported")
    check_tokenizer(header.metadata, path)
    for t in header.tensors:  # e.g. MoE experts (ffn_gate_exps): no place in these models
        mlx_name(t.name)


def convert(path: Path, directory: Path, header: GGUFHeader) -> None:
    """Write the mlx-lm model directory for the GGUF file ``path`` into ``directory``."""
    import mlx.core as mx

    from .gguf_tokenizer import save_tokenizer
    from .model_files import write_model_files

    try:
        tensors, _ = mx.load(str(path), return_metadata=True)
    except Exception as exc:
        raise ModelNotFoundError(f"cannot read the tensors of {path}: {exc}") from exc
    for t in header.tensors:
        if t.ggml_type == _BF16:  # mlx reads these as float16: lossy, inf past 65504
            tensors[t.name] = _read_bf16(path, t)
    meta = header.metadata
    try:
        config = model_config(meta, tensors)
        weights = map_weights(tensors, config, permuted=meta["general.architecture"] in _PERMUTED)
        if quantization := quantization_config(weights):
            config["quantization"] = quantization
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError) as exc:
        # metadata that contradicts the tensors (head counts vs shapes, ...)
        raise ModelNotFoundError(f"{path}: inconsistent GGUF model: {exc!r}") from exc
    write_model_files(directory, config, weights, lambda d: save_tokenizer(meta, d))
    source = {"gguf": str(path.resolve()), "size": header.size, "converter": CONVERTER_VERSION}
    (directory / "gguf_source.json").write_text(json.dumps(source, indent=2) + "\n")


def _read_bf16(path: Path, t: TensorInfo) -> mx.array:
    """A BF16 tensor read from the file, widened to float32 exactly."""
    import mlx.core as mx
    import numpy as np

    with open(path, "rb") as f:
        f.seek(t.start)
        raw = np.frombuffer(f.read(t.stop - t.start), dtype="<u2")
    return mx.array((raw.astype(np.uint32) << 16).view(np.float32).reshape(t.shape))


def model_config(meta: dict[str, Any], tensors: dict[str, mx.array]) -> dict[str, Any]:
    """mlx-lm's ``config.json`` for the model the GGUF metadata describes."""
    arch = meta["general.architecture"]

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise UnsupportedModelError(f"GGUF metadata lacks {arch}.{name}")
        return value

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    head_dim = int(key("attention.key_length", hidden // heads))
    if (rope_dims := int(key("rope.dimension_count", head_dim))) != head_dim:
        raise UnsupportedModelError(
            f"RoPE on {rope_dims} of {head_dim} head dimensions (partial rotary) is not "
            "supported for GGUF files"
        )
    config: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 4096)),
        # The embedding's rows: a vocabulary padded past its last token is common.
        "vocab_size": int(tensors["token_embd.weight"].shape[0]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
    }
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(key("rope.scaling.factor"))}
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    if (bos := meta.get("tokenizer.ggml.bos_token_id")) is not None:
        config["bos_token_id"] = int(bos)
    # End of turn as well as end of text (llama3's <|eot_id|>): generation stops at any.
    ends = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    ends = list(dict.fromkeys(int(e) for e in ends if e is not None))
    if ends:
        config["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    return config


_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TENSOR_NAME = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|scales|biases|bias)")


def mlx_name(name: str) -> str:
    """mlx-lm's parameter name for a llama.cpp tensor name.

    Raises:
        UnsupportedModelError: a tensor this converter has no place for.
    """
    match = _TENSOR_NAME.fullmatch(name)
    module = None
    if match is not None:
        layer, base, suffix = match.groups()
        if layer is None:
            module = _GLOBAL_NAMES.get(base)
        elif base in _LAYER_NAMES:
            module = f"model.layers.{layer}.{_LAYER_NAMES[base]}"
    if module is None:
        raise UnsupportedModelError(f"GGUF tensor {name!r} has no counterpart in mlx-lm")
    return f"{module}.{suffix}"


def map_weights(
    tensors: dict[str, mx.array], config: dict[str, Any], *, permuted: bool
) -> dict[str, mx.array]:
    """Rename, un-permute q/k rows (``permuted``) and widen to float32."""
    import mlx.core as mx

    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    weights = {}
    for name, value in tensors.items():
        target = mlx_name(name)
        module = target.rsplit(".", 2)[-2]
        if permuted and module in heads:
            value = unpermute_rows(value, heads[module])
        if value.dtype in (mx.float16, mx.bfloat16):
            value = value.astype(mx.float32)
        weights[target] = value
    mx.eval(weights)
    return weights


def unpermute_rows(value: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's RoPE row permutation of a q/k projection's rows.

    llama.cpp's converter reorders each head's rows from HF's rotate-half layout into
    interleaved pairs: ``reshape(n_heads, 2, head_dim/2, ...).swapaxes(1, 2)``. Rows are
    whole output features, so weight, quantization scales/biases and bias rows all move
    alike.
    """
    rows = value.shape[0]
    parts = value.reshape(n_heads, rows // n_heads // 2, 2, *value.shape[1:])
    return parts.swapaxes(1, 2).reshape(value.shape)


def quantization_config(weights: dict[str, mx.array]) -> dict[str, Any]:
    """mlx-lm's per-module quantization config: bits from the packed weight's shape."""
    modules: dict[str, dict[str, int]] = {}
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        packed = weights[f"{module}.weight"]
        in_dims = scales.shape[-1] * 32
        modules[module] = {"group_size": 32, "bits": packed.shape[-1] * 32 // in_dims}
    if not modules:
        return {}
    bits = [m["bits"] for m in modules.values()]
    return {"group_size": 32, "bits": max(set(bits), key=bits.count), **modules}
