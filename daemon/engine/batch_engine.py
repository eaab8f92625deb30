"""BlockPoolBatchEngine: many agents' turns through one mlx-lm BatchGenerator.

Each agent keeps a context (its token ids) and, between turns, its cache as pool blocks.
A submitted turn waits behind the agent's earlier turns (per-agent FIFO), is admitted when
the pool can reserve what it may need, gets its cached prefix rebuilt once into fresh
mlx-lm caches, and joins the continuous batch. When it finishes, its cache becomes the
agent's blocks again. All of this runs on one thread: the one that owns MLX.

This class is the public facade; the work is done by its parts:
`scheduler.Scheduler` (queues, admission, the step loop), `batch_runner.BatchRunner` (the
BatchGenerator; finished turns committed), `agent_registry.AgentRegistry` (agents in
memory and in the store, restore, write-back, the LRU victim, fork and delete),
`intake.Intake` (a turn's input made token ids), `outputs` (text deltas, stop strings,
completions), `turns` (a turn's record and status) and `kv_cache_manager.KVCacheManager`
(the pool's bookkeeping of a turn).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence

from mlx_lm.tokenizer_utils import TokenizerWrapper

from agentkv.client.protocol import SUBMIT_DEFAULTS
from agentkv.storage import CacheStore, StoreWriteError

from ..errors import CacheReconstructionError, EngineClosedError
from . import persistence
from .agent_registry import AgentInfo, AgentRegistry
from .agents import AgentContext
from .batch_runner import BatchRunner
from .block_pool import BlockPool
from .intake import Intake
from .kv_cache_manager import Admission, KVCacheManager
from .prompts import check_agent_id
from .requests import Completion, StepEvent
from .scheduler import Scheduler
from .spec import ModelCacheSpec
from .turns import LogitsProcessor, RequestStatus, TurnTable, checked_request

__all__ = ["AgentInfo", "BlockPoolBatchEngine"]

log = logging.getLogger("agentkv.engine")

# What `stats` counts: turns by how they ended, and caches dropped and restored.
COUNTERS = (
    "completed",
    "cancelled",
    "errors",
    "dropped_caches",
    "restored_agents",
    "restored_tokens",
)


class BlockPoolBatchEngine:
    """Continuous batching over agents whose caches live in a block pool.

    Example:
        spec = ModelCacheSpec.from_model(model)
        pool = BlockPool(spec, total_blocks=100)
        engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
        uid = engine.submit("planner", "Hello", max_tokens=50)
        for c in engine.step():
            print(c.agent_id, c.text, c.usage)

    Args:
        model: an mlx-lm model.
        tokenizer: its tokenizer (a TokenizerWrapper, or a Hugging Face tokenizer).
        pool: the block pool (its block size is the one used).
        spec: the model's cache spec.
        max_batch_size: sequences decoding at once.
        prefill_batch_size: sequences prefilled at once.
        prefill_step_size: prompt tokens per prefill chunk; a long prompt delays others'
            decoding by at most one chunk per step.
        store: a CacheStore; agents' caches are then written back after each turn and
            restored from disk when an agent not in memory comes back. `close()` flushes
            and closes it.
        model_id: what the store records as the model's id (its path or Hugging Face id);
            by default its model type.
    """

    def __init__(
        self,
        model,
        tokenizer,
        pool: BlockPool,
        spec: ModelCacheSpec,
        *,
        max_batch_size: int = 32,
        prefill_batch_size: int = 8,
        prefill_step_size: int = 2048,
        store: CacheStore | None = None,
        model_id: str | None = None,
    ) -> None:
        if pool.block_size != spec.block_size and spec.block_size:
            log.debug("pool block size %d overrides spec's %d", pool.block_size, spec.block_size)
        self.model = model
        self.tokenizer = (
            tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)
        )
        self.pool = pool
        self.spec = spec
        self.store = store
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._manager = manager = KVCacheManager(spec, pool)
        self._registry = registry = AgentRegistry(spec, pool, manager, store, self.counters)
        turns = TurnTable(self.counters)
        self._intake = Intake(self.tokenizer, spec.vocab_size, pool, manager, turns)
        batch_opts = {
            "completion_batch_size": max_batch_size,
            "prefill_batch_size": prefill_batch_size,
            "prefill_step_size": prefill_step_size,
        }
        runner = BatchRunner(model, self.tokenizer, registry, manager, turns, batch_opts)
        self._scheduler = Scheduler(registry, manager, turns, self._intake, runner)
        self._encoder = self._intake.encoder  # its inline size is lowered by tests
        self._agents: dict[str, AgentContext] = self._registry.agents  # the same dict
        self._closed = False
        self._owner: int | None = None
        if store is not None:
            store.register_model(
                spec.fingerprint,
                model_id=model_id or spec.model_type,
                config=persistence.model_config(model),
                block_size=pool.block_size,
            )

    # -- turns -----------------------------------------------------------------------------

    def submit(
        self,
        agent_id: str,
        prompt: str | Sequence[int] | None = None,
        max_tokens: int = SUBMIT_DEFAULTS.max_tokens,
        *,
        messages: Sequence[dict] | None = None,
        conversation: Sequence[int] | None = None,
        temperature: float = SUBMIT_DEFAULTS.temperature,
        top_p: float = SUBMIT_DEFAULTS.top_p,
        top_k: int = SUBMIT_DEFAULTS.top_k,
        min_p: float = SUBMIT_DEFAULTS.min_p,
        seed: int | None = SUBMIT_DEFAULTS.seed,
        logits_processors: Sequence[LogitsProcessor] | None = None,
        stop: Sequence[str] | None = None,
        tools: list[dict] | None = None,
    ) -> int:
        """Queue a turn for an agent and return its uid.

        Give exactly one of: `prompt` (text or token ids appended to the agent's context),
        `messages` (the whole chat, rendered with the model's chat template) or
        `conversation` (the whole context as token ids). The whole-context forms reuse the
        longest common token prefix with the agent's context and recompute the rest.
        `tools` (with `messages`) go to the chat template; when the model has a tool
        parser (`tool_calling`), the completion carries the calls its text holds.

        Text or a chat that could never fit in the pool is refused from its size before it
        is tokenized. Text over `prompts.INLINE_ENCODE_BYTES` (and chats of that size) is
        tokenized on a worker thread: submit returns at once, the turn keeps its place in
        its agent's order, and what tokenizing finds (no tokens, a template refusal, more
        tokens than the pool holds) ends the turn with finish_reason "error" and that
        error's code; `is_encoding(uid)` is True until then.

        Raises:
            InvalidRequestError: bad agent id, empty prompt, max_tokens <= 0, bad sampling.
            PoolExhaustedError: the turn could never fit in the pool.
            EngineClosedError: the engine was closed.
        """
        self._check_thread()
        self._check_open()
        req = checked_request(
            self._scheduler.next_uid,
            agent_id,
            max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            seed=seed,
            logits_processors=logits_processors,
            stop=stop,
            submitted=time.perf_counter(),
        )
        agent = self._registry.for_turn(agent_id)
        self._intake.set_input(req, agent, prompt, messages, conversation, tools)
        if req.job is None:
            self._intake.check_fits(req, agent)
        self._registry.add(agent)
        self._scheduler.enqueue(req, agent)
        return req.uid

    def step(self) -> Iterator[Completion]:
        """Drive the batch until idle, yielding each completion as it finishes."""
        while self.has_work:
            if not self.can_step:  # only tokenizing: wait for the oldest job
                self._scheduler.wait_for_encoding(0.05)
            for event in self.step_once():
                if event.completion is not None:
                    yield event.completion

    def step_once(self) -> list[StepEvent]:
        """One scheduling step: admit waiting turns, run one batch step, commit finished ones.

        Returns:
            The events of this step: a token (and its text) per decoding request, and a
            completion for each request that finished (or was cancelled or failed).
        """
        self._check_thread()
        if self._closed:  # only the completions of the turns `close` cancelled
            return self._scheduler.take_events()
        return self._scheduler.step()

    @property
    def has_work(self) -> bool:
        """True while turns are tokenized, wait, run, or have events not yet returned."""
        return self._scheduler.has_work

    @property
    def can_step(self) -> bool:
        """True when a step could make progress now (`has_work`, less turns that only
        wait for their tokenizing): a caller with nothing else to do may sleep otherwise."""
        return self._scheduler.can_step

    @property
    def tool_calling(self) -> dict | None:
        """The model's tool calling, as `hello` reports it: its tool-call markers and
        parser, or None when its chat template takes no tools or mlx-lm knows no tool
        parser for it (then its output cannot be read as calls)."""
        parser = self._intake.tool_parser
        if parser is None or not self._intake.encoder.takes_tools():
            return None
        return parser.facts()

    def is_encoding(self, uid: int) -> bool:
        """True while the turn's input is being tokenized (see `submit`)."""
        return self._scheduler.status(uid) is RequestStatus.ENCODING

    def cancel(self, uid: int) -> bool:
        """Cancel a waiting or running turn; the agent's context stays as before it.

        Its completion (finish_reason "cancelled", with any text generated so far) comes
        out of the next step. Returns False if the uid is unknown or already finished.
        """
        self._check_thread()
        return self._scheduler.cancel(uid)

    def close(self) -> list[dict]:
        """Cancel everything, release every agent's blocks and stop accepting work.

        Returns:
            The agents whose finished turns could not be made durable even by a last
            write at close (disk full, ...), as `unsaved_report` rows; [] when every
            finished turn is on disk (or there is no store).
        """
        if self._closed:
            return []
        self._scheduler.cancel_all()
        self._registry.resave_unsaved()
        report = []
        if self.store is not None:
            with contextlib.suppress(StoreWriteError):  # logged; `unsaved` says who
                self.store.flush()
            report = self.unsaved_report()
        self._registry.drop_all()
        self._scheduler.close()
        self._closed = True
        if self.store is not None:
            self.store.close()
        return report

    def unsaved_report(self) -> list[dict]:
        """Agents whose latest turn could not be written: `agent_id`, `behind_tokens` (the
        tokens of its context that the store does not hold yet) and `error` (why)."""
        return self._registry.unsaved_report()

    # -- agents ----------------------------------------------------------------------------

    def agent_ids(self) -> list[str]:
        """Ids of every agent the engine knows: in memory, and in its store for this model.
        Raises EngineClosedError after `close()`."""
        self._check_open()
        return self._registry.ids()

    def agent_info(self, agent_id: str) -> AgentInfo:
        """A snapshot of one agent. Raises UnknownAgentError."""
        return self._registry.info(self._peek(agent_id))

    def agent_snapshot(self, agent_id: str) -> tuple[AgentInfo, list[int]]:
        """`agent_info` and `agent_tokens` from one lookup (one index read for an agent
        that is only on disk). Raises UnknownAgentError."""
        agent = self._peek(agent_id)
        return self._registry.info(agent), list(agent.tokens)

    def fork_agent(self, agent_id: str, new_agent_id: str) -> None:
        """Branch an agent's committed context under a new id, copy-on-write.

        The fork shares every block (reference counts), the tail and the window/state
        snapshots, which are never modified in place; each agent's next turn writes its
        own new blocks.

        Raises:
            UnknownAgentError: no such agent.
            AgentExistsError: `new_agent_id` is taken.
        """
        self._check_thread()
        check_agent_id(new_agent_id)
        self._check_open()
        self._registry.fork(agent_id, new_agent_id)

    def agent_tokens(self, agent_id: str) -> list[int]:
        """A copy of an agent's context token ids. Raises UnknownAgentError."""
        return list(self._peek(agent_id).tokens)

    def agent_cache(self, agent_id: str) -> list:
        """The agent's cache rebuilt into mlx-lm cache objects (for inspection and tests).

        Raises:
            UnknownAgentError: no such agent.
            CacheReconstructionError: the agent holds no cache (dropped) or it is broken.
        """
        self._check_thread()
        agent = self._agent(agent_id)
        cache = agent.cache
        if cache.cached_len == 0:
            raise CacheReconstructionError(f"agent {agent_id!r} holds no cache")
        adm = Admission(list(cache.tokens), cache.cached_len, own_cache=True)
        return self._manager.rebuild(agent, adm)

    def delete_agent(self, agent_id: str) -> None:
        """Cancel the agent's turns and forget it, releasing its blocks."""
        self._check_thread()
        agent = self._agent(agent_id)
        for uid in [*([agent.active] if agent.active is not None else []), *agent.pending]:
            self.cancel(uid)
        self._registry.delete(agent)

    def finish_delete(self, agent_id: str) -> str | None:
        """Once the store settled an agent's delete (`store.is_settled`): None if it is on
        disk; else why not, and the agent is back as it was (unless a new agent of that id
        exists by now): a delete that cannot be made durable loses nothing."""
        self._check_thread()
        return self._registry.finish_delete(agent_id)

    def stats(self) -> dict:
        """Counters, queue lengths and pool occupancy."""
        s = self.pool.stats()
        return {
            **self.counters,
            "agents": self._registry.count(),
            **self._scheduler.counts(),
            "pool": {k: getattr(s, k) for k in s.__slots__},
        }

    # -- internals -------------------------------------------------------------------------

    def _agent(self, agent_id: str) -> AgentContext:
        """The agent (brought into memory from the store if only there)."""
        self._check_open()
        return self._registry.load(agent_id)

    def _peek(self, agent_id: str) -> AgentContext:
        """Like `_agent`, but an agent only on disk is read, not brought into memory."""
        self._check_open()
        return self._registry.peek(agent_id)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("engine is closed")

    def _check_thread(self) -> None:
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        elif self._owner != me:
            raise RuntimeError("the engine must be used from one thread (the one that owns MLX)")
