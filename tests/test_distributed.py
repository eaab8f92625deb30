"""A daemon over two ranks (mx.distributed, ring backend on 127.0.0.1, ports of its own):
the tiny llama (4 heads, 2 KV heads) split by heads, run in lockstep.

Exactness is checked against plain mlx-lm on the same sharded model (`dist_ref.py`, run
as two ranks): a sharded run's logits differ from one process's in the last float32
digits (all_sum order), so the sharded run is the reference, token for token.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from agentkv.storage.maintenance import verify_store

REF = Path(__file__).with_name("dist_ref.py")
ARGS = ("--world-size", "2", "--pool-blocks", "64", "--block-size", "16")
PROMPTS = {
    "planner": [1, 5, 9, 22, 40, 7, 81, 3],
    "critic": [1, 77, 12, 4, 150, 9],
    "writer": [1, 300, 41, 41, 8, 19, 2, 66, 90],
}
MAX_TOKENS = 10


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def reference(model_dir: Path, contexts: list[list[int]], tmp: Path) -> list[list[int]]:
    """Greedy continuations of each context by mlx-lm on the model sharded over 2 ranks."""
    hostfile, job, out = tmp / "ref-hosts.json", tmp / "ref-job.json", tmp / "ref-out.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(2)]))
    job.write_text(
        json.dumps({"model": str(model_dir), "contexts": contexts, "max_tokens": MAX_TOKENS})
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(REF), str(job), str(out)],
            env={**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), logs  # mlx.launch would hide a failure
    return json.loads(out.read_text())


def stored(root: Path, agent: str) -> tuple[int, list[Path]]:
    """(tokens, block files) of an agent in one rank's store index, read as another
    process would while the daemon runs."""
    con = sqlite3.connect(f"file:{root / 'index.db'}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT token_count FROM agents WHERE agent_id = ?", (agent,))
        count = (row.fetchone() or (0,))[0]
        query = "SELECT b.path FROM agent_blocks a JOIN blocks b ON b.hash = a.block_hash"
        paths = [root / p for (p,) in con.execute(query + " WHERE a.agent_id = ?", (agent,))]
    finally:
        con.close()
    return count, paths


def mount_read_only(path: Path) -> None:
    """`path` read-only from now on (a bind mount over itself); skips where we cannot."""
    try:
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
        pytest.skip(f"cannot bind-mount here: {exc}")


def turn(d, client, prompts: dict[str, list[int]]) -> dict:
    """One greedy turn per agent, submitted together (they batch)."""
    return d.turns(client, prompts, max_tokens=MAX_TOKENS, temperature=0.0)


def follower_pid(d) -> int:
    return int((d.store / "rank-1.pid").read_text())


def test_kv_heads_not_dividing_is_refused_at_start(daemon_factory):
    d = daemon_factory("llama")
    proc = d.ctl("start", "--model", str(d.model_dir), "--world-size", "4")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "num_key_value_heads (2) does not divide by the world size 4" in proc.stderr
    assert not (d.store / "rank-1.log").exists()  # refused before any rank started


def test_two_ranks_equal_sharded_mlx_lm_across_turns_and_restart(daemon_factory, tmp_path):
    d = daemon_factory("llama", args=ARGS)
    d.start()
    contexts, outputs = [], []
    with d.client() as c:
        first = turn(d, c, PROMPTS)
        after_first = {a: c.inspect(a)["token_ids"] for a in PROMPTS}
        second_prompts = {a: [11, 12, 13 + i] for i, a in enumerate(PROMPTS)}
        second = turn(d, c, second_prompts)
        after_second = {a: c.inspect(a)["token_ids"] for a in PROMPTS}
        status = json.loads(d.ctl("status", "--json").stdout)
    for a, p in PROMPTS.items():
        assert first[a].usage["cached_tokens"] == 0
        assert second[a].usage["cached_tokens"] > 0  # multi-turn: the cache was kept
        contexts += [p, after_first[a] + second_prompts[a]]
        outputs += [first[a].token_ids, second[a].token_ids]
    dist = status["distributed"]
    assert dist["world_size"] == 2 and [r["rank"] for r in dist["ranks"]] == [0, 1]
    assert all(r["pool_total"] == 64 for r in dist["ranks"])

    table = d.ctl("inspect").stdout
    assert "planner" in table and "world size 2" in table and "rank 1: pool" in table
    assert d.ctl("stop").returncode == 0
    assert not (d.store / "rank-1.pid").exists()  # rank 0 waited for rank 1 to exit
    for path in (d.store / "cache", d.store / "rank-1-of-2"):
        report = verify_store(path)
        assert report.checked > 0 and not report.corrupt, path
    d.start()  # the whole group again: each rank restores its own shard from its store
    third_prompts = {a: [21, 22] for a in [*PROMPTS, "planner-alt"]}
    with d.client() as c:
        c.fork("planner", "planner-alt")  # restores its source: agreed by both ranks first
        third = turn(d, c, third_prompts)
        status = json.loads(d.ctl("status", "--json").stdout)
    assert third["planner-alt"].token_ids == third["planner"].token_ids
    assert all(r["store_blocks"] > 0 for r in status["distributed"]["ranks"])
    for a in PROMPTS:
        assert third[a].usage["restored_tokens"] > 0, third[a].usage
        assert third[a].usage["recomputed_tokens"] == 0, third[a].usage
        contexts.append(after_second[a] + third_prompts[a])
        outputs.append(third[a].token_ids)
    assert d.ctl("stop").returncode == 0

    want = reference(d.model_dir, contexts, tmp_path)
    assert outputs == want
    distinct = {t for out in outputs for t in out}
    assert len(distinct) > 20  # a degenerate model (one token forever) would hide bugs

    for n in ("1", "4"):  # the store's shards are of world size 2: never read otherwise
        proc = d.ctl("start", "--model", str(d.model_dir), "--world-size", n)
        assert proc.returncode != 0
        assert "sharded over 2 rank(s)" in proc.stdout + proc.stderr + d.log()


def test_durable_means_on_every_ranks_disk(daemon_factory):
    """A final event says durable: true only once every rank's shard of the turn is on
    disk; a rank that cannot write makes it false, and status and stop say so."""
    d = daemon_factory("llama", args=ARGS)
    d.start()
    rank1 = d.store / "rank-1-of-2"
    with d.client() as c:
        # "kept" ends while "long" decodes: the ranks agree in the next batch step
        long_uid = c.submit("long", PROMPTS["planner"], max_tokens=6 * MAX_TOKENS)
        first = c.generate("kept", PROMPTS["writer"] * 4, max_tokens=MAX_TOKENS)
        assert first.durable is True
        tokens = c.inspect("kept")["tokens"]
        shards = [stored(root, "kept") for root in (d.store / "cache", rank1)]
        for count, files in shards:  # both ranks' shards are on disk, as the event said
            assert count == tokens and files and all(f.is_file() for f in files), shards
        assert len(shards[0][1]) == len(shards[1][1])
        for _ in range(300):  # its final event (its tokens' events come before)
            ended = [e for e in c.step(timeout=1.0) if e.finished]
            if ended:
                break
        assert [(e.uid, e.durable) for e in ended] == [(long_uid, True)]
        mount_read_only(rank1)  # rank 1 can no longer write; rank 0 can
        try:
            late = c.generate("kept", [11, 12, 13], max_tokens=MAX_TOKENS)
            assert late.durable is False
            assert stored(d.store / "cache", "kept")[0] > tokens  # rank 0 alone wrote it
            behind = c.inspect("kept")["tokens"] - tokens
            status = d.ctl("status", "--json")
            (row,) = json.loads(status.stdout)["unsaved"]
            assert row["agent_id"] == "kept" and row["behind_tokens"] == behind
            assert row["error"].startswith("rank 1: "), row
            assert "not durable" in d.ctl("status").stdout
            stopped = d.ctl("stop", "--json")
            assert stopped.returncode == 1, stopped.stdout + stopped.stderr
            assert [r["agent_id"] for r in json.loads(stopped.stdout)["unsaved"]] == ["kept"]
        finally:
            subprocess.run(["umount", "-l", str(rank1)], check=False)


def test_lost_rank_stops_the_group_and_restart_resumes_exactly(daemon_factory, tmp_path):
    d = daemon_factory("llama", args=(*ARGS, "--collective-timeout", "30"))
    d.start()
    with d.client() as c:
        turn(d, c, PROMPTS)
        after_first = {a: c.inspect(a)["token_ids"] for a in PROMPTS}
    os.kill(follower_pid(d), signal.SIGKILL)
    assert d.wait_exit(60), "rank 0 kept running without rank 1"
    assert "the distributed daemon stops" in d.log()
    proc = d.ctl("verify", "--json")  # every rank's store: index sound, checksums match
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rank1 = verify_store(d.store / "rank-1-of-2")
    assert json.loads(proc.stdout)["checked"] > rank1.checked > 0

    d.start()
    second_prompts = {a: [31, 32, 33] for a in PROMPTS}
    with d.client() as c:
        second = turn(d, c, second_prompts)
    assert d.ctl("stop").returncode == 0
    contexts = [after_first[a] + second_prompts[a] for a in PROMPTS]
    want = reference(d.model_dir, contexts, tmp_path)
    assert [second[a].token_ids for a in PROMPTS] == want


def test_offline_delete_and_gc_act_on_every_rank_store(daemon_factory):
    """With no daemon running, `delete` removes the agent from every rank's store and `gc`
    collects in every one (each rank keeping its shard of the model served)."""
    d = daemon_factory("llama", args=ARGS)
    d.start()
    with d.client() as c:
        turn(d, c, PROMPTS)
        fingerprint = c.stats()["fingerprint"]
    assert d.ctl("stop").returncode == 0
    roots = [d.store / "cache", d.store / "rank-1-of-2"]
    files = [stored(root, "planner")[1] for root in roots]
    assert all(files) and all(f.is_file() for fs in files for f in fs)
    stray = roots[1] / "blocks" / "ff" / "stray.safetensors.tmp"  # a crashed write's
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"partial")

    assert d.ctl("delete", "planner").returncode == 0  # offline: the store itself
    for root in roots:
        assert stored(root, "planner")[0] == 0 and stored(root, "critic")[0] > 0, root
    dry = d.ctl("gc", "--keep-model", fingerprint, "--json")
    report = json.loads(dry.stdout)
    assert report["foreign_agents"] == []  # rank 1 keeps its own shard of this model
    assert "rank-1-of-2/blocks/ff/stray.safetensors.tmp" in report["orphan_files"]
    assert len(report["unreferenced_blocks"]) == sum(map(len, files))  # planner's, per rank
    assert d.ctl("gc", "--no-dry-run").returncode == 0
    assert not stray.exists() and not any(f.exists() for fs in files for f in fs)
    assert d.ctl("verify").returncode == 0
    assert d.ctl("delete", "planner").returncode == 1  # gone from every rank: unknown

    for name in ("index.db", "index.db-wal", "index.db-shm"):  # rank 1 loses its index
        (roots[1] / name).unlink(missing_ok=True)
    assert d.ctl("verify").returncode == 1
    rebuilt = d.ctl("rebuild-index", "--json")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert [s["store"] for s in json.loads(rebuilt.stdout)["stores"]] == [str(roots[1])]
    assert stored(roots[1], "critic")[0] == stored(roots[0], "critic")[0] > 0
    assert d.ctl("verify").returncode == 0


def test_rank_missing_blocks_makes_every_rank_recompute(daemon_factory, tmp_path):
    d = daemon_factory("llama", args=ARGS)
    d.start()
    with d.client() as c:
        turn(d, c, PROMPTS)
        after_first = {a: c.inspect(a)["token_ids"] for a in PROMPTS}
    assert d.ctl("stop").returncode == 0
    d.start()  # every agent is on disk only now, in both ranks' stores alike
    removed = list((d.store / "rank-1-of-2").rglob("*.safetensors"))
    removed = [p for p in removed if "blocks" in p.parts]
    assert removed
    for path in removed:  # rank 1 alone loses its blocks (rank 0 still has its own)
        path.unlink()
    second_prompts = {a: [41, 42] for a in PROMPTS}
    with d.client() as c:
        second = turn(d, c, second_prompts)
    assert d.ctl("stop").returncode == 0
    for a in PROMPTS:  # agreed before the restore: nobody restored, all recomputed
        assert second[a].usage["restored_tokens"] == 0, second[a].usage
        assert second[a].usage["recomputed_tokens"] > 0, second[a].usage
    assert "stores disagree" in d.log()
    contexts = [after_first[a] + second_prompts[a] for a in PROMPTS]
    assert [second[a].token_ids for a in PROMPTS] == reference(d.model_dir, contexts, tmp_path)


def test_hosts_file_with_a_rank_started_by_hand(daemon_factory, tmp_path):
    """`--hosts`: rank 0 is the daemon; rank 1 is started on its machine by hand (here
    the same one) with the same options."""
    d = daemon_factory("llama")
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(2)]))
    follower = subprocess.Popen(
        [sys.executable, "-m", "agentkv.daemon.service.ranks", "--rank", "1"]
        + ["--hosts", str(hostfile), "--store", str(d.store), "--model", str(d.model_dir)]
        + ["--pool-blocks", "64", "--block-size", "16"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        d.start("--hosts", str(hostfile), "--pool-blocks", "64", "--block-size", "16")
        with d.client() as c:
            out = turn(d, c, {"solo": PROMPTS["planner"]})
            assert c.stats()["distributed"]["world_size"] == 2
        assert len(out["solo"].token_ids) == MAX_TOKENS
        assert d.ctl("stop").returncode == 0
        log = follower.communicate(timeout=60)[0].decode(errors="replace")
        assert follower.returncode == 0, log
        assert "rank 1: closed" in log
    finally:
        follower.kill()


def test_large_text_is_tokenized_on_rank_zero_as_the_engine_would(daemon_factory):
    """Text over the engine's inline limit (16 KiB) would be tokenized on a worker thread,
    whose timing differs per rank: rank 0 tokenizes it and sends token ids instead, encoded
    exactly as the engine encodes a first and a later turn."""
    from mlx_lm.utils import load_tokenizer

    from agentkv.daemon.engine.prompts import INLINE_ENCODE_BYTES, encode_turn

    d = daemon_factory("llama", args=("--world-size", "2", "--pool-blocks", "512"))
    d.start("--block-size", "16")
    text = " garden" * (INLINE_ENCODE_BYTES // 7 + 1)
    tok = load_tokenizer(d.model_dir)
    with d.client(timeout=120.0) as c:
        first = c.generate("long", text, max_tokens=2)
        after_first = c.inspect("long")["token_ids"]
        c.generate("long", text, max_tokens=2)
        after_second = c.inspect("long")["token_ids"]
    assert d.ctl("stop").returncode == 0
    as_first = encode_turn(tok, text, first_turn=True)
    assert after_first[: len(as_first)] == as_first
    assert first.usage["prompt_tokens"] == len(as_first)
    later = encode_turn(tok, text, first_turn=False)
    assert after_second[len(after_first) : len(after_first) + len(later)] == later


def test_start_checks_without_starting_anything(tmp_path, model_dirs):
    """The checks `daemonctl start` makes before any rank starts (no MLX group needed)."""
    from agentkv.daemon.engine.distributed.build import check_heads, rank_fingerprint
    from agentkv.daemon.errors import WorldSizeError
    from agentkv.daemon.service.process import BadOptionError, DaemonOptions, StartError
    from agentkv.daemon.service.ranks import check_start, read_hostfile

    with pytest.raises(WorldSizeError, match="num_attention_heads \\(6\\)"):
        check_heads({"num_attention_heads": 6, "num_key_value_heads": 2}, 4)
    check_heads({"num_attention_heads": 8, "num_key_value_heads": 4}, 4)
    fps = {rank_fingerprint("ab" * 16, r, n) for n in (1, 2, 4) for r in range(n)}
    assert len(fps) == 7 and all(len(f) == 32 for f in fps)

    bad = tmp_path / "hosts.json"
    for text in ("not json", "[]", '[["127.0.0.1:1"]]', '[["a"], [3]]'):
        bad.write_text(text)
        with pytest.raises(BadOptionError):
            read_hostfile(bad)

    store = tmp_path / "store"
    store.mkdir()
    opts = DaemonOptions(model=str(model_dirs["llama"]), store=store, world_size=2)
    check_start(opts)  # a fresh store takes this world size
    assert json.loads((store / "world.json").read_text()) == {"world_size": 2}
    with pytest.raises(StartError, match="sharded over 2 rank"):
        check_start(DaemonOptions(model=str(model_dirs["llama"]), store=store))
    (store / "world.json").write_text("{")
    with pytest.raises(StartError, match="damaged"):
        check_start(opts)


def test_a_backend_missing_from_this_mlx_build_is_refused_at_start(daemon_factory, tmp_path):
    """JACCL and MPI are not in the Linux CPU wheel: a clear error naming what is, exit 1,
    before any rank starts."""
    from agentkv.daemon.service.ranks import read_hostfile

    d = daemon_factory("llama")
    args = ("--model", str(d.model_dir), "--world-size", "2", "--backend", "jaccl")
    proc = d.ctl("start", *args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "backend 'jaccl' is not available in this mlx build; available here: ring" in (
        proc.stderr
    )
    assert not (d.store / "rank-1.log").exists()
    one = d.ctl("start", "--model", str(d.model_dir), "--backend", "mpi")
    assert one.returncode == 2 and "needs --world-size N or --hosts" in one.stderr
    launch = tmp_path / "jaccl.json"  # mlx.launch's hostfile, as mlx.distributed_config writes
    hosts = [{"ssh": f"mac{i}", "ips": [f"10.0.0.{i}"], "rdma": [None, None]} for i in (1, 2)]
    launch.write_text(json.dumps({"backend": "jaccl", "hosts": hosts}))
    assert len(read_hostfile(launch)) == 2


def test_durability_views_merge_every_rank():
    """Rank 0's store as the service sees it (no MLX group needed)."""
    from agentkv.daemon.engine.distributed.durability import (
        AgreedStore,
        RankWrites,
        merge_reports,
    )

    class Store:  # rank 0's own store: everything landed, nothing failed
        def is_settled(self, agent_id):
            return True

        def unsaved(self, agent_id, fingerprint):
            return None

    class Channel:  # rank 1 says its write of "a" failed
        def gather_bytes(self, data):
            return [data, msgpack.packb({"a": "disk full"})]

    writes = RankWrites(Channel())
    agreed = []
    view = AgreedStore(Store(), writes, lambda: agreed.append(writes.agree()))
    writes.wrote(["a", "b"])
    assert view.is_settled("a") and agreed and not writes.waiting
    assert view.unsaved("a", "fp") == "rank 1: disk full" and view.unsaved("b", "fp") is None
    rows = [
        [{"agent_id": "a", "behind_tokens": 3, "error": "x"}],
        [{"agent_id": "a", "behind_tokens": 9, "error": "y"}],
        [{"agent_id": "b", "behind_tokens": 1, "error": "z"}],
    ]
    assert merge_reports(rows) == [
        {"agent_id": "a", "behind_tokens": 9, "error": "x"},
        {"agent_id": "b", "behind_tokens": 1, "error": "rank 2: z"},
    ]


def test_status_text_shows_each_rank():
    from agentkv.daemon.service.cli import _status_text

    ranks = [
        {"rank": r, "pool_total": 64, "pool_in_use": 3, "pool_cached": 0}
        | {"store_blocks": 5, "store_bytes": 2**20}
        for r in range(2)
    ]
    text = _status_text({"distributed": {"world_size": 2, "ranks": ranks}})
    assert "world size 2" in text
    assert "rank 1: pool 3/64 blocks in use, store 5 blocks, 1.0 MiB" in text


def test_a_rank_that_hangs_stops_the_group_at_the_collective_timeout(daemon_factory):
    """A rank that stops answering without closing its sockets (SIGSTOP): no error comes,
    so rank 0's watchdog ends it once a collective outlasts --collective-timeout."""
    d = daemon_factory("llama", args=(*ARGS, "--collective-timeout", "15"))
    d.start()
    pid = follower_pid(d)
    try:
        with d.client() as c:
            turn(d, c, {"solo": PROMPTS["planner"]})
        os.kill(pid, signal.SIGSTOP)
        assert d.wait_exit(90), "rank 0 hung on a stopped rank"
        assert "timed out: a rank is lost" in d.log()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.kill(pid, signal.SIGCONT)
    proc = d.ctl("verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_rank_failing_at_start_fails_the_start(daemon_factory):
    d = daemon_factory("llama")
    d.store.mkdir(parents=True)
    (d.store / "rank-1-of-2").write_text("not a directory")  # rank 1 cannot open its store
    proc = d.ctl("start", "--model", str(d.model_dir), *ARGS, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert d.ctl("status").returncode != 0


def test_unseeded_sampling_draws_the_same_tokens_on_every_rank(daemon_factory, tmp_path):
    """A sampled turn without a seed: rank 0 picks the seed, so every rank appends the same
    tokens to its cache; a later greedy turn equals mlx-lm's run of the whole context."""
    d = daemon_factory("llama", args=ARGS)
    d.start()
    with d.client() as c:
        sampled = d.turns(c, PROMPTS, max_tokens=MAX_TOKENS, temperature=1.0)
        after = {a: c.inspect(a)["token_ids"] for a in PROMPTS}
        greedy = turn(d, c, {a: [51, 52] for a in PROMPTS})
    assert d.ctl("stop").returncode == 0
    assert all(sampled[a].finish_reason in ("length", "stop") for a in PROMPTS)
    contexts = [after[a] + [51, 52] for a in PROMPTS]
    assert [greedy[a].token_ids for a in PROMPTS] == reference(d.model_dir, contexts, tmp_path)


def test_a_small_pool_drops_and_restores_alike_on_every_rank(daemon_factory, tmp_path):
    """A pool of 8 blocks of 16 tokens for three agents: admissions drop idle agents'
    caches (those already on disk first) and restore them later, on every rank alike."""
    d = daemon_factory("llama", args=("--world-size", "2", "--pool-blocks", "8"))
    d.start("--block-size", "16")
    contexts, outputs = [], []
    with d.client() as c:
        for k in range(3):
            prompts = {a: p if k == 0 else [60 + k, 61] for a, p in PROMPTS.items()}
            before = {a: c.inspect(a)["token_ids"] if k else [] for a in PROMPTS}
            out = turn(d, c, prompts)
            contexts += [before[a] + prompts[a] for a in PROMPTS]
            outputs += [out[a].token_ids for a in PROMPTS]
        dropped = c.stats()["dropped_caches"]
    assert d.ctl("stop").returncode == 0
    assert dropped > 0  # the pool was short: caches were dropped and brought back
    assert outputs == reference(d.model_dir, contexts, tmp_path)


def test_ranks_started_with_other_options_are_refused(daemon_factory, tmp_path):
    d = daemon_factory("llama")
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(2)]))
    follower = subprocess.Popen(
        [sys.executable, "-m", "agentkv.daemon.service.ranks", "--rank", "1"]
        + ["--hosts", str(hostfile), "--store", str(d.store), "--model", str(d.model_dir)]
        + ["--pool-blocks", "32", "--block-size", "16"],  # rank 0 gets 64 blocks
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        proc = d.ctl("start", "--model", str(d.model_dir), "--hosts", str(hostfile), *ARGS[2:])
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "the ranks differ in model files or options" in proc.stderr
        follower.communicate(timeout=60)
        assert follower.returncode != 0
    finally:
        follower.kill()
