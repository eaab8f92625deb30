"""BlockPoolBatchEngine: many agents' turns through one mlx-lm BatchGenerator.

Each agent keeps a context (its token ids) and, between turns, its cache as pool blocks.
A submitted turn waits behind the agent's earlier turns (per-agent FIFO), is admitted when
the pool can reserve what it may need, gets its cached prefix rebuilt once into fresh
mlx-lm caches, and joins the continuous batch. When it finishes, its cache becomes the
agent's blocks again. All of this runs on one thread: the one that owns MLX.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from mlx_lm.generate import BatchGenerator
from mlx_lm.tokenizer_utils import TokenizerWrapper

from agentkv.client.protocol import SUBMIT_DEFAULTS
from agentkv.storage import CacheStore, StorageError, StoreWriteError

from ..errors import (
    AgentExistsError,
    AgentKVError,
    CacheReconstructionError,
    EngineClosedError,
    InvalidRequestError,
    PoolExhaustedError,
    UnknownAgentError,
)
from . import persistence
from .agents import AgentContext
from .block_pool import BlockPool
from .kv_cache_manager import Admission, KVCacheManager
from .prompts import (
    EncodeJob,
    PromptEncoder,
    check_agent_id,
    check_messages,
    check_text,
    check_tokens,
)
from .requests import Completion, SamplingParams, StepEvent, Usage, turn_options
from .sampling import make_request_sampler
from .spec import ModelCacheSpec

log = logging.getLogger("agentkv.engine")

LogitsProcessor = Callable


@dataclass(slots=True, eq=False)
class _Request:
    uid: int
    agent_id: str
    max_tokens: int
    params: SamplingParams
    new_tokens: list[int] | None = None  # appended to the context
    full_tokens: list[int] | None = None  # the whole conversation (prefix reuse)
    processors: list = field(default_factory=list)
    submitted: float = 0.0
    admitted: float = 0.0
    first_token: float = 0.0
    batch_uid: int = -1
    admission: Admission | None = None
    detok: object = None
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    restore_ms: float = 0.0
    prefill_ms: float = 0.0
    failure: Exception | None = None
    stop: tuple[str, ...] = ()
    held: str = ""  # text held back while it could be the start of a stop string
    # A text prompt encoded as a later turn (no BOS) while earlier turns were queued: if
    # they are cancelled or fail, it is the agent's first turn after all, and this (its
    # encoding as a first turn) is used instead (see _admit).
    first_tokens: list[int] | None = None
    job: EncodeJob | None = None  # its input is being tokenized on the encoder's thread
    fewest: int = 0  # a lower bound on its input's tokens (what is known while encoding)
    chat: bool = False  # its input is a whole chat (replaces the context)


@dataclass(slots=True)
class AgentInfo:
    """A snapshot of one agent for inspection.

    Attributes:
        agent_id: the agent.
        tokens: context length in tokens.
        cached_tokens: tokens whose cache is held (0 if dropped).
        blocks: pool blocks held (full blocks plus tail).
        shared_blocks: of those, blocks other agents reference too.
        busy: a turn of this agent is in the batch.
        pending: turns waiting behind it.
        in_store: the store holds its current context (or has it queued for writing): its
            cache is restored from there at its next turn if not in memory.
        disk_blocks: full blocks of it the store holds (or has queued for writing).
        last_used: wall-clock time of its last finished turn (0.0: none yet).
        in_memory: the pool holds its cache.
        saving: a write of it to the store is queued.
        state: one word for all that: "running" (a turn in the batch), "queued" (turns
            waiting), "in memory", "on disk" (only the store holds its cache), or "no cache"
            (recomputed from its tokens at its next turn); ", saving" while a write is
            queued, ", unsaved" when its latest write failed.
    """

    agent_id: str
    tokens: int
    cached_tokens: int
    blocks: int
    shared_blocks: int
    busy: bool
    pending: int
    in_store: bool = False
    disk_blocks: int = 0
    last_used: float = 0.0
    in_memory: bool = False
    saving: bool = False
    state: str = "no cache"


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
        self._manager = KVCacheManager(spec, pool)
        self._batch_opts = {
            "completion_batch_size": max_batch_size,
            "prefill_batch_size": prefill_batch_size,
            "prefill_step_size": prefill_step_size,
        }
        self._max_active = max_batch_size
        self._eos = frozenset(self.tokenizer.eos_token_ids)
        self._gen = self._new_generator()
        self._agents: dict[str, AgentContext] = {}
        # Agents whose delete is queued in the store: kept until it is on disk, so a delete
        # that cannot be written (disk full) gives the agent back instead of losing it.
        self._deleting: dict[str, AgentContext] = {}
        self._requests: dict[int, _Request] = {}
        self._waiting: deque[int] = deque()
        self._active: dict[int, _Request] = {}  # batch uid -> request
        self._events: list[StepEvent] = []
        self._next_uid = 0
        self._clock = 0
        self._closed = False
        self._encoder = PromptEncoder(self.tokenizer)
        self._encoding: dict[int, _Request] = {}  # uid -> request whose input is tokenizing
        self._owner: int | None = None
        self.counters = {
            "completed": 0,
            "cancelled": 0,
            "errors": 0,
            "dropped_caches": 0,
            "restored_agents": 0,
            "restored_tokens": 0,
        }
        self.store = store
        self._layout = persistence.layout_meta(spec, pool.block_size)
        if store is not None:
            store.register_model(
                spec.fingerprint,
                model_id=model_id or spec.model_type,
                config=persistence.model_config(model),
                block_size=pool.block_size,
            )

    # -- public API ------------------------------------------------------------------------

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
    ) -> int:
        """Queue a turn for an agent and return its uid.

        Give exactly one of: `prompt` (text or token ids appended to the agent's context),
        `messages` (the whole chat, rendered with the model's chat template) or
        `conversation` (the whole context as token ids). The whole-context forms reuse the
        longest common token prefix with the agent's context and recompute the rest.

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
        check_agent_id(agent_id)
        options = turn_options(max_tokens, temperature, top_p, top_k, min_p, seed, stop)
        req = _Request(
            uid=self._next_uid,
            agent_id=agent_id,
            max_tokens=options.max_tokens,
            params=SamplingParams.of(options),
            processors=_check_processors(logits_processors),
            submitted=time.perf_counter(),
            stop=options.stop,
        )
        agent = self._agents.get(agent_id) or self._stored_agent(agent_id) or AgentContext(agent_id)
        self._set_input(req, agent, prompt, messages, conversation)
        if req.job is None:
            self._check_fits(req, agent)
        self._next_uid += 1
        self._agents[agent_id] = agent
        agent.pending.append(req.uid)
        self._requests[req.uid] = req
        if req.job is None:
            self._waiting.append(req.uid)
        else:
            self._encoding[req.uid] = req
        return req.uid

    def step(self) -> Iterator[Completion]:
        """Drive the batch until idle, yielding each completion as it finishes."""
        while self.has_work:
            if not self.can_step:  # only tokenizing: wait for the oldest job
                next(iter(self._encoding.values())).job.done.wait(0.05)
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
        events, self._events = self._events, []
        if self._closed:
            return events
        if self._encoding:
            self._collect_encoded(events)
        self._admit_waiting(events)
        if self._active:
            self._run_batch(events)
        return events

    @property
    def has_work(self) -> bool:
        """True while turns are tokenized, wait, run, or have events not yet returned."""
        return bool(self._encoding or self._waiting or self._active or self._events)

    @property
    def can_step(self) -> bool:
        """True when a step could make progress now (`has_work`, less turns that only
        wait for their tokenizing): a caller with nothing else to do may sleep otherwise."""
        if self._waiting or self._active or self._events:
            return True
        return any(r.job.done.is_set() for r in self._encoding.values())

    def is_encoding(self, uid: int) -> bool:
        """True while the turn's input is being tokenized (see `submit`)."""
        return uid in self._encoding

    def cancel(self, uid: int) -> bool:
        """Cancel a waiting or running turn; the agent's context stays as before it.

        Its completion (finish_reason "cancelled", with any text generated so far) comes
        out of the next step. Returns False if the uid is unknown or already finished.
        """
        self._check_thread()
        req = self._requests.get(uid)
        if req is None:
            return False
        agent = self._agents[req.agent_id]
        if req.job is not None:
            req.job.cancelled = True  # skipped if not started; its result is dropped
            del self._encoding[uid]
            agent.pending.remove(uid)
        elif req.admission is None:
            self._waiting.remove(uid)
            agent.pending.remove(uid)
        else:
            self._gen.remove([req.batch_uid])
            self._release(req, agent)
        self.counters["cancelled"] += 1
        completion = self._finish(req, "cancelled")
        self._events.append(StepEvent(uid, req.agent_id, None, "", completion))
        return True

    def close(self) -> list[dict]:
        """Cancel everything, release every agent's blocks and stop accepting work.

        Returns:
            The agents whose finished turns could not be made durable even by a last
            write at close (disk full, ...), as `unsaved_report` rows; [] when every
            finished turn is on disk (or there is no store).
        """
        if self._closed:
            return []
        for uid in list(self._requests):
            self.cancel(uid)
        self._resave_unsaved()
        report = []
        if self.store is not None:
            with contextlib.suppress(StoreWriteError):  # logged; `unsaved` says who
                self.store.flush()
            report = self.unsaved_report()
        for agent in self._agents.values():
            self._manager.drop(agent)
        self._gen.close()
        self._encoder.close()
        self._closed = True
        if self.store is not None:
            self.store.close()
        return report

    def unsaved_report(self) -> list[dict]:
        """Agents whose latest turn could not be written: `agent_id`, `behind_tokens` (the
        tokens of its context that the store does not hold yet) and `error` (why)."""
        if self.store is None:
            return []
        rows = []
        for agent_id, why in sorted(self.store.unsaved_agents(self.spec.fingerprint).items()):
            agent = self._agents.get(agent_id)
            if agent is None:
                continue
            try:
                durable = self.store.durable_tokens(agent_id, self.spec.fingerprint)
            except StorageError:  # a damaged index: count the whole context as behind
                durable = 0
            behind = max(len(agent.tokens) - durable, 0)
            rows.append({"agent_id": agent_id, "behind_tokens": behind, "error": why})
        return rows

    # -- agents ----------------------------------------------------------------------------

    def agent_ids(self) -> list[str]:
        """Ids of every agent the engine knows: in memory, and in its store for this model.
        Raises EngineClosedError after `close()`."""
        self._check_open()
        ids = list(self._agents)
        if self.store is not None:
            known = set(ids)
            ids += [a for a in self.store.agent_ids(self.spec.fingerprint) if a not in known]
        return ids

    def agent_info(self, agent_id: str) -> AgentInfo:
        """A snapshot of one agent. Raises UnknownAgentError."""
        return self._info(self._peek(agent_id))

    def agent_snapshot(self, agent_id: str) -> tuple[AgentInfo, list[int]]:
        """`agent_info` and `agent_tokens` from one lookup (one index read for an agent
        that is only on disk). Raises UnknownAgentError."""
        agent = self._peek(agent_id)
        return self._info(agent), list(agent.tokens)

    def _info(self, agent: AgentContext) -> AgentInfo:
        held = agent.held_blocks()
        store, aid = self.store, agent.agent_id
        unsaved = store is not None and store.unsaved(aid, self.spec.fingerprint) is not None
        in_store = store is not None and (agent.in_store or agent.saved) and not unsaved
        in_memory = agent.cached_len > 0
        saving = store is not None and not store.is_settled(aid)
        if agent.busy or agent.pending:
            state = "running" if agent.busy else "queued"
        else:
            state = "in memory" if in_memory else "on disk" if in_store else "no cache"
        state += ", saving" if saving else ", unsaved" if unsaved else ""
        return AgentInfo(
            agent_id=agent.agent_id,
            tokens=len(agent.tokens),
            cached_tokens=agent.cached_len,
            blocks=len(held),
            shared_blocks=sum(1 for b in held if b.ref_cnt > 1),
            busy=agent.busy,
            pending=len(agent.pending),
            in_store=in_store,
            disk_blocks=agent.disk_blocks if store is not None else 0,
            last_used=agent.last_turn,
            in_memory=in_memory,
            saving=saving,
            state=state,
        )

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
        src = self._agent(agent_id)
        if new_agent_id in self._agents or self._stored_agent(new_agent_id) is not None:
            raise AgentExistsError(f"agent {new_agent_id!r} exists already")
        if src.cached_len == 0 and src.in_store:
            self._restore(src)
        try:
            self._manager.settle_restored(src)
        except PoolExhaustedError:
            self._drop_cache(src)  # the fork (and src's next turn) recompute instead
        self.pool.touch(src.held_blocks())
        self._clock += 1
        self._agents[new_agent_id] = AgentContext(
            new_agent_id,
            tokens=list(src.tokens),
            blocks=list(src.blocks),
            tail=src.tail,
            windows=dict(src.windows),
            states=dict(src.states),
            cached_len=src.cached_len,
            last_used=self._clock,
            last_turn=src.last_turn,
        )
        # Even with no cache to share: the fork's token ids must outlive a restart.
        self._write_back(self._agents[new_agent_id])

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
        if agent.cached_len == 0:
            raise CacheReconstructionError(f"agent {agent_id!r} holds no cache")
        adm = Admission(list(agent.tokens), agent.cached_len, own_cache=True)
        return self._manager.rebuild(agent, adm)

    def delete_agent(self, agent_id: str) -> None:
        """Cancel the agent's turns and forget it, releasing its blocks."""
        self._check_thread()
        agent = self._agent(agent_id)
        for uid in [*([agent.active] if agent.active is not None else []), *agent.pending]:
            self.cancel(uid)
        del self._agents[agent_id]
        if self.store is None:
            self._manager.drop(agent)
            return
        self.store.delete_agent(agent_id, self.spec.fingerprint)
        previous = self._deleting.pop(agent_id, None)
        if previous is not None:  # deleted again meanwhile: the older copy is not needed
            self._manager.drop(previous)
        self._deleting[agent_id] = agent

    def finish_delete(self, agent_id: str) -> str | None:
        """Once the store settled an agent's delete (`store.is_settled`): None if it is on
        disk; else why not, and the agent is back as it was (unless a new agent of that id
        exists by now): a delete that cannot be made durable loses nothing."""
        self._check_thread()
        agent = self._deleting.pop(agent_id, None)
        why = self.store.delete_error(agent_id, self.spec.fingerprint) if self.store else None
        if agent is not None:
            if why is None or agent_id in self._agents:
                self._manager.drop(agent)
            else:
                self._agents[agent_id] = agent
        return why

    def stats(self) -> dict:
        """Counters, queue lengths and pool occupancy."""
        s = self.pool.stats()
        return {
            **self.counters,
            "agents": self._agent_count(),
            "waiting": len(self._waiting),
            "active": len(self._active),
            "pool": {k: getattr(s, k) for k in s.__slots__},
        }

    def _agent_count(self) -> int:
        """Agents in memory, and on disk only (after a restart); those in memory alone when
        the store's index cannot be read (its stats say why: stats must still answer)."""
        try:
            return len(self.agent_ids())
        except StorageError:
            return len(self._agents)

    # -- submit helpers --------------------------------------------------------------------

    def _set_input(
        self, req: _Request, agent: AgentContext, prompt, messages, conversation
    ) -> None:
        given = [x is not None for x in (prompt, messages, conversation)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of prompt, messages or conversation")
        if conversation is not None:
            if isinstance(conversation, Sequence):  # too long: refused before it is checked
                self._require_room(len(conversation) + req.max_tokens)
            req.full_tokens = check_tokens(conversation, self.spec.vocab_size, "conversation")
        elif messages is not None:
            self._refuse_oversized(req, agent, None, messages)  # first: one cheap pass
            messages = check_messages(self.tokenizer, messages)
            req.chat = True
            self._encode(req, lambda: self._encoder.render(messages), messages=messages)
        elif isinstance(prompt, str):
            check_text(prompt)
            self._refuse_oversized(req, agent, prompt, None)
            self._encode_text(req, agent, prompt)
        else:
            if isinstance(prompt, Sequence):
                base = self._projected_len(agent, before=req.uid)
                self._require_room(base + len(prompt) + req.max_tokens)
            req.new_tokens = check_tokens(prompt, self.spec.vocab_size, "prompt")

    def _encode_text(self, req: _Request, agent: AgentContext, prompt: str) -> None:
        first = not (agent.tokens or agent.pending or agent.busy)
        # Turns queued before it may yet leave nothing: then this is the first turn after all.
        maybe_first = not first and not agent.tokens

        def encode():
            ids = self._encoder.encode_turn(prompt, first_turn=first)
            alt = self._encoder.encode_turn(prompt, first_turn=True) if maybe_first else None
            return ids, alt

        self._encode(req, encode, prompt=prompt)

    def _encode(self, req: _Request, encode, *, prompt=None, messages=None) -> None:
        """Run `encode` now if the input is small, else on the encoder's worker thread."""
        if self._encoder.is_large(prompt, messages):
            req.job = self._encoder.start(encode)
        else:
            self._take_encoded(req, encode())

    def _take_encoded(self, req: _Request, result) -> None:
        if isinstance(result, tuple):  # a text prompt: its ids, and as a first turn
            req.new_tokens, req.first_tokens = result
        else:
            req.full_tokens = result

    def _collect_encoded(self, events: list[StepEvent]) -> None:
        """Turns whose input the worker finished tokenizing join the waiting queue (their
        agent's order is kept by `agent.pending`), or fail if it could not be used."""
        for uid, req in list(self._encoding.items()):
            job = req.job
            if not job.done.is_set():
                continue
            del self._encoding[uid]
            req.job = None
            agent = self._agents[req.agent_id]
            try:
                if job.error is not None:
                    raise job.error
                self._take_encoded(req, job.result)
                self._check_fits(req, agent)
            except Exception as exc:  # the request's own fault (or its template's)
                agent.pending.remove(uid)
                events.append(self._fail(req, exc))
                continue
            self._waiting.append(uid)

    def _stored_agent(self, agent_id: str) -> AgentContext | None:
        """An agent known only to the store: its tokens now, its cache at admission."""
        if self.store is None:
            return None
        stored = self.store.agent(agent_id, self.spec.fingerprint)
        if stored is None:
            return None
        vocab = self.spec.vocab_size or 2**31
        if not all(0 <= t < vocab for t in stored.tokens):
            what = "token ids outside the vocabulary; treated as a new agent"
            self.store.report_corrupt_row(agent_id, self.spec.fingerprint, what)
            return None
        return AgentContext(
            agent_id,
            tokens=stored.tokens,
            in_store=True,
            disk_blocks=len(stored.block_hashes),
            last_turn=stored.last_used,
            saved=True,
        )

    def _check_fits(self, req: _Request, agent: AgentContext) -> None:
        """Refuse a turn that could never fit in the pool, even alone."""
        length = len(req.full_tokens) if req.new_tokens is None else len(req.new_tokens)
        if req.new_tokens is not None:
            length += self._projected_len(agent, before=req.uid)
        self._require_room(length + req.max_tokens)

    def _require_room(self, tokens: int) -> None:
        """Raise PoolExhaustedError if `tokens` could never fit in the pool, even alone."""
        need = self._manager.blocks_for(tokens)
        if need > self.pool.total_blocks:
            raise PoolExhaustedError(
                need, self.pool.num_free, f"the pool holds {self.pool.total_blocks} blocks in all"
            )

    def _refuse_oversized(self, req: _Request, agent: AgentContext, prompt, messages) -> None:
        """Refuse, before tokenizing, text that cannot fit in the pool whatever it encodes
        to (see `PromptEncoder.fewest`): tokenizing megabytes only to refuse them would
        keep a core busy for seconds."""
        req.fewest = self._encoder.fewest(prompt, messages)
        base = self._projected_len(agent, before=req.uid) if messages is None else 0
        self._require_room(base + req.fewest + req.max_tokens)

    def _projected_len(self, agent: AgentContext, before: int) -> int:
        """Longest the agent's context can be once its turns queued before uid `before`
        have run (a turn still tokenizing counts its lower bound)."""
        n = len(agent.tokens)
        queued = ([agent.active] if agent.active is not None else []) + list(agent.pending)
        for uid in queued:
            if uid >= before:
                break
            r = self._requests[uid]
            if r.new_tokens is not None:
                n += len(r.new_tokens)
            elif r.full_tokens is not None:
                n = len(r.full_tokens)
            else:  # still tokenizing
                n = r.fewest if r.chat else n + r.fewest
            n += r.max_tokens
        return n

    # -- admission -------------------------------------------------------------------------

    def _admit_waiting(self, events: list[StepEvent]) -> None:
        for uid in list(self._waiting):
            if len(self._active) >= self._max_active:
                return
            req = self._requests[uid]
            agent = self._agents[req.agent_id]
            if agent.busy or agent.pending[0] != uid:
                continue
            try:
                admitted = self._admit(req, agent, events)
            except Exception as exc:  # a bug or an unforeseen store fault: this turn fails alone
                log.exception("agent %r: admission failed", agent.agent_id)
                self._abandon(req, agent, exc, events)
                continue
            if not admitted:
                return  # keep FIFO order: later turns wait behind this one

    def _abandon(self, req: _Request, agent: AgentContext, exc: Exception, events) -> None:
        """Fail a turn whose admission raised; the agent keeps its committed context and
        recomputes whatever cache it lost."""
        if req.uid in self._waiting:
            self._waiting.remove(req.uid)
        if req.uid in agent.pending:
            agent.pending.remove(req.uid)
        self._release(req, agent)
        if not agent.held_blocks():  # a half-done restore: start from the tokens next time
            agent.cached_len, agent.restored_full, agent.restored = 0, None, 0
            agent.windows, agent.states = {}, {}
        events.append(self._fail(req, exc))

    def _admit(self, req: _Request, agent: AgentContext, events: list[StepEvent]) -> bool:
        if req.first_tokens is not None and not agent.tokens:
            # The turns queued before it left nothing: encoded as the first turn is.
            req.new_tokens = req.first_tokens
        req.first_tokens = None
        full = req.full_tokens if req.full_tokens is not None else agent.tokens + req.new_tokens
        tic = time.perf_counter()
        if agent.cached_len == 0 and agent.in_store:
            self._restore(agent)
        req.restore_ms = (time.perf_counter() - tic) * 1e3
        adm = self._reserve(req, agent, full, events)
        if adm is None:
            return req.uid not in self._waiting  # failed (finished) -> go on; waiting -> stop
        self._waiting.remove(req.uid)
        agent.pending.popleft()
        agent.active = req.uid
        req.admission = adm
        req.admitted = time.perf_counter()
        self._clock += 1
        agent.last_used = self._clock
        caches = self._rebuild(req, agent, adm)
        try:
            self._insert(req, adm, caches)
        except Exception as exc:  # a broken request must not take the engine down
            self._release(req, agent)
            events.append(self._fail(req, exc))
        return True

    def _reserve(self, req, agent, full, events) -> Admission | None:
        """Reserve pool room, dropping idle agents' caches (LRU) when short."""
        while True:
            try:
                return self._manager.admit(agent, full, req.max_tokens)
            except PoolExhaustedError as exc:
                victim = self._lru_idle_agent(exclude=agent)
                if victim is not None:
                    self._drop_cache(victim)
                elif self._active:
                    return None  # running turns will give blocks back
                elif agent.cached_len:
                    self._drop_cache(agent)
                else:
                    self._waiting.remove(req.uid)
                    agent.pending.popleft()
                    events.append(self._fail(req, exc))
                    return None

    def _restore(self, agent: AgentContext) -> None:
        """Bring an agent's stored cache into the pool (once; later turns use memory)."""
        # Its last turn may still be queued: wait for it, so that the files exist.
        stored = self.store.agent(agent.agent_id, self.spec.fingerprint, wait=True)
        agent.in_store = False
        if stored is None or stored.tokens != agent.tokens:
            return
        agent.restored = persistence.restore(self.spec, self.pool, self.store, agent, stored)
        if agent.restored:
            self.counters["restored_agents"] += 1
            self.counters["restored_tokens"] += agent.restored

    def _lru_idle_agent(self, exclude: AgentContext) -> AgentContext | None:
        """The idle agent whose cache to drop: one already safe on disk first, then LRU."""
        idle = [
            a for a in self._agents.values() if a is not exclude and not a.busy and a.held_blocks()
        ]
        settled = self.store.is_settled if self.store is not None else lambda _: False
        return min(idle, key=lambda a: (not settled(a.agent_id), a.last_used), default=None)

    def _drop_cache(self, agent: AgentContext) -> None:
        released = self._manager.drop(agent)
        agent.in_store = self.store is not None  # its last turn was queued for writing
        self.counters["dropped_caches"] += 1
        log.info(
            "dropped cache of agent %r (%d blocks); it will be recomputed", agent.agent_id, released
        )

    def _rebuild(self, req: _Request, agent: AgentContext, adm: Admission) -> list | None:
        tic = time.perf_counter()
        try:
            caches = self._manager.rebuild(agent, adm)
        except CacheReconstructionError as exc:
            log.warning("agent %r: %s; recomputing its context", agent.agent_id, exc)
            self._manager.fall_back_to_prefill(adm)
            caches = None
        req.restore_ms += (time.perf_counter() - tic) * 1e3
        adm.restored = min(agent.restored, adm.cached_len) if adm.own_cache else 0
        agent.restored = 0
        return caches

    def _insert(self, req: _Request, adm: Admission, caches: list | None) -> None:
        n = adm.cached_len
        sampler = make_request_sampler(req.params, lambda exc: _mark_failed(req, exc))
        (req.batch_uid,) = self._gen.insert(
            [adm.full_tokens[n:]],
            max_tokens=[req.max_tokens],
            caches=[caches],
            all_tokens=[adm.full_tokens[:n]],
            samplers=[sampler],
            logits_processors=[[_guarded(req, p) for p in req.processors]],
        )
        req.detok = self.tokenizer.detokenizer
        self._active[req.batch_uid] = req

    # -- running ---------------------------------------------------------------------------

    def _run_batch(self, events: list[StepEvent]) -> None:
        prefilling = [q for q in self._active.values() if not q.first_token]
        tic = time.perf_counter()
        try:
            _, responses = self._gen.next()
        except Exception as exc:  # the whole batch step failed: fail its requests, go on
            log.exception("batch step failed; failing %d running request(s)", len(self._active))
            self._fail_all_active(exc, events)
            return
        step_ms = (time.perf_counter() - tic) * 1e3
        for q in prefilling:  # a step before a request's first token prefilled it
            q.prefill_ms += step_ms
        for r in responses:
            req = self._active.get(r.uid)
            if req is not None:
                events.append(self._on_token(req, r))
        for req in [q for q in self._active.values() if q.failure is not None]:
            self._gen.remove([req.batch_uid])
            self._release(req, self._agents[req.agent_id])
            events.append(self._fail(req, req.failure))

    def _on_token(self, req: _Request, r) -> StepEvent:
        if not req.first_token:
            req.first_token = time.perf_counter()
        token = r.token
        hit_eos = r.finish_reason == "stop" and token in self._eos
        delta = ""
        if not hit_eos:
            req.generated.append(token)
            req.detok.add_token(token)
            delta = req.detok.last_segment
        if r.finish_reason is not None and req.failure is None:
            req.detok.finalize()
            delta += req.detok.last_segment
        delta, stopped = _apply_stop(req, delta, final=r.finish_reason is not None)
        req.text.append(delta)
        shown = None if hit_eos else token
        if req.failure is not None or not (stopped or r.finish_reason):
            return StepEvent(req.uid, req.agent_id, token, delta)
        if r.finish_reason is not None:
            reason = "stop" if stopped else r.finish_reason
            return self._complete(req, list(r.all_tokens), r.prompt_cache, reason, shown, delta)
        # A stop string mid-generation: take the sequence out with its cache.
        caches, tokens = self._gen.remove([req.batch_uid], return_prompt_caches=True)[req.batch_uid]
        return self._complete(req, list(tokens), caches, "stop", shown, delta)

    def _complete(self, req: _Request, tokens, caches, reason, token, delta) -> StepEvent:
        agent = self._agents[req.agent_id]
        adm = req.admission
        del self._active[req.batch_uid]
        agent.active = None
        try:
            self._manager.commit(agent, adm, tokens, caches)
        except AgentKVError as exc:
            log.warning("agent %r: could not keep this turn's cache: %s", agent.agent_id, exc)
            return self._fail(req, exc)
        self._clock += 1
        agent.last_used = self._clock
        agent.last_turn = time.time()
        self._write_back(agent)
        self.counters["completed"] += 1
        completion = self._finish(req, reason)
        completion.usage.generated_tokens = len(tokens) - len(adm.full_tokens)
        completion.context_token_ids = list(tokens[len(adm.full_tokens) :])
        return StepEvent(req.uid, req.agent_id, token, delta, completion)

    def _resave_unsaved(self) -> None:
        """Before closing: every agent whose latest write failed (disk full, ...) is queued
        once more, so a clean stop after a failed write does not lose the turn (the agent's
        next turn would have rewritten it). A second failure is logged by the store."""
        if self.store is None:
            return
        with contextlib.suppress(StoreWriteError):  # reported by flush() already, or logged
            self.store.flush()  # every write settled: `unsaved` is current
        for agent in self._agents.values():
            if self.store.unsaved(agent.agent_id, self.spec.fingerprint) is not None:
                log.warning("agent %r: its last write failed; writing it again", agent.agent_id)
                self._write_back(agent)

    def _write_back(self, agent: AgentContext) -> None:
        if self.store is None:
            return
        agent.saved = False
        try:
            record = persistence.turn_record(self.spec, self.store, agent, self._layout)
            self.store.save_turn(record)
            agent.disk_blocks = len(record.blocks)
            agent.saved = True
        except Exception as exc:  # the turn is done and kept in memory either way
            log.error("agent %r: write-back not queued: %s", agent.agent_id, exc)

    def _fail_all_active(self, exc: Exception, events: list[StepEvent]) -> None:
        for req in list(self._active.values()):
            self._release(req, self._agents[req.agent_id])
            events.append(self._fail(req, exc))
        self._gen.close()
        self._gen = self._new_generator()

    # -- finishing -------------------------------------------------------------------------

    def _release(self, req: _Request, agent: AgentContext) -> None:
        """Give back a running request's admission; the agent keeps its previous state."""
        if req.admission is not None:
            self._manager.abort(req.admission)
        self._active.pop(req.batch_uid, None)
        agent.active = None

    def _fail(self, req: _Request, exc: Exception) -> StepEvent:
        """Finish a request with finish_reason "error"; its event carries the completion."""
        self.counters["errors"] += 1
        completion = self._finish(req, "error")
        completion.error = str(exc) or type(exc).__name__
        completion.error_code = getattr(exc, "code", "internal")
        return StepEvent(req.uid, req.agent_id, None, "", completion)

    def _finish(self, req: _Request, reason: str) -> Completion:
        """Build the request's completion and forget the request."""
        self._requests.pop(req.uid, None)
        adm = req.admission
        usage = Usage(
            prompt_tokens=len(adm.full_tokens) if adm else 0,
            cached_tokens=adm.cached_len if adm else 0,
            generated_tokens=len(req.generated),
            restored_tokens=adm.restored if adm else 0,
            recomputed_tokens=adm.recomputed if adm else 0,
            queue_ms=_ms(req.submitted, req.admitted),
            restore_ms=round(req.restore_ms, 3),
            prefill_ms=round(req.prefill_ms, 3),
            ttft_ms=_ms(req.submitted, req.first_token),
            total_ms=_ms(req.submitted, time.perf_counter()),
        )
        text = "".join(req.text)
        return Completion(req.uid, req.agent_id, text, list(req.generated), reason, usage)

    # -- misc ------------------------------------------------------------------------------

    def _new_generator(self) -> BatchGenerator:
        return BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in sorted(self._eos)] or None,
            **self._batch_opts,
        )

    def _agent(self, agent_id: str) -> AgentContext:
        self._check_open()
        agent = self._agents.get(agent_id)
        if agent is None and isinstance(agent_id, str):
            agent = self._stored_agent(agent_id)
            if agent is not None:
                self._agents[agent_id] = agent
        if agent is None:
            raise UnknownAgentError(f"unknown agent {agent_id!r}")
        return agent

    def _peek(self, agent_id: str) -> AgentContext:
        """Like `_agent`, but an agent only on disk is read, not brought into memory."""
        self._check_open()
        agent = self._agents.get(agent_id)
        if agent is None and isinstance(agent_id, str):
            agent = self._stored_agent(agent_id)
        if agent is None:
            raise UnknownAgentError(f"unknown agent {agent_id!r}")
        return agent

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("engine is closed")

    def _check_thread(self) -> None:
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        elif self._owner != me:
            raise RuntimeError("the engine must be used from one thread (the one that owns MLX)")


def _mark_failed(req: _Request, exc: Exception) -> None:
    if req.failure is None:
        req.failure = exc


def _guarded(req: _Request, processor: LogitsProcessor) -> LogitsProcessor:
    """A logits processor whose failure fails its own request only."""

    def run(tokens, logits):
        if req.failure is not None:
            return logits
        try:
            return processor(tokens, logits)
        except Exception as exc:
            _mark_failed(req, exc)
            return logits

    return run


def _apply_stop(req: _Request, delta: str, *, final: bool) -> tuple[str, bool]:
    """Text to show now, and whether a stop string ended the turn.

    Text that could be the start of a stop string is held back, so no streamed delta ever
    shows part of one.
    """
    if not req.stop:
        return delta, False
    text = req.held + delta
    hits = [i for i in (text.find(s) for s in req.stop) if i >= 0]
    if hits:
        req.held = ""
        return text[: min(hits)], True
    if final:
        req.held = ""
        return text, False
    keep = max((k for s in req.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    req.held = text[len(text) - keep :]
    return text[: len(text) - keep], False


def _check_processors(processors) -> list:
    if processors is None:
        return []
    if isinstance(processors, (str, bytes)) or not isinstance(processors, Sequence):
        raise InvalidRequestError("logits_processors must be a list of callables")
    if not all(callable(p) for p in processors):
        raise InvalidRequestError("every logits processor must be callable")
    return list(processors)


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1e3, 3) if start and end else 0.0
