"""The victim of `test_store_crash.py`: an engine writing agents back to a store, forever.

Run as ``python tests/crash_child.py MODEL_DIR STORE_DIR SEED``. It loads the model, opens
the store and loops over a handful of agents (some sharing a prompt prefix, so blocks are
shared), giving a random subset of them a turn each round; an agent whose context grows too
long is deleted and starts again. Every finished turn is written back by the store's writer
thread while the next round decodes, so block files, state files and index transactions
are in flight nearly all the time. After each finished turn it prints ``turn AGENT N`` (N
counts this process's turns) and flushes. It never exits by itself: the parent kills it.

On a store left by an earlier kill the same agent ids come back and are restored from disk
at their next turn, so the files it finds are rewritten, reused and replaced too. Any
warning the engine or the store logs (a failed write, a corrupt file, a stopped restore)
goes to stderr prefixed with ``agentkv-log``, for the parent to reject.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
from refs import make_engine, random_tokens

from agentkv.daemon.engine.model_factory import load_model
from agentkv.storage import CacheStore

AGENTS = 6
VOCAB = 768
BLOCK_SIZE = 16
SHARED_PREFIX = 40  # the even agents open with it: blocks stored once, listed by several
MAX_CONTEXT = 240  # an agent this long is deleted and starts over


def _prompt(rng: np.random.Generator, engine, agent: str, shared: list[int]) -> list[int]:
    """The agent's next prompt: an opening one (lengths 5-100) or a follow-up (1-24)."""
    if agent not in engine.agent_ids():
        opening = random_tokens(rng, int(rng.integers(5, 100)), VOCAB)
        return shared + opening if int(agent[-1]) % 2 == 0 else opening
    return random_tokens(rng, int(rng.integers(1, 25)), VOCAB)


def main(argv: list[str]) -> None:
    """Loop over the agents' turns until killed."""
    model_dir, store_dir, seed = argv[1], argv[2], int(argv[3])
    logging.basicConfig(level=logging.WARNING, format="agentkv-log %(name)s: %(message)s")
    model, tokenizer = load_model(model_dir)
    engine = make_engine(
        model, tokenizer, block_size=BLOCK_SIZE, total_blocks=512, store=CacheStore(store_dir)
    )
    rng = np.random.default_rng(seed)
    shared = random_tokens(np.random.default_rng(0), SHARED_PREFIX, VOCAB)
    agents = [f"agent{i}" for i in range(AGENTS)]
    turns = 0
    while True:
        chosen = [a for a in agents if rng.random() < 0.6] or [agents[int(rng.integers(AGENTS))]]
        for agent in chosen:
            if agent in engine.agent_ids() and len(engine.agent_tokens(agent)) > MAX_CONTEXT:
                engine.delete_agent(agent)
            prompt = _prompt(rng, engine, agent, shared)
            engine.submit(agent, prompt, max_tokens=int(rng.integers(4, 17)))
        for completion in engine.step():
            turns += 1
            print(f"turn {completion.agent_id} {turns}", flush=True)


if __name__ == "__main__":
    main(sys.argv)
