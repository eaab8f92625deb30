"""The turns in the batch: one mlx-lm BatchGenerator, their tokens out, and each finished
sequence's cache committed as its agent's.

A batch step's failure fails the turns in it (a new generator takes over); a sampler's or
logits processor's failure fails its own turn only. Engine thread only.
"""

from __future__ import annotations

import logging
import time

from mlx_lm.generate import BatchGenerator

from ..errors import AgentKVError
from . import outputs
from .agent_registry import AgentRegistry
from .agents import AgentContext
from .kv_cache_manager import Admission, KVCacheManager
from .outputs import TokenOutput
from .prefix_sharing import PrefixLeaders
from .requests import StepEvent
from .sampling import make_request_sampler
from .turns import LogitsProcessor, Request, TurnTable

log = logging.getLogger("agentkv.engine")


class BatchRunner:
    """Runs admitted turns through the batch (see the module docstring).

    Args:
        model: the mlx-lm model.
        tokenizer: its TokenizerWrapper.
        registry: the agents (a finished turn's agent is marked used and written back).
        manager: the cache manager (commits, or gives back admissions).
        turns: the unfinished turns (where each ends).
        batch_opts: BatchGenerator's batch sizes and prefill step.

    Attributes:
        leaders: the turns whose prefill computes blocks a waiting turn could share.
    """

    def __init__(
        self,
        model,
        tokenizer,
        registry: AgentRegistry,
        manager: KVCacheManager,
        turns: TurnTable,
        batch_opts: dict[str, int],
    ) -> None:
        self.max_active = batch_opts["completion_batch_size"]
        self._model = model
        self._tokenizer = tokenizer
        self._registry = registry
        self._manager = manager
        self._turns = turns
        self._batch_opts = batch_opts
        self._eos = frozenset(tokenizer.eos_token_ids)
        self._gen = self._new_generator()
        self._active: dict[int, Request] = {}  # RUNNING turns by batch uid
        self.leaders = PrefixLeaders(manager)

    def __len__(self) -> int:
        """Turns in the batch."""
        return len(self._active)

    def insert(self, req: Request, adm: Admission, caches: list | None) -> None:
        """Put an admitted turn in the batch: its prefix's caches, the rest to prefill."""
        n = adm.cached_len
        sampler = make_request_sampler(req.params, req.mark_failed)
        (req.batch_uid,) = self._gen.insert(
            [adm.full_tokens[n:]],
            max_tokens=[req.max_tokens],
            caches=[caches],
            all_tokens=[adm.full_tokens[:n]],
            samplers=[sampler],
            logits_processors=[[_guarded(req, p) for p in req.processors]],
        )
        req.detok = self._tokenizer.detokenizer
        self._active[req.batch_uid] = req
        self.leaders.add(req)

    def remove(self, req: Request, agent: AgentContext) -> None:
        """Take a turn out of the batch (cancelled); the agent keeps its previous state."""
        self._gen.remove([req.batch_uid])
        self.release(req, agent)

    def release(self, req: Request, agent: AgentContext) -> None:
        """Give back a turn's admission; the agent keeps its previous state."""
        if req.admission is not None:
            self._manager.abort(req.admission)
        self.leaders.drop(req)
        self._active.pop(req.batch_uid, None)
        agent.active = None

    def step(self, events: list[StepEvent]) -> None:
        """One batch step: a token event per decoding turn; finished turns committed."""
        prefilling = [q for q in self._active.values() if not q.first_token]
        tic = time.perf_counter()
        try:
            _, responses = self._gen.next()
        except Exception as exc:  # the whole batch step failed: fail its requests, go on
            log.exception("batch step failed; failing %d running request(s)", len(self._active))
            self._fail_all(exc, events)
            return
        step_ms = (time.perf_counter() - tic) * 1e3
        for q in prefilling:  # a step before a request's first token prefilled it
            q.prefill_ms += step_ms
        for r in responses:
            req = self._active.get(r.uid)
            if req is not None:
                events.append(self._on_token(req, r))
        for req in [q for q in self._active.values() if q.failure is not None]:
            self.remove(req, self._registry.agents[req.agent_id])
            events.append(self._turns.fail(req, req.failure))

    def close(self) -> None:
        """Stop the batch generator."""
        self._gen.close()

    # -- internals -------------------------------------------------------------------------

    def _on_token(self, req: Request, r) -> StepEvent:
        if not req.first_token:
            req.first_token = time.perf_counter()
            self._prefilled(req, finishing=r.finish_reason is not None)
        out = outputs.take_token(req, r.token, r.finish_reason, self._eos)
        if req.failure is not None or not (out.stopped or r.finish_reason):
            return StepEvent(req.uid, req.agent_id, r.token, out.delta)
        if r.finish_reason is not None:
            reason = "stop" if out.stopped else r.finish_reason
            return self._complete(req, list(r.all_tokens), r.prompt_cache, reason, out)
        # A stop string mid-generation: take the sequence out with its cache.
        caches, tokens = self._gen.remove([req.batch_uid], return_prompt_caches=True)[req.batch_uid]
        return self._complete(req, list(tokens), caches, "stop", out)

    def _prefilled(self, req: Request, finishing: bool) -> None:
        """A turn's prefill is done: pool its prompt's blocks now if a waiting turn wants
        them (and it is not finishing anyway: its commit pools them then)."""
        self.leaders.drop(req)
        if not req.followed or finishing:
            return
        ((caches, _),) = self._gen.extract_cache([req.batch_uid]).values()
        n = self._manager.publish(req.admission, caches)
        log.debug("agent %r: %d prompt block(s) shared at its first token", req.agent_id, n)

    def _complete(self, req: Request, tokens, caches, reason, out: TokenOutput) -> StepEvent:
        """A finished sequence: its cache becomes the agent's, written back."""
        agent = self._registry.agents[req.agent_id]
        del self._active[req.batch_uid]
        self.leaders.drop(req)
        agent.active = None
        try:
            self._manager.commit(agent, req.admission, tokens, caches)
        except AgentKVError as exc:
            log.warning("agent %r: could not keep this turn's cache: %s", agent.agent_id, exc)
            self._manager.abort(req.admission)  # what commit had not given back yet
            return self._turns.fail(req, exc)
        self._registry.committed(agent)
        self._turns.end(req, "completed")
        done = outputs.committed_completion(req, reason, tokens)
        return outputs.last_event(req, done, out.shown, out.delta)

    def _fail_all(self, exc: Exception, events: list[StepEvent]) -> None:
        for req in list(self._active.values()):
            self.release(req, self._registry.agents[req.agent_id])
            events.append(self._turns.fail(req, exc))
        self._gen.close()
        self._gen = self._new_generator()

    def _new_generator(self) -> BatchGenerator:
        return BatchGenerator(
            self._model,
            stop_tokens=[[t] for t in sorted(self._eos)] or None,
            **self._batch_opts,
        )


def _guarded(req: Request, processor: LogitsProcessor) -> LogitsProcessor:
    """A logits processor whose failure fails its own request only."""

    def run(tokens, logits):
        if req.failure is not None:
            return logits
        try:
            return processor(tokens, logits)
        except Exception as exc:
            req.mark_failed(exc)
            return logits

    return run
