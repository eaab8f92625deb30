"""Distributed daemon at world size 1 vs 2: decode tokens/s, restore time, bytes per rank.

A correctness-and-overhead run on one machine: both ranks share its cores, so world size 2
cannot be faster here; what it shows is what lockstep costs (every batch step also
broadcasts rank 0's decisions, and every layer all-sums its attention and MLP outputs) and
that each rank reads 1/N of an agent's cache on a restore. Across machines, each rank has
its own cores and memory bandwidth.

For each world size, through real daemons (`daemonctl start [--world-size 2]`, a store of
their own) on the ~5 M-parameter random llama (8 heads, 4 KV heads, 8 layers):

- decode: 1 agent, then 4 agents at once, generating `--decode` tokens each (greedy);
  tokens/s from the turns' usage (generated tokens over the time after the first token).
- restore: an agent with a `--tokens`-token context; the daemon is stopped and started
  again `--repeats` times, and each time the agent's next turn restores it from disk
  (`usage.restore_ms`); bytes per rank: the files of its blocks and state in each rank's
  store (what a restore reads).

The same greedy tokens at both world sizes are expected but not required (the sharded
run's all-sum order changes the last float32 digits; the exactness reference of a sharded
daemon is sharded mlx-lm, see tests/test_distributed.py): the script reports whether they
matched.

Usage: python scripts/bench_distributed.py [--quick] [--out bench/distributed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from agentkv.client import Client
from agentkv.daemon.engine.distributed.build import rank_fingerprint, rank_store_dir
from agentkv.daemon.engine.fingerprint import model_fingerprint
from agentkv.daemon.engine.model_factory import ensure_random_model
from agentkv.storage import CacheStore

CLI = [sys.executable, "-m", "agentkv.daemon.service.cli"]


class Daemon:
    """A daemon of `world` ranks on a store of its own."""

    def __init__(self, root: Path, model: Path, world: int) -> None:
        self.store, self.socket = root / "store", f"ipc://{root}/d.sock"
        self.model, self.world = model, world

    def ctl(self, *args: str) -> None:
        cmd = [*CLI, *args, "--store", str(self.store), "--socket", self.socket]
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)

    def start(self) -> None:
        args = ["start", "--model", str(self.model), "--pool-blocks", "256", "--block-size", "64"]
        self.ctl(*args, "--world-size", str(self.world))

    def stop(self) -> None:
        self.ctl("stop")

    def client(self) -> Client:
        return Client(self.socket, timeout=600.0)


def decode(d: Daemon, agents: int, tokens: int) -> tuple[float, list]:
    """Aggregate decode tokens/s of `agents` agents generating at once; their tokens."""
    with d.client() as c:
        uids = [
            c.submit(f"dec{agents}-{i}", [1, 40 + i, 7, 90], max_tokens=tokens)
            for i in range(agents)
        ]
        done, outs = {}, {}
        while len(done) < len(uids):
            for e in c.step(timeout=5.0):
                outs.setdefault(e.uid, []).extend(e.token_ids)
                if e.finished:
                    done[e.uid] = e.usage
    spans = [(u["total_ms"] - u["ttft_ms"]) / 1000 for u in done.values()]
    generated = sum(u["generated_tokens"] - 1 for u in done.values())
    return round(generated / max(spans), 1), [outs[u] for u in uids]


def agent_bytes(d: Daemon, agent: str) -> list[int]:
    """Bytes of the agent's block and state files in each rank's store (daemon stopped)."""
    base = model_fingerprint(d.model)
    sizes = []
    for rank in range(d.world):
        path = rank_store_dir(d.store, rank, d.world) if d.world > 1 else d.store / "cache"
        fp = rank_fingerprint(base, rank, d.world) if d.world > 1 else base
        store = CacheStore(path)
        try:
            stored = store.agent(agent, fp)
            n = sum(store.block_path(h).stat().st_size for h in stored.block_hashes)
            if stored.state_file:
                n += (path / stored.state_file).stat().st_size
        finally:
            store.close()
        sizes.append(n)
    return sizes


def restore(d: Daemon, tokens: int, repeats: int) -> dict:
    """Restore time of a `tokens`-token agent after each of `repeats` restarts."""
    context = [1] + [(7 * i) % 700 + 5 for i in range(tokens - 1)]
    with d.client() as c:
        c.generate("ctx", context, max_tokens=1)
    times = []
    for i in range(repeats):
        d.stop()
        per_rank = agent_bytes(d, "ctx")
        d.start()
        with d.client() as c:
            r = c.generate("ctx", [11 + i], max_tokens=1)
        assert r.usage["restored_tokens"] > 0, r.usage
        times.append(r.usage["restore_ms"])
    return {
        "restore_ms": sorted(times)[len(times) // 2],
        "runs_ms": times,
        "bytes_per_rank": per_rank,
    }


def measure(model: Path, world: int, args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="akvbd", dir="/tmp"))
    d = Daemon(root, model, world)
    d.start()
    try:
        one, out1 = decode(d, 1, args.decode)
        four, _ = decode(d, 4, args.decode)
        rest = restore(d, args.tokens, args.repeats)
    finally:
        subprocess.run(
            [*CLI, "stop", "--store", str(d.store), "--socket", d.socket],
            capture_output=True,
            timeout=600,
        )
        shutil.rmtree(root, ignore_errors=True)
    return {
        "world_size": world,
        "decode_tok_s_1": one,
        "decode_tok_s_4": four,
        "tokens_1": out1[0],
        **rest,
    }


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens, one restart")
    p.add_argument("--decode", type=int, help="tokens generated per agent")
    p.add_argument("--tokens", type=int, help="the restored agent's context")
    p.add_argument("--repeats", type=int, help="restarts (restores) per world size")
    p.add_argument("--out", type=Path, default=Path("bench/distributed.json"))
    args = p.parse_args(argv)
    args.decode = args.decode or (16 if args.quick else 64)
    args.tokens = args.tokens or (256 if args.quick else 1024)
    args.repeats = args.repeats or (1 if args.quick else 3)
    model = ensure_random_model("llama", "small")
    rows = [measure(model, world, args) for world in (1, 2)]
    print("world  decode tok/s (1 agent, 4 agents)  restore ms  bytes read per rank")
    for r in rows:
        print(
            f"{r['world_size']:>5}  {r['decode_tok_s_1']:>12} {r['decode_tok_s_4']:>10}"
            f"  {r['restore_ms']:>20.1f}  {r['bytes_per_rank']}"
        )
    same = rows[0]["tokens_1"] == rows[1]["tokens_1"]
    print(f"greedy tokens equal at world size 1 and 2: {same}")
    meta = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "model": {"model_type": "llama", "hidden_size": 256, "layers": 8, "params_m": 5},
        "args": {"decode": args.decode, "tokens": args.tokens, "repeats": args.repeats},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    result = {
        f"ws{r['world_size']}_{k}": v
        for r in rows
        for k, v in r.items()
        if k not in ("tokens_1", "runs_ms", "world_size")
    }
    result["tokens_equal"] = same
    report = {"experiment": "distributed", "meta": meta, "result": result, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
