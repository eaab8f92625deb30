"""agentkv daemon: the model, the block pool and the engine.

from agentkv.daemon import BlockPoolBatchEngine, BlockPool, ModelCacheSpec

The names below load on first use (PEP 562): `daemonctl status`, `stop` and the other
commands that only talk to a daemon never import MLX, mlx-lm or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the submodule that defines it
_EXPORTS = {
    "BlockPool": "block_pool",
    "AgentInfo": "engine",
    "BlockPoolBatchEngine": "engine",
    "AgentExistsError": "errors",
    "AgentKVError": "errors",
    "CacheReconstructionError": "errors",
    "EngineClosedError": "errors",
    "InvalidRequestError": "errors",
    "ModelNotFoundError": "errors",
    "PoolExhaustedError": "errors",
    "UnknownAgentError": "errors",
    "UnsupportedModelError": "errors",
    "Completion": "requests",
    "SamplingParams": "requests",
    "StepEvent": "requests",
    "Usage": "requests",
    "LayerKind": "spec",
    "LayerSpec": "spec",
    "ModelCacheSpec": "spec",
}

__all__ = [
    "AgentExistsError",
    "AgentInfo",
    "AgentKVError",
    "BlockPool",
    "BlockPoolBatchEngine",
    "CacheReconstructionError",
    "Completion",
    "EngineClosedError",
    "InvalidRequestError",
    "LayerKind",
    "LayerSpec",
    "ModelCacheSpec",
    "ModelNotFoundError",
    "PoolExhaustedError",
    "SamplingParams",
    "StepEvent",
    "UnknownAgentError",
    "UnsupportedModelError",
    "Usage",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ resolves them
    from .block_pool import BlockPool
    from .engine import AgentInfo, BlockPoolBatchEngine
    from .errors import (
        AgentExistsError,
        AgentKVError,
        CacheReconstructionError,
        EngineClosedError,
        InvalidRequestError,
        ModelNotFoundError,
        PoolExhaustedError,
        UnknownAgentError,
        UnsupportedModelError,
    )
    from .requests import Completion, SamplingParams, StepEvent, Usage
    from .spec import LayerKind, LayerSpec, ModelCacheSpec


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:  # lets `from agentkv.daemon import persistence` import the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
