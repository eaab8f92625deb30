"""Write-back cost: decode tokens/s with the CacheStore on against off, 8 multi-turn agents.

Both sides run the same sessions on the benchmark model (`ensure_random_model()`: a ~5
M-parameter random llama, float32), greedy, through a fresh `BlockPoolBatchEngine` each
(batch 32, prefill batch 8, the spec's default 256-token blocks): 8 agents, each with a
first prompt of 64-128 random token ids and then 16-32 new token ids per later turn, every
agent's max_tokens drawn per turn from 24-40 (so agents finish, and are written back, at
different steps). A turn's prompts are all submitted, then `step_once()` is looped until
idle. "on": `store=CacheStore(tmpdir)` on the local disk, so every finished turn is written
back (new full blocks and the state file, fsynced, indexed) by the store's writer thread
while the others decode; "off": `store=None`.

Decode tokens/s, as in bench_engine: per turn, the window opens at the end of the step in
which every sequence has its first token and closes at the end of the step in which the last
one finished; tokens/s = tokens generated inside the windows / their total seconds. Prefill
is reported apart. The store is flushed after the last turn, outside the timed windows; that
flush (what was still queued) is timed and reported, and so is the engine's own share of
write-back on the MLX thread (building the turn record: evaluation and host views) in the
windows. Both sides must generate identical tokens (checked).

Runs are interleaved (on, off, then off, on, ...) after one untimed warm-up run of each;
medians. Target: on / off decode tokens/s >= 0.97.

Usage: python scripts/bench_writeback.py [--quick] [--agents 8] [--out bench/writeback.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from agentkv.daemon.engine.batch_engine import BlockPoolBatchEngine
from agentkv.daemon.engine.block_pool import BlockPool
from agentkv.daemon.engine.model_factory import ensure_random_model, load_model
from agentkv.daemon.engine.spec import ModelCacheSpec
from agentkv.storage import CacheStore

TARGET = 0.97
COMPLETION_BATCH = 32
PREFILL_BATCH = 8
FIRST_PROMPT = (64, 128)
LATER_PROMPT = (16, 32)
MAX_TOKENS = (24, 40)
FULL = {"agents": 8, "turns": 5, "repeats": 7}
QUICK = {"agents": 8, "turns": 3, "repeats": 2}


@dataclass(slots=True)
class Turn:
    """One agent's turn: the new token ids and how many tokens it may generate."""

    prompt: list[int]
    max_tokens: int


@dataclass(slots=True)
class Run:
    """One whole session set (every agent, every turn) on one fresh engine.

    Attributes:
        store: "on" or "off".
        decode_s: total seconds of the turns' decode windows.
        decode_tokens: tokens generated inside them.
        prefill_s: total seconds before the windows opened.
        total_tokens: tokens generated in all.
        writeback_ms: time in the engine's write-back on the MLX thread, inside the windows.
        flush_s: the store's flush after the last turn (untimed window; 0 when off).
        counters: the store's counters after the flush.
        outputs: generated token ids per agent and turn.
    """

    store: str
    decode_s: float
    decode_tokens: int
    prefill_s: float
    total_tokens: int
    writeback_ms: float
    flush_s: float
    counters: dict
    outputs: list[list[list[int]]] = field(repr=False)

    @property
    def decode_tps(self) -> float:
        """Decode tokens per second."""
        return self.decode_tokens / self.decode_s


@dataclass(slots=True)
class Result:
    """Medians over the repeats."""

    agents: int
    turns: int
    repeats: int
    on_tps: float
    off_tps: float
    ratio: float
    paired_ratio_median: float
    on_ms_per_token: float
    off_ms_per_token: float
    on_prefill_s: float
    off_prefill_s: float
    writeback_ms_on_mlx_thread: float
    flush_ms: float
    decode_tokens: int
    total_tokens: int
    identical_tokens: bool
    target_met: bool


def make_sessions(agents: int, turns: int, seed: int, low: int, high: int) -> list[list[Turn]]:
    """Per turn, one Turn per agent: seeded random token ids and max_tokens."""
    rng = random.Random(seed)
    sessions = []
    for t in range(turns):
        lo, hi = FIRST_PROMPT if t == 0 else LATER_PROMPT
        sessions.append(
            [
                Turn(
                    [rng.randrange(low, high) for _ in range(rng.randint(lo, hi))],
                    rng.randint(*MAX_TOKENS),
                )
                for _ in range(agents)
            ]
        )
    return sessions


class Window:
    """The decode window of one turn's steps (see the module docstring)."""

    def __init__(self, uids: dict[int, int]) -> None:
        self.uids = uids
        self.started: set[int] = set()
        self.finished: set[int] = set()
        self.opened: float | None = None
        self.closed: float | None = None
        self.tokens_before = 0
        self.total = 0

    def step(self, events) -> None:
        """Record one step's events; the clock is read at the end of the step."""
        now = time.perf_counter()
        for e in events:
            if e.completion is not None and e.completion.finish_reason == "error":
                raise RuntimeError(f"request failed: {e.completion.error}")
            if e.token is not None:
                self.total += 1
                self.started.add(e.uid)
            if e.completion is not None:
                self.finished.add(e.uid)
                self.started.add(e.uid)  # a turn may end on its first step
        if self.opened is None and len(self.started) == len(self.uids):
            self.opened, self.tokens_before = now, self.total
        if len(self.finished) == len(self.uids):
            self.closed = now


def make_engine(model, tokenizer, spec: ModelCacheSpec, agents: int, turns: int, store):
    """A fresh engine whose pool holds every agent's whole session twice over."""
    longest = FIRST_PROMPT[1] + (turns - 1) * LATER_PROMPT[1] + turns * MAX_TOKENS[1]
    pool = BlockPool(spec, total_blocks=2 * agents * (-(-longest // spec.block_size) + 1))
    return BlockPoolBatchEngine(
        model,
        tokenizer,
        pool,
        spec,
        max_batch_size=COMPLETION_BATCH,
        prefill_batch_size=PREFILL_BATCH,
        store=store,
    )


def run_turn(engine, turns: list[Turn], outputs: list[list[list[int]]]) -> Window:
    """Submit one turn per agent, step until idle; appends each agent's generated tokens."""
    uids = {
        engine.submit(f"agent-{i}", t.prompt, max_tokens=t.max_tokens): i
        for i, t in enumerate(turns)
    }
    window = Window(uids)
    while window.closed is None:
        events = engine.step_once()
        window.step(events)
        for e in events:
            if e.completion is not None:
                outputs[uids[e.uid]].append(list(e.completion.token_ids))
    return window


def run_sessions(model, tokenizer, spec, sessions: list[list[Turn]], root: Path | None) -> Run:
    """Every turn of every agent; the store (if any) flushed after the last turn."""
    agents = len(sessions[0])
    store = CacheStore(root) if root is not None else None
    engine = make_engine(model, tokenizer, spec, agents, len(sessions), store)
    spent = [0.0]
    registry = engine._registry
    write_back = registry.write_back  # the MLX thread's share of write-back, timed

    def timed_write_back(agent) -> None:
        tic = time.perf_counter()
        write_back(agent)
        spent[0] += time.perf_counter() - tic

    registry.write_back = timed_write_back  # type: ignore[method-assign]
    outputs: list[list[list[int]]] = [[] for _ in range(agents)]
    decode_s = prefill_s = 0.0
    decode_tokens = total = 0
    for turns in sessions:
        start = time.perf_counter()
        window = run_turn(engine, turns, outputs)
        decode_s += window.closed - window.opened
        prefill_s += window.opened - start
        decode_tokens += window.total - window.tokens_before
        total += window.total
    tic = time.perf_counter()
    if store is not None:
        store.flush()
    flush_s = time.perf_counter() - tic
    counters = dict(store.counters) if store is not None else {}
    engine.close()
    kind = "on" if store is not None else "off"
    return Run(
        kind, decode_s, decode_tokens, prefill_s, total, spent[0] * 1e3, flush_s, counters, outputs
    )


def one_run(model, tokenizer, spec, sessions, kind: str, base: Path | None) -> Run:
    """One run with the store on (in a fresh directory, removed after) or off."""
    if kind == "off":
        return run_sessions(model, tokenizer, spec, sessions, None)
    with tempfile.TemporaryDirectory(prefix="bench-writeback-", dir=base) as tmp:
        return run_sessions(model, tokenizer, spec, sessions, Path(tmp))


def summarize(runs: dict[str, list[Run]], plan: dict) -> Result:
    """Medians, the on/off ratio and the verdict."""
    on, off = runs["on"], runs["off"]
    med = statistics.median
    ratio = med(r.decode_tps for r in on) / med(r.decode_tps for r in off)
    pairs = list(zip(on, off, strict=True))  # the runs of one repeat
    return Result(
        agents=plan["agents"],
        turns=plan["turns"],
        repeats=len(on),
        on_tps=round(med(r.decode_tps for r in on), 1),
        off_tps=round(med(r.decode_tps for r in off), 1),
        ratio=round(ratio, 3),
        paired_ratio_median=round(med(a.decode_tps / b.decode_tps for a, b in pairs), 3),
        on_ms_per_token=round(med(r.decode_s / r.decode_tokens * 1e3 for r in on), 3),
        off_ms_per_token=round(med(r.decode_s / r.decode_tokens * 1e3 for r in off), 3),
        on_prefill_s=round(med(r.prefill_s for r in on), 3),
        off_prefill_s=round(med(r.prefill_s for r in off), 3),
        writeback_ms_on_mlx_thread=round(med(r.writeback_ms for r in on), 1),
        flush_ms=round(med(r.flush_s for r in on) * 1e3, 1),
        decode_tokens=on[0].decode_tokens,
        total_tokens=on[0].total_tokens,
        identical_tokens=all(a.outputs == b.outputs for a in on for b in off),
        target_met=ratio >= TARGET,
    )


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "mlx": mx.__version__,
        "mlx_device": str(mx.default_device()),
    }


def print_report(res: Result, meta: dict) -> None:
    """Print the comparison table and the verdict."""
    print("Write-back cost: decode tokens/s, CacheStore on vs off, multi-turn agents")
    print(
        f"random llama ({meta['params_m']} M params, float32), greedy; {res.agents} agents x "
        f"{res.turns} turns (first prompt {FIRST_PROMPT[0]}-{FIRST_PROMPT[1]} tokens, then "
        f"{LATER_PROMPT[0]}-{LATER_PROMPT[1]}; max_tokens {MAX_TOKENS[0]}-{MAX_TOKENS[1]}); "
        f"{meta['block_size']}-token blocks; store on {meta['store_dir']}"
    )
    print(f"{meta['python']} on {meta['processor']}, {meta['cores']} cores ({meta['platform']})")
    print(f"mlx {meta['mlx']} ({meta['mlx_device']}); load average (start, end) {meta['loadavg']}")
    print(f"medians of {res.repeats} interleaved repeats (on, off, off, on, ...) after warm-up")
    print(f"{'store':5} {'decode tok/s':>12} {'ms/token':>9} {'prefill s':>10} {'runs tok/s':>24}")
    for kind, tps, ms, pre in (
        ("on", res.on_tps, res.on_ms_per_token, res.on_prefill_s),
        ("off", res.off_tps, res.off_ms_per_token, res.off_prefill_s),
    ):
        runs = ", ".join(f"{x:.1f}" for x in meta["tps_runs"][kind])
        print(f"{kind:5} {tps:>12.1f} {ms:>9.3f} {pre:>10.3f} {runs:>24}")
    c = meta["store_counters"]
    print(
        f"per on-run: {c.get('turns_written', 0)} turns, {c.get('blocks_written', 0)} blocks, "
        f"{c.get('bytes_written', 0) / 2**20:.1f} MiB written; write-back on the MLX thread "
        f"{res.writeback_ms_on_mlx_thread} ms in all; flush after the last turn "
        f"{res.flush_ms} ms (untimed)"
    )
    print(f"identical tokens on vs off: {'yes' if res.identical_tokens else 'NO'}")
    word = "MET" if res.target_met else "NOT MET"
    print(
        f"target: on/off >= {TARGET}: {word} (ratio of medians {res.ratio}, "
        f"median of paired ratios {res.paired_ratio_median})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 turns, 2 repeats")
    parser.add_argument("--agents", type=int, help="concurrent agents")
    parser.add_argument("--turns", type=int, help="turns per agent")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per side")
    parser.add_argument("--dir", type=Path, help="where the stores go (default: the tmpdir)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", type=Path, default=Path("bench/writeback.json"))
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    for key in ("agents", "turns", "repeats"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if min(plan.values()) < 1:
        parser.error("--agents, --turns and --repeats must be >= 1")

    started = time.perf_counter()
    loadavg = [os.getloadavg()]
    model, tokenizer = load_model(ensure_random_model())
    spec = ModelCacheSpec.from_model(model)
    low = max(tokenizer.all_special_ids or [0]) + 1
    sessions = make_sessions(plan["agents"], plan["turns"], args.seed, low, spec.vocab_size)
    for kind in ("on", "off"):  # warm-up
        one_run(model, tokenizer, spec, sessions, kind, args.dir)
    runs: dict[str, list[Run]] = {"on": [], "off": []}
    for rep in range(plan["repeats"]):
        for kind in ("on", "off") if rep % 2 == 0 else ("off", "on"):
            runs[kind].append(one_run(model, tokenizer, spec, sessions, kind, args.dir))
    loadavg.append(os.getloadavg())
    res = summarize(runs, plan)
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    meta = machine() | {
        "params_m": round(params / 1e6, 1),
        "model": {
            "model_type": model.args.model_type,
            "hidden_size": model.args.hidden_size,
            "layers": model.args.num_hidden_layers,
            "params_m": round(params / 1e6, 1),
            "dtype": "float32",
        },
        "block_size": spec.block_size,
        "store_dir": str(args.dir or tempfile.gettempdir()),
        "seed": args.seed,
        "loadavg": [[round(x, 2) for x in la] for la in loadavg],
        "tps_runs": {k: [round(r.decode_tps, 1) for r in v] for k, v in runs.items()},
        "flush_ms_runs": [round(r.flush_s * 1e3, 1) for r in runs["on"]],
        "store_counters": runs["on"][0].counters,
        "quick": args.quick,
    }
    print_report(res, meta)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    report = {"experiment": "writeback", "meta": meta, "result": asdict(res)}
    report["runs"] = [
        {k: v for k, v in asdict(r).items() if k != "outputs"} for rs in runs.values() for r in rs
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
