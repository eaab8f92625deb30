"""Per-request samplers whose randomness belongs to the request, not to the batch.

mlx-lm's own sampler draws from MLX's global random state, so a request's tokens would
depend on what else shares the batch. Here each request derives one key per step from its
own seed and step number, and the batch generator calls each request's sampler on that
request's row only.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from .requests import SamplingParams

Sampler = Callable[[mx.array], mx.array]


def make_request_sampler(
    params: SamplingParams, on_error: Callable[[Exception], None]
) -> Sampler | None:
    """A sampler for one request, or None for greedy (the batch's shared argmax).

    Args:
        params: validated sampling parameters.
        on_error: called with the exception if sampling fails, so the engine can finish
            this request with an error while the batch keeps going (a greedy token is
            returned in its place).
    """
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    filters = _filters(params)
    inv_temp = 1.0 / params.temperature
    step = 0

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal step
        key = mx.random.key(_step_seed(seed, step))
        step += 1
        try:
            for f in filters:
                logprobs = f(logprobs)
            return mx.random.categorical(logprobs * inv_temp, key=key)
        except Exception as exc:  # isolate this request's failure from the batch
            on_error(exc)
            return mx.argmax(logprobs, axis=-1)

    return sample


def _filters(params: SamplingParams) -> list[Callable[[mx.array], mx.array]]:
    out = []
    if 0.0 < params.top_p < 1.0:
        out.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p > 0.0:
        out.append(lambda x: apply_min_p(x, params.min_p, 1))
    if params.top_k > 0:
        # k at or past the vocabulary keeps every token (mlx-lm's apply_top_k refuses it)
        out.append(lambda x: x if params.top_k >= x.shape[-1] else apply_top_k(x, params.top_k))
    return out


def _step_seed(seed: int, step: int) -> int:
    """A well-mixed 63-bit seed for (request seed, step)."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
