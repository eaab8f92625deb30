"""A turn's input: prompt text or ids, a chat, or a whole conversation, made token ids.

Small text is tokenized on the engine thread at submit; large text and chats on the
encoder's worker thread (the turn keeps its place meanwhile). A turn that could never fit
in the pool, even alone, is refused from its size, before tokenizing when the size alone
says so.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from agentkv.client.protocol import ProtocolError, check_tools

from ..errors import InvalidRequestError, PoolExhaustedError
from .agents import AgentContext
from .block_pool import BlockPool
from .kv_cache_manager import KVCacheManager
from .prompts import EncodeJob, PromptEncoder, check_messages, check_text, check_tokens
from .tool_calls import ToolParser
from .turns import Request, TurnTable


class Intake:
    """Sets each turn's input tokens (engine thread; tokenizing may run on a worker).

    Args:
        tokenizer: the model's TokenizerWrapper.
        vocab_size: token ids must be below it (0: not checked).
        pool: the block pool (its size bounds a turn).
        manager: the cache manager (blocks per token count).
        requests: the engine's unfinished turns (read: a turn's queued predecessors
            bound how long the context can get).
    """

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        pool: BlockPool,
        manager: KVCacheManager,
        requests: TurnTable,
    ) -> None:
        self.tokenizer = tokenizer
        self.encoder = PromptEncoder(tokenizer)
        self.tool_parser = ToolParser.of(tokenizer)
        self._vocab = vocab_size
        self._pool = pool
        self._manager = manager
        self._requests = requests

    def set_input(
        self, req: Request, agent: AgentContext, prompt, messages, conversation, tools=None
    ) -> None:
        """Check and set the turn's input; large inputs start tokenizing (`req.job`).
        `tools` go with `messages`, to the chat template.

        Raises:
            InvalidRequestError: not exactly one input form, or a bad one; tools without
                messages, or for a template that does not take them.
            PoolExhaustedError: the turn could never fit in the pool.
        """
        given = [x is not None for x in (prompt, messages, conversation)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of prompt, messages or conversation")
        if tools is not None:
            self._set_tools(req, tools, chat=messages is not None)
        if conversation is not None:
            if isinstance(conversation, Sequence):  # too long: refused before it is checked
                self._require_room(len(conversation) + req.max_tokens)
            req.full_tokens = check_tokens(conversation, self._vocab, "conversation")
        elif messages is not None:
            self._refuse_oversized(req, agent, None, messages)  # first: one cheap pass
            messages = check_messages(self.tokenizer, messages)
            req.chat = True
            render = functools.partial(self.encoder.render, messages, req.tools)
            self._encode(req, render, messages=messages, tools=req.tools)
        elif isinstance(prompt, str):
            check_text(prompt)
            self._refuse_oversized(req, agent, prompt, None)
            self._encode_text(req, agent, prompt)
        else:
            if isinstance(prompt, Sequence):
                base = self._projected_len(agent, before=req.uid)
                self._require_room(base + len(prompt) + req.max_tokens)
            req.new_tokens = check_tokens(prompt, self._vocab, "prompt")

    def take_job(self, req: Request, job: EncodeJob, agent: AgentContext) -> None:
        """Take a finished tokenizing job's result as the turn's input.

        Raises:
            Exception: what tokenizing raised (a template's refusal, ...), or
                PoolExhaustedError when the tokens could never fit in the pool.
        """
        if job.error is not None:
            raise job.error
        self._take_encoded(req, job.result)
        self.check_fits(req, agent)

    def check_fits(self, req: Request, agent: AgentContext) -> None:
        """Refuse a turn that could never fit in the pool, even alone."""
        length = len(req.full_tokens) if req.new_tokens is None else len(req.new_tokens)
        if req.new_tokens is not None:
            length += self._projected_len(agent, before=req.uid)
        self._require_room(length + req.max_tokens)

    def close(self) -> None:
        """Stop the encoder's worker thread."""
        self.encoder.close()

    # -- internals -------------------------------------------------------------------------

    def _encode_text(self, req: Request, agent: AgentContext, prompt: str) -> None:
        first = not (agent.tokens or agent.pending or agent.busy)
        # Turns queued before it may yet leave nothing: then this is the first turn after all.
        maybe_first = not first and not agent.tokens

        def encode():
            ids = self.encoder.encode_turn(prompt, first_turn=first)
            alt = self.encoder.encode_turn(prompt, first_turn=True) if maybe_first else None
            return ids, alt

        self._encode(req, encode, prompt=prompt)

    def _set_tools(self, req: Request, tools, *, chat: bool) -> None:
        """Keep a turn's tools (for its template) and the model's tool parser (for its
        output)."""
        try:
            req.tools = check_tools(tools, chat=chat) or None  # no tools: as not given
        except ProtocolError as exc:
            raise InvalidRequestError(str(exc)) from None
        if req.tools is None:
            return
        if not self.encoder.takes_tools():
            raise InvalidRequestError("this model's chat template does not take tools")
        req.tool_parser = self.tool_parser

    def _encode(self, req: Request, encode, *, prompt=None, messages=None, tools=None) -> None:
        """Run `encode` now if the input is small, else on the encoder's worker thread."""
        if self.encoder.is_large(prompt, messages, tools):
            req.job = self.encoder.start(encode)
        else:
            self._take_encoded(req, encode())

    @staticmethod
    def _take_encoded(req: Request, result) -> None:
        if isinstance(result, tuple):  # a text prompt: its ids, and as a first turn
            req.new_tokens, req.first_tokens = result
        else:
            req.full_tokens = result

    def _require_room(self, tokens: int) -> None:
        """Raise PoolExhaustedError if `tokens` could never fit in the pool, even alone."""
        need = self._manager.blocks_for(tokens)
        pool = self._pool
        if need > pool.total_blocks:
            raise PoolExhaustedError(
                need, pool.num_free, f"the pool holds {pool.total_blocks} blocks in all"
            )

    def _refuse_oversized(self, req: Request, agent: AgentContext, prompt, messages) -> None:
        """Refuse, before tokenizing, text that cannot fit in the pool whatever it encodes
        to (see `PromptEncoder.fewest`): tokenizing megabytes only to refuse them would
        keep a core busy for seconds."""
        req.fewest = self.encoder.fewest(prompt, messages)
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
