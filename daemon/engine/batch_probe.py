"""Does the model compute the same thing in a batch as alone? Checked once per model.

The engine batches agents' turns through mlx-lm's BatchGenerator, which left-pads shorter
prompts. Some mlx-lm models let that padding leak: their recurrent layers take no mask
(mamba, jamba, nemotron_h), or their attention mask broadcasts against the wrong axis
(gemma2 with fewer KV heads than heads). Their cache classes are ones agentkv keeps, so
only their behaviour tells: a few short prompts of different lengths go through one
BatchGenerator, and each next-token distribution must match that prompt's run alone.
A model that differs (or fails) is refused with UnsupportedModelError rather than
serving wrong tokens.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

from ..errors import UnsupportedModelError

# Batches of prompts of different lengths: sizes 2, 3 and 4, so that a batch size equal
# to the model's KV-head count (where a misaligned mask broadcasts silently) is covered.
BATCHES = ([[1], [2, 3, 4, 5, 6]], [[1], [2, 3, 4], [5, 6, 7, 8, 9, 10, 11]], [[3], [4, 5]] * 2)
# Largest difference of log-probabilities taken for rounding: a leak moves them by units.
TOLERANCE = {"float32": 0.05}
LOW_PRECISION_TOLERANCE = 0.5

_checked: dict[int, None] = {}  # id(model) of models that passed (dropped with the model)


def check_batching(model, dtype: str) -> None:
    """Refuse a model whose batched next-token distributions differ from its own alone.

    Args:
        model: the mlx-lm model.
        dtype: its cache dtype (float32 gets a tight tolerance, lower precisions a loose one).

    Raises:
        UnsupportedModelError: batching changes (or breaks) what the model computes.
    """
    if id(model) in _checked:
        return
    tolerance = TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)
    try:
        for batch in BATCHES:
            alone = [_next_logprobs(model, [p])[0] for p in batch]
            together = _next_logprobs(model, batch)
            for length, a, b in zip(map(len, batch), alone, together, strict=True):
                gap = mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item()
                if not gap <= tolerance:  # NaN counts as a difference
                    raise UnsupportedModelError(
                        f"{_name(model)} computes a {length}-token prompt differently in a "
                        f"batch of {len(batch)} (log-probabilities differ by {gap:.3g}): mlx-lm's "
                        "batched generation leaks padding for this model, so agentkv cannot "
                        "serve it exactly"
                    )
    except UnsupportedModelError:
        raise
    except Exception as exc:  # the model cannot run batched at all
        raise UnsupportedModelError(
            f"{_name(model)} fails in mlx-lm's batched generation: {type(exc).__name__}: {exc}"
        ) from exc
    _checked[id(model)] = None
    weakref.finalize(model, _checked.pop, id(model), None)


def _next_logprobs(model, prompts: Sequence[list[int]]) -> list[mx.array]:
    """Each prompt's next-token log-probabilities from one BatchGenerator."""
    gen = BatchGenerator(model, max_tokens=1)
    try:
        uids = gen.insert([list(p) for p in prompts], [1] * len(prompts))
        got: dict[int, mx.array] = {}
        while responses := gen.next_generated():
            for r in responses:
                got.setdefault(r.uid, r.logprobs)
    finally:
        gen.close()
    return [got[u] for u in uids]


def _name(model) -> str:
    args = getattr(model, "args", None)
    return f"model type {getattr(args, 'model_type', type(model).__name__)!r}"
