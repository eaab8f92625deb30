"""agentkv daemon: `engine/` (everything that touches MLX) and `service/` (the process,
the I/O loop, the request layer, `daemonctl`), sharing `errors`.

The engine's public names are also reachable from here, loaded on first use (PEP 562) so
that importing `agentkv.daemon.service` never pulls in MLX:

    from agentkv.daemon import BlockPoolBatchEngine   # same as agentkv.daemon.engine
"""

from __future__ import annotations

import importlib


def __getattr__(name: str):
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    engine = importlib.import_module(".engine", __name__)
    if name not in engine.__all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(engine, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value
