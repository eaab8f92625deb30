"""Compatibility path: `agentkv.daemon.fingerprint` is `agentkv.daemon.engine.fingerprint`."""

import sys

from .engine import fingerprint

sys.modules[__name__] = fingerprint
