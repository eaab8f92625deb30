"""What a client is told about a finished turn, against real daemons: the exact tokens
appended to the agent's context (EOS included), a cancelled stream that says so, and an
`inspect` state column that matches where the agent's cache really is."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from agentkv.client import TurnCancelled
from agentkv.daemon.engine.model_factory import load_model

BLOCK = 16
PROMPT = [5, 6, 7, 8, 9, 10]


def _model_with_eos(model_dir, tmp_path, eos: list[int], eos_token: str | None = None):
    """A copy of the tiny llama whose config names these EOS ids (mlx-lm adds the
    tokenizer's own EOS token: `eos_token` replaces that)."""
    copy = tmp_path / "eos-model"
    shutil.copytree(model_dir, copy)
    for name, key, value in (
        ("config.json", "eos_token_id", eos),
        ("tokenizer_config.json", "eos_token", eos_token),
    ):
        if value is not None:
            config = json.loads((copy / name).read_text())
            config[key] = value
            (copy / name).write_text(json.dumps(config))
    return copy


def test_context_token_ids_rebuild_the_context_with_two_eos_ids(daemon_factory, tmp_path):
    """With two EOS ids, `token_ids` (no EOS) cannot say which one the context holds:
    `context_token_ids` can. A turn that ends on the second EOS id has it as its last
    context token, and prompt + context_token_ids is the agent's context, turn after turn."""
    plain = daemon_factory(args=("--block-size", str(BLOCK), "--pool-blocks", "64"))
    plain.start()
    with plain.client() as c:
        free = c.generate("probe", PROMPT, max_tokens=12)
    assert free.finish_reason == "length" and free.context_token_ids == free.token_ids
    # The 5th greedy token, made an EOS id: the same turn then stops there.
    at = next(i for i in range(3, 12) if free.token_ids[i] not in free.token_ids[:i])
    stop = free.token_ids[at]
    d = daemon_factory(args=("--block-size", str(BLOCK), "--pool-blocks", "64"))
    d.model_dir = _model_with_eos(plain.model_dir, tmp_path, [2, stop])
    assert set(load_model(d.model_dir)[1].eos_token_ids) == {2, stop}
    d.start()
    with d.client() as c:
        first = c.generate("two-eos", PROMPT, max_tokens=12)
        assert first.finish_reason == "stop"
        assert first.token_ids == free.token_ids[:at]
        assert first.context_token_ids == free.token_ids[: at + 1]  # the EOS it ended on
        assert c.inspect("two-eos")["token_ids"] == PROMPT + first.context_token_ids
        second = c.generate("two-eos", [11, 12], max_tokens=5)
        want = PROMPT + first.context_token_ids + [11, 12] + second.context_token_ids
        assert c.inspect("two-eos")["token_ids"] == want


def _cancel_when_streaming(d, agent: str, started: threading.Event) -> threading.Thread:
    """Delete `agent` from another client once its turn has produced text: that cancels
    the turn (a client may only cancel its own requests)."""

    def run():
        assert started.wait(60)
        with d.client() as other:
            other.delete(agent)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_cancelled_stream_raises_and_generate_returns_cancelled(
    daemon_factory, model_dirs, tmp_path
):
    """`stream()` used to end as if the turn were done when it was cancelled: it raises
    TurnCancelled with the text it yielded; `generate()` returns finish_reason
    "cancelled" and nothing appended to the context. (The model's EOS is an id its greedy
    run from PROMPT never produces in 600 tokens, so the turns run until cancelled.)"""
    d = daemon_factory(args=("--block-size", str(BLOCK), "--pool-blocks", "512"))
    d.model_dir = _model_with_eos(model_dirs["llama"], tmp_path, [3], "<|im_start|>")
    d.start()
    started = threading.Event()
    canceller = _cancel_when_streaming(d, "streamed", started)
    got = []
    with d.client() as c, pytest.raises(TurnCancelled) as info:
        for piece in c.stream("streamed", PROMPT, max_tokens=4000, interval=0):
            got.append(piece)
            started.set()
    canceller.join(60)
    assert info.value.text == "".join(got) and info.value.agent_id == "streamed"
    assert info.value.token_ids and info.value.usage["generated_tokens"] >= 0

    result = {}
    with d.client() as c, d.client() as other:
        t = threading.Thread(
            target=lambda: result.update(r=c.generate("gen", PROMPT, max_tokens=4000)),
            daemon=True,
        )
        t.start()
        deadline = time.monotonic() + 60
        while not any(r["agent_id"] == "gen" and r["busy"] for r in other.agents()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        other.delete("gen")
        t.join(60)
    r = result["r"]
    assert r.finish_reason == "cancelled" and r.context_token_ids == []


def test_inspect_state_says_where_the_cache_is(daemon_factory):
    """An agent in memory whose context is shorter than a block (0 blocks on disk) was
    shown as "on disk": it is "in memory" (and in the store); after a restart it is
    "on disk" until its next turn brings it back."""
    d = daemon_factory(args=("--block-size", str(BLOCK), "--pool-blocks", "64"))
    d.start()
    with d.client() as c:
        c.generate("short", PROMPT, max_tokens=3)
        deadline = time.monotonic() + 30
        while "saving" in (row := c.inspect("short"))["state"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert row["disk_blocks"] == 0 and row["cached_tokens"] == len(PROMPT) + 3
    assert (row["state"], row["in_memory"], row["in_store"]) == ("in memory", True, True)
    table = d.ctl("inspect").stdout.splitlines()
    line = next(x for x in table if x.startswith("short"))
    assert line.rstrip().endswith("in memory") and "on disk" not in line
    assert d.ctl("stop").returncode == 0
    d.start()
    with d.client() as c:
        row = c.inspect("short")
        assert (row["state"], row["in_memory"], row["in_store"]) == ("on disk", False, True)
        c.generate("short", [11], max_tokens=2)
        assert c.inspect("short")["state"].startswith("in memory")
    line = next(x for x in d.ctl("inspect").stdout.splitlines() if x.startswith("short"))
    assert "in memory" in line
