"""agentkv demo: three agents, one daemon, a restart in the middle.

Starts a daemon with `daemonctl start` on the embedded default model (a ~1 M-parameter
llama trained on simple English sentences, see daemon/demo_model.py) and a store in a
temporary directory. Three agents that share a system prompt take two turns each through
the Python client; the daemon is stopped and started again on the same store; each agent
takes a third turn, its cache read back from disk once. Prints per turn the prompt,
cached, restored and recomputed tokens and the time to first token; shows that the shared
prompt is stored once; checks that every turn equals an uninterrupted run (the same turns
in one in-process engine that never restarts): PASS or FAIL, exit code 0 or 1. The daemon
is stopped at the end whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# One paragraph of the kind the model was trained on; 16-token blocks make it several
# full blocks, which every agent shares.
SYSTEM_PROMPT = (
    "Every morning the farmer works on the farm. Every day my sister walks to school. "
    "On Sundays the children play in the park. Yesterday our teacher visited the museum. "
    "Right now my parents are cooking dinner. Tomorrow we will paint the fence."
)
# Each agent's prompt per turn: the model finishes the sentence (and may add more).
AGENTS = {
    "planner": ("Tomorrow the farmer", "Next week Anna", "Tonight the students"),
    "baker": ("Yesterday I", "Every evening Tom", "Right now we"),
    "clerk": ("Last summer my parents", "At the moment she", "Soon our neighbours"),
}
BLOCK_SIZE = 16
ROOT = Path(__file__).resolve().parent.parent


@dataclass(slots=True)
class Turn:
    """One agent's turn as the demo saw it."""

    agent: str
    turn: int
    prompt: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    usage: dict = field(default_factory=dict)


class Daemon:
    """A daemon run through `daemonctl`, with its store and socket in `root`."""

    def __init__(self, root: Path, model: str | None) -> None:
        self.root = root
        self.store = root / "store"
        self.socket = f"ipc://{root}/daemon.sock"
        self.model = model

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        script = Path(sys.executable).with_name("daemonctl")
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "agentkv.daemon.cli"]
        cmd += [*args, "--store", str(self.store), "--socket", self.socket]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180)

    def start(self, label: str) -> None:
        extra = ["--model", self.model] if self.model else []
        args = ("start", "--block-size", str(BLOCK_SIZE), "--json", *extra)
        proc = waiting(label, lambda: self.ctl(*args))
        if proc.returncode != 0:
            raise SystemExit(f"daemonctl start failed:\n{proc.stdout}{proc.stderr}")
        print(f"      daemon pid {json.loads(proc.stdout)['pid']}")

    def stop(self, label: str) -> None:
        proc = waiting(label, lambda: self.ctl("stop"))
        if proc.returncode != 0:
            raise SystemExit(f"daemonctl stop failed:\n{proc.stdout}{proc.stderr}")


def waiting(label: str, work):
    """Run `work()` while a line shows `label` and the seconds spent; returns its result."""
    done = threading.Event()
    tty = sys.stdout.isatty()
    tic = time.perf_counter()

    def tick() -> None:
        while not done.wait(0.1):
            print(f"\r{label} ... {time.perf_counter() - tic:4.1f} s", end="", flush=True)

    ticker = threading.Thread(target=tick, daemon=True)
    if tty:
        ticker.start()
    else:
        print(f"{label} ...", end="", flush=True)
    try:
        return work()
    finally:
        done.set()
        if tty:
            ticker.join()
        head = f"\r{label} ..." if tty else ""
        print(f"{head} done in {time.perf_counter() - tic:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model dir or Hugging Face id (default: embedded model)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    parser.add_argument("--keep", action="store_true", help="keep the store for inspection")
    args = parser.parse_args()
    if args.max_tokens < 1 or args.temperature < 0:
        parser.error("--max-tokens must be >= 1 and --temperature >= 0")

    root = Path(tempfile.mkdtemp(prefix="agentkv-demo-", dir="/tmp"))  # short ipc path
    daemon = Daemon(root, args.model)
    print("agentkv demo: three agents share a system prompt, take two turns each, the daemon")
    print("restarts, and each takes a third turn from its cache on disk.\n")
    print(f"model   {args.model or 'embedded default (a tiny llama trained on simple sentences)'}")
    print(f"store   {daemon.store}\nsocket  {daemon.socket}")
    shared = textwrap.fill(SYSTEM_PROMPT, 88, initial_indent="  ", subsequent_indent="  ")
    print(f"\nthe shared system prompt:\n{shared}\n")
    try:
        turns = run_demo(daemon, args)
        ok = check(turns, args)
    finally:
        if daemon.ctl("status").returncode == 0:  # the demo failed half-way: stop it quietly
            daemon.ctl("stop")
        if args.keep:
            index = daemon.store / "cache" / "index.db"
            print(f"store kept in {daemon.store} (try: sqlite-utils tables {index} --counts)")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print("\nPASS: the turns after the restart equal an uninterrupted run" if ok else "\nFAIL")
    return 0 if ok else 1


def run_demo(daemon: Daemon, args) -> list[Turn]:
    from agentkv.client import Client

    turns: list[Turn] = []
    daemon.start("[1/4] starting the daemon")
    print("\n[2/4] turns 1 and 2 (turn 1 one agent at a time, turn 2 all three batched)")
    with Client(daemon.socket, timeout=60) as c:
        for agent in AGENTS:  # one at a time: the next agent finds the shared blocks pooled
            turns += run_turns(c, 1, [agent], turns, args)
        turns += run_turns(c, 2, list(AGENTS), turns, args)
        show_sharing(c)
    print()
    daemon.stop("[3/4] stopping the daemon (running turns finish, write-back is flushed)")
    daemon.start("      starting it again on the same store")
    print("\n[4/4] turn 3: each agent's cache is read back from disk, once")
    with Client(daemon.socket, timeout=60) as c:
        turns += run_turns(c, 3, list(AGENTS), turns, args)
    daemon.stop("\nstopping the daemon")
    show_store(daemon.store)
    return turns


def prompt_of(agent: str, turn: int, earlier: list[Turn]) -> str:
    """The text appended for `agent`'s `turn`: the system prompt leads turn 1; a later
    prompt gets a space unless the previous turn ended on end-of-sequence."""
    text = AGENTS[agent][turn - 1]
    if turn == 1:
        return f"{SYSTEM_PROMPT} {text}"
    last = [t for t in earlier if t.agent == agent][-1]
    return text if last.finish_reason == "stop" else f" {text}"


def sampling(agent: str, turn: int, args) -> dict:
    seed = 100 * turn + list(AGENTS).index(agent)
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": seed}


def run_turns(client, turn: int, agents: list[str], earlier: list[Turn], args) -> list[Turn]:
    """Submit one turn for each of `agents` together and step until all have finished."""
    pending = {}
    for agent in agents:
        prompt = prompt_of(agent, turn, earlier)
        pending[client.submit(agent, prompt, **sampling(agent, turn, args))] = Turn(
            agent, turn, prompt
        )
    done = []
    while len(done) < len(pending):
        for e in client.step(timeout=1.0):
            t = pending[e.uid]
            t.token_ids += e.token_ids
            t.text += e.text
            if e.finished:
                if e.finish_reason == "error":
                    raise SystemExit(f"turn failed: {e.error}")
                t.finish_reason, t.usage = e.finish_reason, e.usage or {}
                done.append(t)
                print_turn(t)
    return sorted(done, key=lambda t: list(AGENTS).index(t.agent))


def print_turn(t: Turn) -> None:
    u = t.usage
    counts = "  ".join(
        f"{name} {u.get(key, 0):>3}"
        for name, key in (
            ("prompt", "prompt_tokens"),
            ("cached", "cached_tokens"),
            ("restored", "restored_tokens"),
            ("recomputed", "recomputed_tokens"),
            ("new", "generated_tokens"),
        )
    )
    print(f"  turn {t.turn}  {t.agent:<8} {counts}  ttft {u.get('ttft_ms', 0):6.1f} ms")
    print(f"        {AGENTS[t.agent][t.turn - 1]} -> {t.text.strip()}")


def show_sharing(client) -> None:
    print("\n  in the daemon's pool:")
    for agent in AGENTS:
        info = client.inspect(agent)
        print(
            f"    {agent:<8} {info['tokens']:>4} tokens in {info['blocks']:>2} blocks, "
            f"{info['shared_blocks']} of them shared with the other agents"
        )


def show_store(store: Path) -> None:
    """Read the store's SQLite index (read-only): blocks, and how many agents list each."""
    uri = f"file:{store / 'cache' / 'index.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as db:
        total, size = db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM blocks").fetchone()
        shared = db.execute("SELECT COUNT(*) FROM blocks WHERE refcount = ?", (len(AGENTS),))
        (shared,) = shared.fetchone()
    print(f"\non disk: {total} block files ({size / 1024:.0f} KiB) of {BLOCK_SIZE} tokens")
    print(
        f"  the shared system prompt is {shared} of them, each stored once, refcount {len(AGENTS)}"
    )


def check(turns: list[Turn], args) -> bool:
    """Replay the same turns in one in-process engine that never restarts, and compare."""
    reference = waiting(
        "\nchecking against an uninterrupted run (the same turns in one in-process engine)",
        lambda: uninterrupted(args),
    )
    ok = True
    for t in turns:
        same = reference[(t.agent, t.turn)] == t.token_ids
        ok &= same
        if t.turn == 3 or not same:
            verdict = "identical" if same else "DIFFERENT"
            print(f"  turn {t.turn}  {t.agent:<8} {len(t.token_ids):>3} tokens  {verdict}")
    return ok


def uninterrupted(args) -> dict[tuple[str, int], list[int]]:
    from agentkv.daemon import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
    from agentkv.daemon.model_factory import load_model

    model, tokenizer = load_model(args.model)
    spec = ModelCacheSpec.from_model(model, block_size=BLOCK_SIZE)
    engine = BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, total_blocks=256), spec)
    done: list[Turn] = []
    for turn in (1, 2, 3):
        batch = {}
        for agent in AGENTS:
            prompt = prompt_of(agent, turn, done)
            batch[engine.submit(agent, prompt, **sampling(agent, turn, args))] = (agent, prompt)
        for c in engine.step():
            agent, prompt = batch[c.uid]
            done.append(Turn(agent, turn, prompt, c.text, c.token_ids, c.finish_reason))
    engine.close()
    return {(t.agent, t.turn): t.token_ids for t in done}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
