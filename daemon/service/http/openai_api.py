"""OpenAI's API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

A request's agent is its X-Agent-Id header, else its `user` field, else its
`metadata.agent_id`; without one, the turn runs on an ephemeral agent deleted after it.
Chat requests send the whole conversation each time: the daemon renders it with the
model's chat template and reuses the longest common token prefix with the agent's context
(`usage.prompt_tokens_details.cached_tokens`). A completion's `prompt` is appended to its
agent's context (send only the new text when naming an agent).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from starlette.responses import JSONResponse, Response, StreamingResponse

from agentkv.client import Event, Result

from . import fields, tools
from .errors import ApiError
from .turns import TurnInput, Turns, agent_of, event_error

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sampling(body: dict) -> dict:
    """The sampling options of a chat or completion request, checked."""
    refuse_unsupported(body)
    max_tokens = fields.integer(body, "max_completion_tokens", low=1)
    if max_tokens is None:
        max_tokens = fields.integer(body, "max_tokens", low=1)
    options = {
        "max_tokens": max_tokens,
        "temperature": fields.number(body, "temperature", low=0.0, high=2.0),
        "top_p": fields.number(body, "top_p", low=0.0, high=1.0),
        "seed": fields.integer(body, "seed", low=-(2**63), high=2**63 - 1),
        "stop": fields.strings(body, "stop"),
    }
    return {k: v for k, v in options.items() if v is not None}


def refuse_unsupported(body: dict) -> None:
    """What the engine cannot do is refused, never silently ignored."""
    if fields.integer(body, "n", low=1, default=1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_value")
    if fields.integer(body, "best_of", low=1, default=1) != 1:
        raise ApiError(400, "only best_of=1 is supported", param="best_of")
    logprobs = body.get("logprobs")
    if logprobs not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported", param="logprobs")


def chat_messages(raw: object, tool_history: bool = False) -> list[dict]:
    """OpenAI chat messages as the daemon's {role, content} dicts (text content only);
    with `tool_history` (the model has a tool parser), `tool` messages and assistant
    messages with `tool_calls` too, as chat templates take them."""
    raw = fields.messages(raw)
    roles = {**ROLES, "tool": "tool"} if tool_history else ROLES
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in roles:
            raise ApiError(400, f"{where}: needs a 'role' among {', '.join(roles)}", param=where)
        calls = m.get("tool_calls")
        if calls and not tool_history:
            raise ApiError(
                400, f"{where}: tool calls are not supported for this model", param=where
            )
        content = m.get("content")
        if calls and content is None:
            content = ""
        message = {"role": roles[m["role"]], "content": text_content(content, where)}
        if calls:
            if not isinstance(calls, list):
                raise ApiError(400, f"{where}: 'tool_calls' must be an array", param=where)
            message["tool_calls"] = [tools.openai_call(c, where) for c in calls]
        if m["role"] == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        out.append(message)
    return out


def text_content(content: object, where: str) -> str:
    """A message's content: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(400, f"{where}: only text content is supported", param=where)
            if not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}: a text part needs a string 'text'", param=where)
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}: 'content' must be a string or text parts", param=where)


def usage(raw: dict, completion_tokens: int) -> dict:
    """OpenAI's usage from the turn's: cached_tokens = the tokens reused, not prefilled."""
    prompt = int(raw.get("prompt_tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": int(raw.get("cached_tokens", 0))},
    }


def finish(reason: str | None, calls: list[dict] | None = None) -> str:
    if reason == "length":
        return "length"
    return "tool_calls" if calls else "stop"


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class OpenAIApi:
    """The OpenAI endpoints over `Turns`."""

    def __init__(self, turns: Turns) -> None:
        self.turns = turns

    async def models(self) -> Response:
        info = await self.turns.info()
        created = int(info.get("started", time.time()))
        model = {"id": info.get("model", "default"), "object": "model", "created": created}
        model["owned_by"] = "agentkv"
        return JSONResponse({"object": "list", "data": [model]})

    async def chat(self, headers, body: dict) -> Response:
        options = sampling(body)
        info = await self.turns.info()
        turn = TurnInput(
            agent_of(headers, body, "user"),
            messages=chat_messages(
                body.get("messages"), isinstance(info.get("tool_calling"), dict)
            ),
            options=options,
            tools=tools.openai_tools(body, info),
        )
        return await self._respond(body, turn, chat=True, marker=_marker(turn, info))

    async def completion(self, headers, body: dict) -> Response:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
        if body.get("tools") is not None:
            raise ApiError(400, "tools go with /v1/chat/completions", param="tools")
        if body.get("echo") or body.get("suffix"):
            raise ApiError(400, "echo and suffix are not supported", param="echo")
        turn = TurnInput(agent_of(headers, body, "user"), prompt=prompt, options=sampling(body))
        return await self._respond(body, turn, chat=False)

    async def _respond(
        self, body: dict, turn: TurnInput, *, chat: bool, marker: str | None = None
    ) -> Response:
        model = body.get("model") if isinstance(body.get("model"), str) else "default"
        stream = fields.flag(body, "stream")
        include_usage = fields.flag(fields.mapping(body, "stream_options"), "include_usage")
        if stream:
            agent, events = await self.turns.stream(turn)
            chunks = _Chunks(model, chat, include_usage, marker)
            return StreamingResponse(
                chunks.render(events),
                media_type="text/event-stream",
                headers={**SSE_HEADERS, "X-Agent-Id": agent},
            )
        agent, result = await self.turns.generate(turn)
        body = _whole(model, result, chat)
        return JSONResponse(body, headers={"X-Agent-Id": agent})


def _marker(turn: TurnInput, info: dict) -> str | None:
    """The tool-call start marker a streamed turn's text is held back at (with tools)."""
    return info["tool_calling"]["start"] if turn.tools is not None else None


def _whole(model: str, result: Result, chat: bool) -> dict:
    n = int(result.usage.get("generated_tokens", len(result.token_ids)))
    calls = result.tool_calls
    reason = finish(result.finish_reason, calls)
    choice = {"index": 0, "finish_reason": reason, "logprobs": None}
    if chat and calls:
        content = result.content or None
        message = {"role": "assistant", "content": content}
        choice["message"] = {**message, "tool_calls": tools.openai_calls(calls, result.uid)}
    elif chat:
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{result.uid}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(result.usage, n),
    }


class _Chunks:
    """A streamed response's server-sent events."""

    def __init__(
        self, model: str, chat: bool, include_usage: bool, marker: str | None = None
    ) -> None:
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.created = int(time.time())
        self.held = None if marker is None else tools.HeldText(marker)

    def chunk(self, uid: int, choices: list[dict], **extra) -> bytes:
        return sse(
            {
                "id": f"{'chatcmpl' if self.chat else 'cmpl'}-{uid}",
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": choices,
                **extra,
            }
        )

    def choice(self, text: str | None, reason: str | None, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        delta = {"role": "assistant", "content": text or ""} if first else {}
        if text and not first:
            delta = {"content": text}
        return {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}

    async def render(self, events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
        first = True
        async for event in events:
            if first and self.chat:
                yield self.chunk(event.uid, [self.choice("", None, first=True)])
            first = False
            text = event.text if self.held is None else self.held.feed(event.text)
            if text:
                yield self.chunk(event.uid, [self.choice(text, None)])
            if not event.finished:
                continue
            error = event_error(event)
            if error is not None:
                yield sse(error.openai())
                break
            for chunk in self._tool_chunks(event):
                yield chunk
            reason = finish(event.finish_reason, event.tool_calls)
            yield self.chunk(event.uid, [self.choice(None, reason)])
            if self.include_usage:
                n = int((event.usage or {}).get("generated_tokens", 0))
                yield self.chunk(event.uid, [], usage=usage(event.usage or {}, n))
        yield sse("[DONE]")

    def _tool_chunks(self, last: Event) -> list[bytes]:
        """The held text and the tool calls of a turn given tools, once it ended."""
        if self.held is None:
            return []
        out = []
        rest = self.held.finish(last.tool_calls, last.content)
        if rest:
            out.append(self.chunk(last.uid, [self.choice(rest, None)]))
        if last.tool_calls:
            delta = {"tool_calls": tools.openai_calls(last.tool_calls, last.uid, stream=True)}
            choice = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
            out.append(self.chunk(last.uid, [choice]))
        return out
