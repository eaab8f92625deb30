"""Running one HTTP request's turn through the daemon: which agent it belongs to, the
turn itself (whole or as events), and the ephemeral agent of a request that names none."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from agentkv.client import AgentKVClientError, AsyncClient, Event, Result

from . import fields
from .errors import ApiError, from_client_error

AGENT_HEADER = "x-agent-id"
EPHEMERAL_PREFIX = "http-tmp-"


@dataclass(slots=True)
class TurnInput:
    """One request's turn: its agent (None: an ephemeral one), its input and options."""

    agent_id: str | None
    prompt: str | None = None
    messages: list[dict] | None = None
    options: dict = field(default_factory=dict)
    tools: list[dict] | None = None  # for the chat template (the model has a tool parser)


def agent_of(headers: Mapping[str, str], body: dict, user_field: str | None) -> str | None:
    """The request's agent: the X-Agent-Id header wins, then the body's `user_field` (OpenAI's
    `user`), then `metadata.agent_id`; None when none is given."""
    if headers.get(AGENT_HEADER):
        return fields.agent_id(headers[AGENT_HEADER], "X-Agent-Id")
    if user_field and body.get(user_field) is not None:
        return fields.agent_id(body[user_field], user_field)
    agent = fields.mapping(body, "metadata").get("agent_id")
    return None if agent is None else fields.agent_id(agent, "metadata.agent_id")


class Turns:
    """Runs turns for the handlers over one AsyncClient, and collects ephemeral agents."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._cleanups: set[asyncio.Task] = set()

    async def info(self) -> dict:
        """The daemon's `hello` facts (model, ...)."""
        try:
            await self.client.connect()
        except AgentKVClientError as exc:
            raise from_client_error(exc) from None
        return self.client.info

    async def generate(self, turn: TurnInput) -> tuple[str, Result]:
        """Run a turn to its end; returns its agent id and result."""
        agent = turn.agent_id or _ephemeral()
        try:
            result = await self.client.generate(
                agent, turn.prompt, messages=turn.messages, **_options(turn)
            )
        except AgentKVClientError as exc:
            raise from_client_error(exc) from None
        finally:
            if turn.agent_id is None:
                self._forget(agent)
        if result.finish_reason == "cancelled":
            raise ApiError(503, "the turn was cancelled (the daemon is stopping)", code="cancelled")
        return agent, result

    async def stream(self, turn: TurnInput) -> tuple[str, AsyncIterator[Event]]:
        """Start a turn and return its agent id and its events. Refusals of the turn raise
        ApiError here, before any byte of the response is sent; the events' iterator
        cancels the turn if it is left early (the HTTP client went away)."""
        agent = turn.agent_id or _ephemeral()
        events = self.client.stream_events(
            agent, turn.prompt, messages=turn.messages, **_options(turn)
        )
        try:
            first = await anext(events)
            failed = event_error(first) if first.finished and not first.token_ids else None
            if failed is not None:  # it failed before any output: a status, not a stream
                raise failed
        except (AgentKVClientError, ApiError) as exc:
            await events.aclose()
            if turn.agent_id is None:
                self._forget(agent)
            if isinstance(exc, ApiError):
                raise
            raise from_client_error(exc) from None

        async def rest() -> AsyncIterator[Event]:
            try:
                yield first
                async for event in events:
                    yield event
            finally:
                await events.aclose()
                if turn.agent_id is None:
                    self._forget(agent)

        return agent, rest()

    def _forget(self, agent: str) -> None:
        """Delete an ephemeral agent in the background (even when the request's own task
        is being cancelled)."""
        task = asyncio.get_running_loop().create_task(self._delete(agent))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _delete(self, agent: str) -> None:
        with contextlib.suppress(AgentKVClientError):
            await self.client.delete(agent)


def event_error(event: Event) -> ApiError | None:
    """The error a finished event stands for (a failed or cancelled turn), if any."""
    if event.finish_reason == "error":
        err = event.error or {}
        status = 503 if err.get("code") == "unavailable" else 500  # the daemon did not answer
        return ApiError(status, f"generation failed: {err.get('message')}", code=err.get("code"))
    if event.finish_reason == "cancelled":
        return ApiError(503, "the turn was cancelled (the daemon is stopping)", code="cancelled")
    return None


def _options(turn: TurnInput) -> dict:
    return turn.options if turn.tools is None else {**turn.options, "tools": turn.tools}


def _ephemeral() -> str:
    return EPHEMERAL_PREFIX + secrets.token_hex(8)
