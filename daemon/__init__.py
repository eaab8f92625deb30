"""agentkv daemon: the model, the block pool and the engine.

from agentkv.daemon import BlockPoolBatchEngine, BlockPool, ModelCacheSpec
"""

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
