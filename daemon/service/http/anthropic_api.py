"""Anthropic's API: POST /v1/messages (whole, or streamed as message_start,
content_block_start, content_block_delta..., content_block_stop, message_delta,
message_stop).

The agent is the X-Agent-Id header, else `metadata.agent_id`; without one the turn runs on
an ephemeral agent deleted after it. `usage.cache_read_input_tokens` counts the tokens
reused from the agent's context; `input_tokens` the ones prefilled (as Anthropic counts).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from starlette.responses import JSONResponse, Response, StreamingResponse

from agentkv.client import Event

from . import fields
from .errors import ApiError
from .openai_api import SSE_HEADERS, text_content
from .turns import TurnInput, Turns, agent_of, event_error

ROLES = ("user", "assistant")


def parse(headers, body: dict) -> tuple[TurnInput, bool]:
    """The turn of a /v1/messages request, and whether it streams."""
    if body.get("tools"):
        raise ApiError(
            400,
            "tools are not supported: agentkv does not parse tool calls yet, and it "
            "refuses tools rather than return unparsed tool-call text",
            param="tools",
        )
    max_tokens = fields.integer(body, "max_tokens", low=1)
    if max_tokens is None:
        raise ApiError(400, "'max_tokens' is required", param="max_tokens")
    options = {
        "max_tokens": max_tokens,
        "temperature": fields.number(body, "temperature", low=0.0, high=1.0),
        "top_p": fields.number(body, "top_p", low=0.0, high=1.0),
        "top_k": fields.integer(body, "top_k", low=0),
        "stop": fields.strings(body, "stop_sequences"),
    }
    messages = _system(body.get("system")) + _messages(body.get("messages"))
    turn = TurnInput(
        agent_of(headers, body, None),
        messages=messages,
        options={k: v for k, v in options.items() if v is not None},
    )
    return turn, fields.flag(body, "stream")


def _system(system: object) -> list[dict]:
    if system is None:
        return []
    return [{"role": "system", "content": text_content(system, "system")}]


def _messages(raw: object) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where}: 'role' must be 'user' or 'assistant'", param=where)
        out.append({"role": m["role"], "content": text_content(m.get("content"), where)})
    return out


def usage(raw: dict, output_tokens: int) -> dict:
    cached = int(raw.get("cached_tokens", 0))
    return {
        "input_tokens": int(raw.get("prompt_tokens", 0)) - cached,
        "output_tokens": output_tokens,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def stop_reason(reason: str | None, generated: int, context: list[int] | None, stops):
    """(stop_reason, stop_sequence): a "stop" that put no EOS into the context (it holds
    just the `generated` ids) was a stop sequence, which one known only when there is one."""
    if reason == "length":
        return "max_tokens", None
    if stops and context is not None and len(context) == generated:
        return "stop_sequence", stops[0] if len(stops) == 1 else None
    return "end_turn", None


def event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


class AnthropicApi:
    """The Anthropic endpoint over `Turns`."""

    def __init__(self, turns: Turns) -> None:
        self.turns = turns

    async def messages(self, headers, body: dict) -> Response:
        turn, stream = parse(headers, body)
        model = body.get("model") if isinstance(body.get("model"), str) else "default"
        stops = turn.options.get("stop")
        if stream:
            agent, events = await self.turns.stream(turn)
            return StreamingResponse(
                _render(events, model, stops),
                media_type="text/event-stream",
                headers={**SSE_HEADERS, "X-Agent-Id": agent},
            )
        agent, result = await self.turns.generate(turn)
        reason, sequence = stop_reason(
            result.finish_reason, len(result.token_ids), result.context_token_ids, stops
        )
        n = int(result.usage.get("generated_tokens", len(result.token_ids)))
        message = {
            **_message(result.uid, model),
            "content": [{"type": "text", "text": result.text}],
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage(result.usage, n),
        }
        return JSONResponse(message, headers={"X-Agent-Id": agent})


def _message(uid: int, model: str) -> dict:
    return {"id": f"msg_{uid}", "type": "message", "role": "assistant", "model": model}


async def _render(events: AsyncIterator[Event], model: str, stops) -> AsyncIterator[bytes]:
    started, generated = False, 0
    async for e in events:
        if not started:
            start = {**_message(e.uid, model), "content": [], "stop_reason": None}
            start.update(stop_sequence=None, usage=usage({}, 0))
            yield event("message_start", {"message": start})
            yield event("content_block_start", {"index": 0, "content_block": _text("")})
            started = True
        generated += len(e.token_ids)
        if e.text:
            yield event("content_block_delta", {"index": 0, "delta": _delta(e.text)})
        if not e.finished:
            continue
        error = event_error(e)
        if error is not None:
            yield f"event: error\ndata: {json.dumps(error.anthropic())}\n\n".encode()
            return
        yield event("content_block_stop", {"index": 0})
        n = int((e.usage or {}).get("generated_tokens", generated))
        reason, sequence = stop_reason(e.finish_reason, generated, e.context_token_ids, stops)
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        yield event("message_delta", {"delta": delta, "usage": usage(e.usage or {}, n)})
        yield event("message_stop", {})


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _delta(text: str) -> dict:
    return {"type": "text_delta", "text": text}
