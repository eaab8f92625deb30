"""The start-up heap, frozen out of the cyclic garbage collector.

A loaded model, its tokenizer and the libraries they import leave hundreds of thousands of
tracked objects that live as long as the process. Every full collection walked them all with
the GIL held: 50-120 ms, during which no engine step ran (measured in the overload soak:
these were its longest inter-token gaps). Frozen, a full collection walks only what was made
since start-up. Freezing changes no lifetimes: reference counting still frees everything; only
a cycle among the frozen objects would stay until exit.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect start-up garbage, then freeze what is left; returns how many were frozen."""
    gc.collect()  # so start-up garbage is freed now, not kept frozen for good
    gc.freeze()
    return gc.get_freeze_count()
