"""The engine's scheduler: turns' queues, admission into the batch, and the step loop.

Every turn carries a `RequestStatus`: ENCODING (tokenizing on the encoder's thread),
WAITING (behind its agent's earlier turns, in submit order across agents), RUNNING (in
the batch, its pool room reserved: `BatchRunner`), FINISHED. A step collects tokenized
inputs, admits waiting turns while the batch has room (the first turn that cannot get
its pool room now stops admission: FIFO), and runs one batch step. Engine thread only.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import replace

from ..errors import CacheReconstructionError, PoolExhaustedError
from . import outputs
from .agent_registry import AgentRegistry
from .agents import AgentContext
from .batch_runner import BatchRunner
from .intake import Intake
from .kv_cache_manager import Admission, KVCacheManager
from .requests import StepEvent
from .turns import Request, RequestStatus, TurnTable

log = logging.getLogger("agentkv.engine")

ENCODING = RequestStatus.ENCODING
WAITING = RequestStatus.WAITING
RUNNING = RequestStatus.RUNNING


class Scheduler:
    """Queues, admission and the step loop of `BlockPoolBatchEngine`.

    Args:
        registry: the agents.
        manager: the cache manager.
        turns: every unfinished turn by uid.
        intake: sets turns' inputs (tokenizing results are collected here).
        runner: the batch admitted turns run in.

    Attributes:
        next_uid: the uid of the next turn.
    """

    def __init__(
        self,
        registry: AgentRegistry,
        manager: KVCacheManager,
        turns: TurnTable,
        intake: Intake,
        runner: BatchRunner,
    ) -> None:
        self.next_uid = 0
        self._registry = registry
        self._manager = manager
        self._turns = turns
        self._intake = intake
        self._runner = runner
        self._waiting: deque[int] = deque()  # WAITING uids in submit order
        self._encoding: dict[int, Request] = {}  # ENCODING turns by uid
        self._events: list[StepEvent] = []  # events of cancels, returned by the next step

    # -- queues ----------------------------------------------------------------------------

    def enqueue(self, req: Request, agent: AgentContext) -> None:
        """Queue an accepted turn (its uid is `next_uid`) behind its agent's earlier ones."""
        self.next_uid = req.uid + 1
        agent.pending.append(req.uid)
        self._turns.add(req)
        if req.job is None:
            req.status = WAITING
            self._waiting.append(req.uid)
        else:
            req.status = ENCODING
            self._encoding[req.uid] = req

    @property
    def has_work(self) -> bool:
        """Turns are tokenized, wait, run, or have events not yet returned."""
        return bool(self._encoding or self._waiting or self._runner or self._events)

    @property
    def can_step(self) -> bool:
        """A step could make progress now (not only waiting for tokenizing)."""
        if self._waiting or self._runner or self._events:
            return True
        return any(r.job.done.is_set() for r in self._encoding.values())

    def wait_for_encoding(self, timeout: float) -> None:
        """Wait up to `timeout` s for the oldest tokenizing job."""
        if self._encoding:
            next(iter(self._encoding.values())).job.done.wait(timeout)

    def status(self, uid: int) -> RequestStatus | None:
        """The turn's status, None when it is unknown or finished."""
        req = self._turns.get(uid)
        return None if req is None else req.status

    def counts(self) -> dict[str, int]:
        """Turns waiting and running now."""
        return {"waiting": len(self._waiting), "active": len(self._runner)}

    def cancel(self, uid: int) -> bool:
        """Cancel a turn; its completion comes out of the next step. False if unknown."""
        req = self._turns.get(uid)
        if req is None:
            return False
        agent = self._registry.agents[req.agent_id]
        if req.status is ENCODING:
            req.job.cancelled = True  # skipped if not started; its result is dropped
            del self._encoding[uid]
            agent.pending.remove(uid)
        elif req.status is WAITING:
            self._dequeue(req, agent)
        else:
            self._runner.remove(req, agent)
        self._turns.end(req, "cancelled")
        self._events.append(outputs.last_event(req, outputs.completion(req, "cancelled")))
        return True

    def cancel_all(self) -> None:
        """Cancel every unfinished turn."""
        for uid in list(self._turns):
            self.cancel(uid)

    def close(self) -> None:
        """Stop the batch generator and the encoder's thread."""
        self._runner.close()
        self._intake.close()

    # -- the step --------------------------------------------------------------------------

    def take_events(self) -> list[StepEvent]:
        """The events of cancels since the last step (returned by the next step)."""
        events, self._events = self._events, []
        return events

    def step(self) -> list[StepEvent]:
        """Collect tokenized inputs, admit waiting turns, run one batch step."""
        events = self.take_events()
        if self._encoding:
            self._collect_encoded(events)
        self._admit_waiting(events)
        if self._runner:
            self._runner.step(events)
        return events

    def _collect_encoded(self, events: list[StepEvent]) -> None:
        """Turns whose input the worker finished tokenizing join the waiting queue (their
        agent's order is kept by `agent.pending`), or fail if it could not be used."""
        for uid, req in list(self._encoding.items()):
            job = req.job
            if not job.done.is_set():
                continue
            del self._encoding[uid]
            req.job = None
            agent = self._registry.agents[req.agent_id]
            try:
                self._intake.take_job(req, job, agent)
            except Exception as exc:  # the request's own fault (or its template's)
                agent.pending.remove(uid)
                events.append(self._turns.fail(req, exc))
                continue
            req.status = WAITING
            self._waiting.append(uid)

    # -- admission -------------------------------------------------------------------------

    def _admit_waiting(self, events: list[StepEvent]) -> None:
        for uid in list(self._waiting):
            if len(self._runner) >= self._runner.max_active:
                return
            req = self._turns[uid]
            agent = self._registry.agents[req.agent_id]
            if agent.busy or agent.pending[0] != uid:
                continue
            full = self._context(req, agent)
            if self._follows_leader(agent, full):
                continue  # a running turn is computing its prefix: share it, soon
            try:
                adm = self._admission(req, agent, full)
            except PoolExhaustedError as exc:  # it could never fit, even alone: it fails
                self._abandon(req, agent, exc, events)
                continue
            except Exception as exc:  # a bug or an unforeseen store fault: this turn fails alone
                log.exception("agent %r: admission failed", agent.agent_id)
                self._abandon(req, agent, exc, events)
                continue
            if adm is None:
                return  # not now: keep FIFO order, later turns wait behind this one
            self._start(req, agent, adm, events)

    def _context(self, req: Request, agent: AgentContext) -> list[int]:
        """The whole context the turn generates after (its agent's turns before it done)."""
        if req.first_tokens is not None and not agent.tokens:
            # The turns queued before it left nothing: encoded as the first turn is.
            req.new_tokens = req.first_tokens
        req.first_tokens = None
        if req.full_tokens is not None:
            return req.full_tokens
        return [*agent.tokens, *req.new_tokens]

    def _follows_leader(self, agent: AgentContext, full: list[int]) -> bool:
        """True when a running turn is prefilling the first block of `full` that is not
        pooled (`prefix_sharing`): this turn waits and shares it. Only a context with no
        cache of its own (nor one in the store) looks for shared blocks."""
        if agent.cache.cached_len or agent.in_store or not self._runner.leaders:
            return False
        leader = self._runner.leaders.leader_for(full)
        if leader is None:
            return False
        leader.followed = True
        return True

    def _admission(self, req: Request, agent: AgentContext, full: list[int]) -> Admission | None:
        """The turn's admission, or None while running turns hold the room it needs.

        Raises:
            PoolExhaustedError: it cannot fit even with every idle cache dropped.
        """
        tic = time.perf_counter()
        if agent.cache.cached_len == 0 and agent.in_store:
            self._registry.restore(agent)
        req.restore_ms = (time.perf_counter() - tic) * 1e3
        while (adm := self._manager.admit(agent, full, req.max_tokens)) is None:
            # Short of room: drop idle agents' caches (LRU), then its own, else wait.
            victim = self._registry.lru_idle_agent(exclude=agent)
            if victim is None and self._runner:
                return None  # running turns will give blocks back
            if victim is None and not agent.cache.cached_len:
                raise self._manager.refusal(agent, full, req.max_tokens)
            self._registry.drop_cache(victim or agent)
        return adm

    def _start(self, req: Request, agent: AgentContext, adm: Admission, events) -> None:
        """Move an admitted turn into the batch (its prefix rebuilt from the cache)."""
        self._dequeue(req, agent)
        req.status = RUNNING
        agent.active = req.uid
        req.admission = adm
        req.admitted = time.perf_counter()
        self._registry.touch(agent)
        try:
            caches = self._rebuild(req, agent, adm)
        except Exception as exc:  # a bug: this turn fails alone
            log.exception("agent %r: admission failed", agent.agent_id)
            self._abandon(req, agent, exc, events)
            return
        try:
            self._runner.insert(req, adm, caches)
        except Exception as exc:  # a broken request must not take the engine down
            self._runner.release(req, agent)
            events.append(self._turns.fail(req, exc))

    def _dequeue(self, req: Request, agent: AgentContext) -> None:
        self._waiting.remove(req.uid)
        agent.pending.remove(req.uid)

    def _abandon(self, req: Request, agent: AgentContext, exc: Exception, events) -> None:
        """Fail a turn whose admission raised; the agent keeps its committed context and
        recomputes whatever cache it lost."""
        if req.status is WAITING:
            self._dequeue(req, agent)
        self._runner.release(req, agent)
        if not agent.held_blocks():  # a half-done restore: start from the tokens next time
            agent.cache = agent.cache.without_cache()
        events.append(self._turns.fail(req, exc))

    def _rebuild(self, req: Request, agent: AgentContext, adm: Admission) -> list | None:
        tic = time.perf_counter()
        try:
            caches = self._manager.rebuild(agent, adm)
        except CacheReconstructionError as exc:
            log.warning("agent %r: %s; recomputing its context", agent.agent_id, exc)
            self._manager.fall_back_to_prefill(adm)
            caches = None
        req.restore_ms += (time.perf_counter() - tic) * 1e3
        restored = agent.cache.restored
        adm.restored = min(restored, adm.cached_len) if adm.own_cache else 0
        if restored:  # reported by this turn only
            agent.cache = replace(agent.cache, restored=0)
        return caches
