"""The README's first command: the demo, run as a newcomer runs it (a real daemon, the
client, a restart), passes and prints readable turns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from agentkv.daemon.demo_model import corpus_words

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


def test_demo_passes_and_restores_each_agent_once():
    proc = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "PASS" in out and "FAIL" not in out
    rows = re.findall(
        r"turn (\d)\s+(\w+)\s+prompt\s+(\d+)\s+cached\s+(\d+)\s+restored\s+(\d+)", out
    )
    assert len(rows) == 9
    for turn, _agent, prompt, cached, restored in rows:
        # turn 3 comes back from disk whole (all but its new prompt); nothing else does
        assert (int(restored) == int(cached) > 0) if turn == "3" else int(restored) == 0
        assert int(cached) < int(prompt)
    assert "refcount 3" in out
    continuations = re.findall(r"^\s+[A-Z][\w ]+ -> (.*)$", out, flags=re.M)
    assert len(continuations) == 9
    words = set(re.findall(r"[a-z']+", " ".join(continuations).lower()))
    assert words <= corpus_words()  # the model speaks the corpus's English, not noise
    assert not list(Path("/tmp").glob("agentkv-demo-*/store/daemon.pid"))
