"""The engine: everything that touches MLX.

The model cache spec, the block pool, K/V blocks, the cache manager, persistence, the
batch engine, sampling, the batch probe and the offline models. Importing this package
imports MLX and mlx-lm; the service layer (`agentkv.daemon.service`) never does at module
level.

    from agentkv.daemon.engine import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
"""

from ..errors import (
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
from .batch_engine import AgentInfo, BlockPoolBatchEngine
from .block_pool import BlockPool
from .fingerprint import model_fingerprint
from .gguf import gguf_model_dir
from .model_factory import load_model, smollm2_gguf
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
    "gguf_model_dir",
    "load_model",
    "model_fingerprint",
    "smollm2_gguf",
]
