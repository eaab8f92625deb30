"""Model directories on disk: written whole (a temporary sibling renamed into place,
fsynced), built once across processes under a lock (``build_cached``), and where models
built on demand are kept (``models_cache_dir``). The random test models
(``model_factory``), the demo model and GGUF conversions (``gguf``) are written here.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentkv.storage.tensor_files import fsync_path

if TYPE_CHECKING:
    import mlx.core as mx

# Files whose presence marks a complete model directory; they appear together because a
# directory is only ever renamed into place once fully written.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# ChatML, with the bos token up front the way Llama templates do it: mlx-lm encodes a
# templated prompt with add_special_tokens=False, so the template must supply it.
_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def models_cache_dir() -> Path:
    """Where models built on demand (``ensure_random_model``) are kept.

    ``$AGENTKV_HOME/models`` when ``AGENTKV_HOME`` is set, else
    ``$XDG_CACHE_HOME/agentkv/models``, else ``~/.cache/agentkv/models``.
    """
    if home := os.environ.get("AGENTKV_HOME"):
        return Path(home).expanduser() / "models"
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "agentkv" / "models"


def build_cached(target: Path, write: Callable[[Path], None]) -> Path:
    """``target``, built by ``write(staging_dir)`` on first use, renamed into place.

    An exclusive ``fcntl`` lock on a file next to ``target`` makes concurrent first calls
    from several processes build it once. Staging directories left by a build that
    crashed are removed under the same lock.
    """
    if is_model_dir(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.with_name(target.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if is_model_dir(target):  # built by another process while we waited
            return target
        # Only lock holders build here, so any staging directory left now is a crash's.
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        return build_dir(target, write, overwrite=False)
    finally:
        os.close(fd)  # closing releases the lock


def is_model_dir(path: Path) -> bool:
    """A complete model directory: every file `mlx_lm.load` needs is there."""
    return path.is_dir() and all((path / name).is_file() for name in _REQUIRED_FILES)


def is_empty_dir(path: Path) -> bool:
    """An existing directory with nothing in it."""
    return path.is_dir() and next(path.iterdir(), None) is None


def save_model_dir(
    directory: Path, config: dict[str, Any], weights: dict[str, mx.array], tokenizer_json: str
) -> None:
    """Write an mlx-lm model directory: config, weights and tokenizer files, fsynced.

    Args:
        directory: an existing (empty) directory, or one to create.
        config: the ``config.json`` contents.
        weights: parameter name -> array, in mlx-lm's naming.
        tokenizer_json: a serialized ``tokenizers`` tokenizer with the special tokens
            ``<pad> <s> </s> <|im_start|> <|im_end|>``.
    """
    write_model_files(directory, config, weights, lambda d: _save_tokenizer(d, tokenizer_json))


def write_model_files(
    directory: Path,
    config: dict[str, Any],
    weights: dict[str, mx.array],
    write_tokenizer: Callable[[Path], None],
) -> None:
    """Write config and weights, let ``write_tokenizer(directory)`` add the tokenizer
    files, and fsync them all (``save_model_dir`` with any tokenizer)."""
    import mlx.core as mx

    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / "config.json", config)
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})
    write_tokenizer(directory)
    for file in directory.iterdir():
        if file.is_file():
            fsync_path(file)
    fsync_path(directory)


def build_dir(target: Path, write: Callable[[Path], None], *, overwrite: bool) -> Path:
    """``target``, written by ``write(staging_dir)`` into a temporary sibling and renamed
    into place (``install_dir``), so it never holds a half-written model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it 0700; a model is not a secret
        write(staging)
        install_dir(staging, target, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def install_dir(staging: Path, target: Path, *, overwrite: bool) -> None:
    """Rename a fully written ``staging`` directory to ``target``.

    A complete model that appears at ``target`` meanwhile (another builder won the race)
    is kept unless ``overwrite`` is set.
    """
    if overwrite and (target.exists() or target.is_symlink()):
        # rename() cannot replace a non-empty directory: move the old one aside first.
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, trash / "model")
        os.replace(staging, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            os.rename(staging, target)
        except OSError:
            if not is_model_dir(target):
                raise
    fsync_path(target.parent)


def _save_tokenizer(directory: Path, tokenizer_json: str) -> None:
    """Write the tokenizer files, with deterministic bytes and a portable class name."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=8192,
    )
    tokenizer.save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    # transformers 5 writes its backend's class name, which 4.x cannot resolve; and 4.x
    # reads the chat template from tokenizer_config.json only (5.x reads both places).
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config["chat_template"] = _CHAT_TEMPLATE
    _write_json(config_path, tokenizer_config)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
