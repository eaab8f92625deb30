"""Reference runs straight through mlx-lm (no agentkv) and small engine helpers for tests."""

from __future__ import annotations

import hashlib
import os

import mlx.core as mx
import numpy as np
from mlx_lm import stream_generate
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from agentkv.daemon import BlockPool, BlockPoolBatchEngine, ModelCacheSpec, SamplingParams
from agentkv.daemon.engine.sampling import make_request_sampler
from agentkv.storage.records import BlockRecord, TurnRecord
from agentkv.storage.tensor_files import HostTensor

FULL = os.environ.get("AGENTKV_FULL") == "1"


def scratch_generate(model, tokenizer, prompt, max_tokens: int) -> tuple[list[int], str]:
    """Greedy tokens (without a final EOS) and text of `mlx_lm.stream_generate`."""
    tokens, text = [], ""
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        text += r.text
        if r.finish_reason != "stop":
            tokens.append(r.token)
    return tokens, text


def scratch_tokens(model, prompt: list[int], max_tokens: int, params=None, eos=()) -> list[int]:
    """Tokens of mlx-lm's `generate_step` on the whole context, stopping at EOS like the engine.

    With `params`, the request's own seeded sampler is used, as the engine would build it.
    """
    sampler = None
    if params is not None and not params.greedy:
        sampler = make_request_sampler(params, _raise)
    out = []
    for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=sampler):
        if token in eos:
            break
        out.append(token)
    return out


def make_engine(model, tokenizer, *, block_size=16, total_blocks=512, **kw) -> BlockPoolBatchEngine:
    """An engine with its own pool."""
    spec = ModelCacheSpec.from_model(model, block_size=block_size)
    pool = BlockPool(spec, total_blocks=total_blocks)
    return BlockPoolBatchEngine(model, tokenizer, pool, spec, **kw)


def run_all(engine) -> dict:
    """Drive the engine until idle; completions by uid."""
    return {c.uid: c for c in engine.step()}


def prefill_caches(model, tokens: list[int]) -> list:
    """mlx-lm caches holding exactly `tokens` (what a finished sequence hands back)."""
    caches = make_prompt_cache(model)
    model(mx.array([tokens]), cache=caches)
    mx.eval([c.state for c in caches])
    return caches


def random_tokens(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    """n random ordinary token ids (avoiding the low special ids)."""
    return rng.integers(8, vocab, size=n).tolist()


def synthetic_turn(
    agent_id: str, fingerprint: str, *, blocks: int, tail: int, block_size: int, shared: int = 0
) -> TurnRecord:
    """A turn of small random float32 tensors (no model): `blocks` full blocks, the first
    `shared` of them common to every agent of the model, plus `tail` rows in the state file."""
    rng = np.random.default_rng(len(agent_id))

    def kv(rows: int) -> dict[str, HostTensor]:
        shape = (1, 2, rows, 4)
        return {
            "k.0": HostTensor("float32", rng.standard_normal(shape).astype(np.float32)),
            "v.0": HostTensor("float32", rng.standard_normal(shape).astype(np.float32)),
        }

    owners = ["shared" if i < shared else agent_id for i in range(blocks)]
    digests = [
        hashlib.sha256(f"{fingerprint}/{owner}/{i}".encode()).hexdigest()
        for i, owner in enumerate(owners)
    ]
    n = blocks * block_size + tail
    return TurnRecord(
        agent_id,
        fingerprint,
        list(range(n)),
        n,
        [BlockRecord(d, block_size, kv(block_size)) for d in digests],
        {f"tail.{k}": t for k, t in kv(tail).items()} if tail else {},
        {"tail_tokens": str(tail)} if tail else {},
    )


def eos_ids(tokenizer) -> set[int]:
    """The tokenizer's EOS ids."""
    return set(tokenizer.eos_token_ids)


def greedy() -> SamplingParams:
    """Greedy sampling parameters."""
    return SamplingParams()


def _raise(exc: Exception) -> None:
    raise exc
