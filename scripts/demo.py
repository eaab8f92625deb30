"""agentkv demo (in-process): three agents share a system prompt and keep their caches.

Runs on the embedded default model (a ~5 M-parameter llama with random weights, built once
into the user cache dir: its text is noise, the mechanics are real). Each agent takes two
turns; the second turn of each is checked token for token against a from-scratch mlx-lm
run of the whole context. Prints PASS or FAIL and exits 0 or 1 to match.
"""

from __future__ import annotations

import argparse
import sys
import time

SYSTEM_PROMPT = (
    "You are one of three planning agents that share a workspace. Each agent reads the "
    "same brief, keeps its own notes, and answers in short plain sentences. The brief: a "
    "small bakery wants to plan its week. It opens at seven in the morning and closes at "
    "six in the evening, bakes bread, rolls and cakes, and sells coffee. On Monday the oven "
    "is serviced until noon. On Wednesday a school orders two hundred rolls. On Friday the "
    "town market runs all day and the bakery sells from a stall. On Saturday a wedding "
    "needs a three-tier cake by two in the afternoon. Flour is delivered on Tuesday and "
    "Thursday. Two bakers work early shifts, one clerk works the counter, and a driver "
    "delivers orders in the afternoon. Keep costs low, waste little, and never miss an "
    "order. When you answer, say what to do first, what can wait, and what could go wrong. "
)
AGENTS = {
    "planner": ("Plan Monday.", " Now plan Wednesday."),
    "baker": ("What must be baked first on Friday?", " And on Saturday?"),
    "clerk": ("Which orders need a call today?", " Which can wait?"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model dir or Hugging Face id (default: embedded model)")
    parser.add_argument("--max-tokens", type=int, default=40)
    args = parser.parse_args()

    print("agentkv demo: three agents, one shared system prompt, two turns each\n")
    model, tokenizer, path = _load(args.model)
    from agentkv.daemon import BlockPool, BlockPoolBatchEngine, ModelCacheSpec

    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=64)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    print(f"model   {path}  ({spec.model_type}, {len(spec.layers)} layers)")
    mib = spec.bytes_per_block() / 2**20
    print(f"pool    {pool.total_blocks} blocks x {pool.block_size} tokens, {mib:.2f} MiB each\n")

    print(f"{'turn':<5}{'agent':<9}{'prompt':>7}{'cached':>8}{'new':>6}{'ttft ms':>9}  text")
    second: dict[str, tuple[list[int], list[int]]] = {}  # agent -> (context, turn-2 tokens)
    for turn in (0, 1):
        for agent, prompts in AGENTS.items():
            text = SYSTEM_PROMPT + prompts[0] if turn == 0 else prompts[1]
            before = engine.agent_tokens(agent) if turn else []
            engine.submit(agent, text, max_tokens=args.max_tokens)
            # One agent at a time, so the next one finds the shared blocks already pooled.
            for c in engine.step():
                _print_turn(turn + 1, c)
                added = tokenizer.encode(text, add_special_tokens=False)
                second[agent] = (before + added, c.token_ids)
    ok = _check(second, model, tokenizer, args.max_tokens)
    _print_sharing(engine)
    verdict = "PASS: second turns from the cache equal" if ok else "FAIL: second turns differ from"
    print(f"\n{verdict} from-scratch mlx-lm runs of the whole context")
    return 0 if ok else 1


def _load(name):
    from agentkv.daemon.model_factory import default_model_dir, ensure_default_model, load_model

    if name is None and not (default_model_dir() / "config.json").exists():
        print(f"building the embedded default model once into {default_model_dir()} ...")
    tic = time.perf_counter()
    model, tokenizer = load_model(name or ensure_default_model())
    print(f"loaded in {time.perf_counter() - tic:.1f} s")
    return model, tokenizer, name or default_model_dir()


def _print_turn(turn: int, c) -> None:
    u = c.usage
    snippet = c.text.replace("\n", " ")[:38]
    counts = f"{u.prompt_tokens:>7}{u.cached_tokens:>8}{u.generated_tokens:>6}"
    print(f"{turn:<5}{c.agent_id:<9}{counts}{u.ttft_ms:>9.1f}  {snippet!r}")


def _check(second: dict, model, tokenizer, max_tokens: int) -> bool:
    """Replay each agent's whole turn-2 context through mlx-lm from scratch and compare."""
    from mlx_lm import stream_generate

    ok = True
    for context, got in second.values():
        ref = stream_generate(model, tokenizer, context, max_tokens=max_tokens)
        ref = [r.token for r in ref if r.finish_reason != "stop"]
        ok &= got == ref
    return ok


def _print_sharing(engine) -> None:
    print("\nblocks per agent (shared = stored once, referenced by several agents):")
    for agent in engine.agent_ids():
        info = engine.agent_info(agent)
        blocks = f"{info.blocks} blocks  {info.shared_blocks} shared"
        print(f"  {agent:<9} {info.tokens:>5} tokens  {blocks}")
    s = engine.pool.stats()
    print(f"pool: {s.in_use} blocks in use, {s.free} free, {s.cached} content-addressed")


if __name__ == "__main__":
    sys.exit(main())
