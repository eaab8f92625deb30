"""Engine overhead: decode tokens/s of BlockPoolBatchEngine against raw mlx-lm BatchGenerator.

Both run the same seeded prompts (random non-special token ids, 64-128 tokens each) on the
benchmark model (`ensure_random_model()`: a ~5 M-parameter random llama, float32),
greedy, with the same max_tokens, at 1, 8 and 32 concurrent sequences. The raw side is
`BatchGenerator(model, stop_tokens=None, completion_batch_size=32, prefill_batch_size=8)`
with every prompt inserted and `next()` looped until all finish. The engine side is a fresh
`BlockPoolBatchEngine` (same batch sizes) with a fresh agent per prompt, `step_once()` looped
until idle; its per-step work (admission, detokenizing, committing finished caches to pool
blocks) is what this measures.

Decode throughput, identical for both: the decode window opens at the end of the step in
which the last sequence got its first token (every prompt prefilled) and closes at the end of
the step in which the last sequence finished; tokens/s = tokens generated inside the window /
window seconds. Prefill (up to the window) is reported separately. The engine stops on EOS
and the raw generator does not, so every run's generated tokens are compared: the report
says whether they are identical token for token, and prompts are chosen so that no greedy
continuation hits EOS within max_tokens (checked, not assumed).

Runs are interleaved (engine, raw, engine, raw, ...) after warm-up (a raw run per config,
which also checks the prompts for EOS, and one engine run per process); the table shows
medians. Target: engine / raw decode tokens/s >= 0.95 at every config.

Usage: python scripts/bench_engine.py [--quick] [--agents 1 8 32] [--profile 32]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator

from agentkv.daemon.engine.batch_engine import BlockPoolBatchEngine
from agentkv.daemon.engine.block_pool import BlockPool
from agentkv.daemon.engine.model_factory import ensure_random_model, load_model
from agentkv.daemon.engine.spec import ModelCacheSpec

TARGET = 0.95
COMPLETION_BATCH = 32
PREFILL_BATCH = 8
FULL = {"agents": [1, 8, 32], "repeats": 3, "max_tokens": 64}
QUICK = {"agents": [1, 8], "repeats": 3, "max_tokens": 32}
PROMPT_LEN = (64, 128)


@dataclass(slots=True)
class Run:
    """One generation run: every prompt to max_tokens.

    Attributes:
        kind: "engine" or "raw".
        agents: concurrent sequences.
        prefill_s: start of the run to the opening of the decode window.
        decode_s: the decode window.
        decode_tokens: tokens generated inside the window.
        total_tokens: tokens generated in the whole run.
        steps: steps (`step_once` or `next` calls) in the window.
        outputs: generated token ids per prompt, in prompt order.
    """

    kind: str
    agents: int
    prefill_s: float
    decode_s: float
    decode_tokens: int
    total_tokens: int
    steps: int
    outputs: list[list[int]] = field(repr=False)

    @property
    def decode_tps(self) -> float:
        """Decode tokens per second."""
        return self.decode_tokens / self.decode_s


@dataclass(slots=True)
class Row:
    """Medians over the repeats of one config."""

    agents: int
    repeats: int
    max_tokens: int
    engine_tps: float
    raw_tps: float
    ratio: float
    engine_ms_per_step: float
    raw_ms_per_step: float
    engine_prefill_s: float
    raw_prefill_s: float
    decode_tokens: int
    generated_tokens_engine: int
    generated_tokens_raw: int
    identical_tokens: bool


class Window:
    """Tracks the decode window over a run's steps.

    Call `step(events)` after each step with `(index, token, finished)` per generated token.
    """

    def __init__(self, n: int, start: float) -> None:
        self.start = start
        self.started: set[int] = set()
        self.finished: set[int] = set()
        self.opened: float | None = None
        self.closed: float | None = None
        self.tokens_before = 0
        self.total = 0
        self.steps = 0
        self.n = n

    def step(self, events: Sequence[tuple[int, int | None, bool]]) -> None:
        """Record one step's generated tokens; the clock is read at the end of the step."""
        now = time.perf_counter()
        for index, token, finished in events:
            if token is not None:
                self.total += 1
                self.started.add(index)
            if finished:
                self.finished.add(index)
        if self.opened is None:
            if len(self.started) == self.n:
                self.opened, self.tokens_before = now, self.total
        else:
            self.steps += 1
        if len(self.finished) == self.n:
            self.closed = now

    @property
    def done(self) -> bool:
        """Every sequence finished."""
        return self.closed is not None


def make_prompts(n: int, seed: int, low: int, high: int) -> list[list[int]]:
    """`n` prompts of 64-128 token ids drawn from [low, high)."""
    rng = random.Random(seed)
    return [[rng.randrange(low, high) for _ in range(rng.randint(*PROMPT_LEN))] for _ in range(n)]


def run_raw(model, prompts: list[list[int]], max_tokens: int) -> Run:
    """Raw mlx-lm continuous batching of every prompt to max_tokens."""
    gen = BatchGenerator(
        model,
        stop_tokens=None,
        completion_batch_size=COMPLETION_BATCH,
        prefill_batch_size=PREFILL_BATCH,
    )
    outputs: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    uids = gen.insert(prompts, max_tokens=[max_tokens] * len(prompts))
    index = {uid: i for i, uid in enumerate(uids)}
    window = Window(len(prompts), start)
    while not window.done:
        _, responses = gen.next()
        events = []
        for r in responses:
            outputs[index[r.uid]].append(r.token)
            events.append((index[r.uid], r.token, r.finish_reason is not None))
        window.step(events)
    gen.close()
    return _finish("raw", window, outputs)


def make_engine(model, tokenizer, spec: ModelCacheSpec, n: int, max_tokens: int):
    """A fresh engine whose pool holds every agent's turn twice over."""
    per_agent = -(-(PROMPT_LEN[1] + max_tokens) // spec.block_size)
    pool = BlockPool(spec, total_blocks=2 * n * per_agent + 8)
    return BlockPoolBatchEngine(
        model,
        tokenizer,
        pool,
        spec,
        max_batch_size=COMPLETION_BATCH,
        prefill_batch_size=PREFILL_BATCH,
    )


def run_engine(engine, prompts: list[list[int]], max_tokens: int, tag: str) -> Run:
    """The same prompts through the engine, one fresh agent per prompt."""
    outputs: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    index = {
        engine.submit(f"{tag}-{i}", p, max_tokens=max_tokens, temperature=0.0): i
        for i, p in enumerate(prompts)
    }
    window = Window(len(prompts), start)
    while not window.done:
        events = []
        for e in engine.step_once():
            i = index[e.uid]
            if e.token is not None:
                outputs[i].append(e.token)
            events.append((i, e.token, e.completion is not None))
            if e.completion is not None and e.completion.finish_reason == "error":
                raise RuntimeError(f"engine request failed: {e.completion.error}")
        window.step(events)
    return _finish("engine", window, outputs)


def _finish(kind: str, window: Window, outputs: list[list[int]]) -> Run:
    assert window.opened is not None and window.closed is not None
    return Run(
        kind=kind,
        agents=window.n,
        prefill_s=window.opened - window.start,
        decode_s=window.closed - window.opened,
        decode_tokens=window.total - window.tokens_before,
        total_tokens=window.total,
        steps=window.steps,
        outputs=outputs,
    )


def pick_prompts(model, n: int, max_tokens: int, seed: int, low: int, high: int, eos) -> tuple:
    """Seeded prompts whose greedy continuations never emit EOS within max_tokens.

    The raw generator ignores EOS, so its outputs show which prompts would stop early in
    the engine; those are redrawn (seeded) and checked again on their own, since greedy
    outputs do not depend on what else is in the batch (the runs compare outputs anyway).
    The first raw run, over all prompts, doubles as the config's warm-up. Returns the
    prompts and how many were redrawn.
    """
    prompts = make_prompts(n, seed, low, high)
    check = list(range(n))
    replaced = 0
    for attempt in range(1, 20):
        outputs = run_raw(model, [prompts[i] for i in check], max_tokens).outputs
        bad = [i for i, out in zip(check, outputs, strict=True) if eos.intersection(out)]
        if not bad:
            return prompts, replaced
        redrawn = make_prompts(len(bad), seed + 1000 * attempt, low, high)
        for i, p in zip(bad, redrawn, strict=True):
            prompts[i] = p
        check, replaced = bad, replaced + len(bad)
    raise RuntimeError("could not find prompts free of EOS; lower --max-tokens")


def bench_config(
    model, tokenizer, spec, n: int, plan: dict, seed: int, warm_engine: bool
) -> tuple[Row, dict]:
    """Interleaved engine/raw repeats at `n` concurrent sequences.

    Prompt selection runs the raw generator once (the model's warm-up at this batch shape);
    `warm_engine` adds one untimed engine run (needed once per process, for its Python paths).
    """
    eos = set(tokenizer.eos_token_ids)
    low = max(tokenizer.all_special_ids or [0]) + 1
    max_tokens = plan["max_tokens"]
    prompts, replaced = pick_prompts(model, n, max_tokens, seed, low, spec.vocab_size, eos)
    if warm_engine:
        run_engine(make_engine(model, tokenizer, spec, n, max_tokens), prompts, max_tokens, "w")
    runs: dict[str, list[Run]] = {"engine": [], "raw": []}
    for rep in range(plan["repeats"]):
        engine = make_engine(model, tokenizer, spec, n, max_tokens)
        runs["engine"].append(run_engine(engine, prompts, max_tokens, f"r{rep}"))
        engine.close()
        runs["raw"].append(run_raw(model, prompts, max_tokens))
    eng, raw = runs["engine"], runs["raw"]
    med = statistics.median
    identical = all(e.outputs == r.outputs for e in eng for r in raw)
    row = Row(
        agents=n,
        repeats=plan["repeats"],
        max_tokens=max_tokens,
        engine_tps=round(med(r.decode_tps for r in eng), 1),
        raw_tps=round(med(r.decode_tps for r in raw), 1),
        ratio=round(med(r.decode_tps for r in eng) / med(r.decode_tps for r in raw), 3),
        engine_ms_per_step=round(med(r.decode_s / r.steps * 1e3 for r in eng), 2),
        raw_ms_per_step=round(med(r.decode_s / r.steps * 1e3 for r in raw), 2),
        engine_prefill_s=round(med(r.prefill_s for r in eng), 3),
        raw_prefill_s=round(med(r.prefill_s for r in raw), 3),
        decode_tokens=eng[0].decode_tokens,
        generated_tokens_engine=eng[0].total_tokens,
        generated_tokens_raw=raw[0].total_tokens,
        identical_tokens=identical,
    )
    detail = {
        "prompts_replaced_for_eos": replaced,
        "prompt_lengths": [len(p) for p in prompts],
        "engine_tps_runs": [round(r.decode_tps, 1) for r in eng],
        "raw_tps_runs": [round(r.decode_tps, 1) for r in raw],
        "decode_tokens_runs": {k: [r.decode_tokens for r in v] for k, v in runs.items()},
    }
    return row, detail


def profile_engine(model, tokenizer, spec, n: int, max_tokens: int, seed: int, top: int):
    """cProfile one engine run at `n` agents.

    Returns the run, the engine's own share (`step_once` minus the `BatchGenerator.next`
    inside it) and the top functions by own and cumulative time, as text.
    """
    low = max(tokenizer.all_special_ids or [0]) + 1
    prompts = make_prompts(n, seed, low, spec.vocab_size)
    engine = make_engine(model, tokenizer, spec, n, max_tokens)
    prof = cProfile.Profile()
    prof.enable()
    run = run_engine(engine, prompts, max_tokens, "prof")
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    steps, step_s, next_s = 0, 0.0, 0.0
    for (path, _, name), (_, calls, _, cum_s, _) in _items(stats):
        if Path(path).name == "engine.py" and name == "step_once":
            steps, step_s = calls, cum_s
        elif Path(path).name == "generate.py" and name == "next":  # the outermost next()
            next_s = max(next_s, cum_s)
    share = {
        "steps": steps,
        "step_once_s": round(step_s, 3),
        "batch_generator_next_s": round(next_s, 3),
        "engine_own_s": round(step_s - next_s, 3),
        "engine_own_ms_per_step": round((step_s - next_s) / steps * 1e3, 3),
        "engine_own_fraction": round((step_s - next_s) / step_s, 4),
    }
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return run, share, out.getvalue()


def _items(stats: pstats.Stats) -> list:
    return list(stats.stats.items())  # type: ignore[attr-defined]


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


def describe_model(model) -> dict[str, object]:
    """The model's size and shape, for the report."""
    args = model.args
    weights = [v for _, v in tree_flatten(model.parameters())]
    return {
        "path": str(ensure_random_model()),
        "model_type": args.model_type,
        "hidden_size": args.hidden_size,
        "layers": args.num_hidden_layers,
        "params_m": round(sum(v.size for v in weights) / 1e6, 2),
        "dtype": str(weights[0].dtype).split(".")[-1],
    }


def print_report(rows: list[Row], meta: dict, verdict: dict) -> None:
    """Print the comparison table and the verdict."""
    m = meta["model"]
    print("Engine overhead: BlockPoolBatchEngine vs raw mlx-lm BatchGenerator, decode tokens/s")
    print(
        f"model: {m['model_type']} {m['params_m']} M params, hidden {m['hidden_size']} x "
        f"{m['layers']} layers, {m['dtype']}; greedy; prompts {PROMPT_LEN[0]}-{PROMPT_LEN[1]} "
        f"tokens (seed {meta['seed']}); batch {COMPLETION_BATCH}, prefill batch {PREFILL_BATCH}"
    )
    print(f"{meta['python']} on {meta['processor']}, {meta['cores']} cores ({meta['platform']})")
    print(f"mlx {meta['mlx']} ({meta['mlx_device']}); load average at start {meta['loadavg']}")
    print("decode tok/s = tokens generated after every sequence has its first token / time")
    print("from the end of that step to the end of the last sequence's final step; medians")
    print(f"of {meta['repeats']} interleaved repeats (engine, raw, ...) after warm-up runs")
    print(
        f"{'agents':>6} {'max_tok':>7} {'engine tok/s':>12} {'raw tok/s':>10} {'ratio':>6} "
        f"{'eng ms/step':>11} {'raw ms/step':>11} {'prefill e/r s':>14} {'tokens e/r':>11} "
        f"{'same':>5}"
    )
    for r in rows:
        print(
            f"{r.agents:>6} {r.max_tokens:>7} {r.engine_tps:>12.1f} {r.raw_tps:>10.1f} "
            f"{r.ratio:>6.3f} {r.engine_ms_per_step:>11.2f} {r.raw_ms_per_step:>11.2f} "
            f"{r.engine_prefill_s:>6.2f}/{r.raw_prefill_s:<7.2f} "
            f"{r.generated_tokens_engine:>5}/{r.generated_tokens_raw:<5} "
            f"{'yes' if r.identical_tokens else 'NO':>5}"
        )
    replaced = {n: d["prompts_replaced_for_eos"] for n, d in meta["details"].items()}
    print(f"prompts redrawn because a greedy continuation hit EOS (per config): {replaced}")
    word = "MET" if verdict["target_met"] else "NOT MET"
    print(f"target: engine/raw >= {TARGET} at every config: {word} (min {verdict['min_ratio']})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 8 agents, 32 tokens")
    parser.add_argument("--agents", type=int, nargs="+", help="concurrent sequences")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per config (>= 3)")
    parser.add_argument("--max-tokens", type=int, help="tokens generated per sequence")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--profile", type=int, metavar="AGENTS", help="cProfile an engine run")
    parser.add_argument("--top", type=int, default=25, help="profile rows to print")
    parser.add_argument("--out", type=Path, default=Path("bench/engine.json"))
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    for key, value in (("agents", args.agents), ("repeats", args.repeats)):
        if value is not None:
            plan[key] = value
    if args.max_tokens is not None:
        plan["max_tokens"] = args.max_tokens
    if plan["repeats"] < 1 or plan["max_tokens"] < 2 or min(plan["agents"]) < 1:
        parser.error("--repeats >= 1, --max-tokens >= 2, --agents >= 1")

    started = time.perf_counter()
    loadavg = os.getloadavg()
    model, tokenizer = load_model(ensure_random_model())
    spec = ModelCacheSpec.from_model(model)
    rows, details = [], {}
    for n in plan["agents"]:
        first = n == plan["agents"][0]
        row, detail = bench_config(model, tokenizer, spec, n, plan, args.seed + n, first)
        rows.append(row)
        details[str(n)] = detail
    meta = machine() | {
        "model": describe_model(model),
        "seed": args.seed,
        "repeats": plan["repeats"],
        "loadavg": [round(x, 2) for x in loadavg],
        "quick": args.quick,
        "details": details,
    }
    ratios = [r.ratio for r in rows]
    verdict = {"target": TARGET, "min_ratio": min(ratios), "target_met": min(ratios) >= TARGET}
    verdict["identical_tokens"] = all(r.identical_tokens for r in rows)
    print_report(rows, meta, verdict)
    report: dict[str, object] = {"experiment": "engine-overhead", "meta": meta}
    report |= {"result": verdict, "rows": [asdict(r) for r in rows]}
    if args.profile:
        run, share, text = profile_engine(
            model, tokenizer, spec, args.profile, plan["max_tokens"], args.seed, args.top
        )
        print(f"\ncProfile of one engine run at {args.profile} agents (profiler overhead ", end="")
        print(f"included: {run.decode_tps:.1f} decode tok/s under the profiler)")
        print(
            f"engine's own time (step_once minus BatchGenerator.next): {share['engine_own_s']} s "
            f"of {share['step_once_s']} s over {share['steps']} steps = "
            f"{share['engine_own_ms_per_step']} ms/step ({share['engine_own_fraction']:.1%})"
        )
        print(text)
        report["profile"] = {"agents": args.profile, **share, "text": text}
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
