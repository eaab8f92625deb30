"""Shared fixtures: the tiny test models, built once per session.

- ``model_dirs``: arch -> directory of a tiny random model (seed 0), for every entry of
  ``model_factory.ARCHITECTURES``.
- ``loaded_models``: arch -> ``(model, tokenizer)`` loaded from those directories with
  ``load_model`` (mlx-lm's ``TokenizerWrapper``). Keep all MLX work on the thread that runs
  the tests: MLX streams are thread-local.

``AGENTKV_HOME`` points at a session temp directory for every test, so nothing (the default
model included) is ever written under the user's home.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentkv.daemon.model_factory import ARCHITECTURES, build_model_dir, load_model


@pytest.fixture(scope="session", autouse=True)
def _isolated_agentkv_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("agentkv-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AGENTKV_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model_dir(root / arch, arch, seed=0) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def loaded_models(model_dirs: dict[str, Path]) -> dict[str, tuple[Any, Any]]:
    return {arch: load_model(path) for arch, path in model_dirs.items()}
