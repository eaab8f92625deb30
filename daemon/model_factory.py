"""Compatibility path: `agentkv.daemon.model_factory` is `agentkv.daemon.engine.model_factory`."""

import sys

from .engine import model_factory

sys.modules[__name__] = model_factory
