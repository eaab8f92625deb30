"""Compatibility path: `agentkv.daemon.gguf` is `agentkv.daemon.engine.gguf`."""

import sys

from .engine import gguf

sys.modules[__name__] = gguf
