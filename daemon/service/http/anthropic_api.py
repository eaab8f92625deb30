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

from . import fields, tools
from .errors import ApiError
from .openai_api import SSE_HEADERS, text_content
from .turns import TurnInput, Turns, agent_of, event_error

ROLES = ("user", "assistant")


def parse(headers, body: dict, info: dict) -> tuple[TurnInput, bool]:
    """The turn of a /v1/messages request, and whether it streams (`info`: the daemon's
    `hello` facts, which say whether its model can take tools)."""
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
    tool_history = isinstance(info.get("tool_calling"), dict)
    messages = _system(body.get("system")) + _messages(body.get("messages"), tool_history)
    turn = TurnInput(
        agent_of(headers, body, None),
        messages=messages,
        options={k: v for k, v in options.items() if v is not None},
        tools=tools.anthropic_tools(body, info),
    )
    return turn, fields.flag(body, "stream")


def _system(system: object) -> list[dict]:
    if system is None:
        return []
    return [{"role": "system", "content": text_content(system, "system")}]


def _messages(raw: object, tool_history: bool) -> list[dict]:
    raw = fields.messages(raw)
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where}: 'role' must be 'user' or 'assistant'", param=where)
        content = m.get("content")
        if tool_history and isinstance(content, list) and _has_tool_blocks(content):
            out += _tool_message(m["role"], content, where)
        else:
            out.append({"role": m["role"], "content": text_content(content, where)})
    return out


def _has_tool_blocks(content: list) -> bool:
    return any(isinstance(b, dict) and b.get("type") in _TOOL_BLOCKS for b in content)


def _tool_message(role: str, blocks: list, where: str) -> list[dict]:
    """An assistant message with tool_use blocks (one message with tool_calls), or a user
    message with tool_result blocks (a `tool` message per result, then its text)."""
    text = [b for b in blocks if not (isinstance(b, dict) and b.get("type") in _TOOL_BLOCKS)]
    words = text_content(text, where)
    if role == "assistant":
        calls = [tools.anthropic_call(b, where) for b in blocks if b.get("type") == "tool_use"]
        if any(b.get("type") == "tool_result" for b in blocks if isinstance(b, dict)):
            raise ApiError(400, f"{where}: tool_result belongs in a user message", param=where)
        return [{"role": "assistant", "content": words, "tool_calls": calls}]
    out = []
    for b in blocks:
        if isinstance(b, dict) and b.get("type") == "tool_use":
            raise ApiError(400, f"{where}: tool_use belongs in an assistant message", param=where)
        if isinstance(b, dict) and b.get("type") == "tool_result":
            result = b.get("content", "")
            message = {"role": "tool", "content": text_content(result, where)}
            if isinstance(b.get("tool_use_id"), str):
                message["tool_call_id"] = b["tool_use_id"]
            out.append(message)
    return out + ([{"role": "user", "content": words}] if words else [])


_TOOL_BLOCKS = ("tool_use", "tool_result")


def usage(raw: dict, output_tokens: int) -> dict:
    cached = int(raw.get("cached_tokens", 0))
    return {
        "input_tokens": int(raw.get("prompt_tokens", 0)) - cached,
        "output_tokens": output_tokens,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def stop_reason(reason: str | None, generated: int, context: list[int] | None, stops, calls=None):
    """(stop_reason, stop_sequence): a "stop" that put no EOS into the context (it holds
    just the `generated` ids) was a stop sequence, which one known only when there is one;
    a turn that called tools stopped for "tool_use"."""
    if reason == "length":
        return "max_tokens", None
    if calls:
        return "tool_use", None
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
        info = await self.turns.info()
        turn, stream = parse(headers, body, info)
        model = body.get("model") if isinstance(body.get("model"), str) else "default"
        stops = turn.options.get("stop")
        if stream:
            agent, events = await self.turns.stream(turn)
            held = None if turn.tools is None else tools.HeldText(info["tool_calling"]["start"])
            return StreamingResponse(
                _render(events, model, stops, held),
                media_type="text/event-stream",
                headers={**SSE_HEADERS, "X-Agent-Id": agent},
            )
        agent, result = await self.turns.generate(turn)
        calls = result.tool_calls
        reason, sequence = stop_reason(
            result.finish_reason, len(result.token_ids), result.context_token_ids, stops, calls
        )
        n = int(result.usage.get("generated_tokens", len(result.token_ids)))
        content = [_text(result.text)]
        if calls:
            words = [_text(result.content)] if result.content else []
            content = words + tools.anthropic_blocks(calls, result.uid)
        message = {
            **_message(result.uid, model),
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": usage(result.usage, n),
        }
        return JSONResponse(message, headers={"X-Agent-Id": agent})


def _message(uid: int, model: str) -> dict:
    return {"id": f"msg_{uid}", "type": "message", "role": "assistant", "model": model}


async def _render(
    events: AsyncIterator[Event], model: str, stops, held: tools.HeldText | None = None
) -> AsyncIterator[bytes]:
    started, generated = False, 0
    async for e in events:
        if not started:
            start = {**_message(e.uid, model), "content": [], "stop_reason": None}
            start.update(stop_sequence=None, usage=usage({}, 0))
            yield event("message_start", {"message": start})
            yield event("content_block_start", {"index": 0, "content_block": _text("")})
            started = True
        generated += len(e.token_ids)
        text = e.text if held is None else held.feed(e.text)
        if text:
            yield event("content_block_delta", {"index": 0, "delta": _delta(text)})
        if not e.finished:
            continue
        error = event_error(e)
        if error is not None:
            yield f"event: error\ndata: {json.dumps(error.anthropic())}\n\n".encode()
            return
        for chunk in _tool_events(e, held):
            yield chunk
        n = int((e.usage or {}).get("generated_tokens", generated))
        reason, sequence = stop_reason(
            e.finish_reason, generated, e.context_token_ids, stops, e.tool_calls
        )
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        yield event("message_delta", {"delta": delta, "usage": usage(e.usage or {}, n)})
        yield event("message_stop", {})


def _tool_events(last: Event, held: tools.HeldText | None) -> list[bytes]:
    """The end of the text block (its held text first) and, for a turn that called
    tools, a tool_use block per call (its input as one input_json_delta)."""
    out = []
    rest = "" if held is None else held.finish(last.tool_calls, last.content)
    if rest:
        out.append(event("content_block_delta", {"index": 0, "delta": _delta(rest)}))
    out.append(event("content_block_stop", {"index": 0}))
    for i, block in enumerate(tools.anthropic_blocks(last.tool_calls or [], last.uid), 1):
        partial = json.dumps(block["input"], ensure_ascii=False)
        out.append(
            event("content_block_start", {"index": i, "content_block": {**block, "input": {}}})
        )
        delta = {"type": "input_json_delta", "partial_json": partial}
        out.append(event("content_block_delta", {"index": i, "delta": delta}))
        out.append(event("content_block_stop", {"index": i}))
    return out


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _delta(text: str) -> dict:
    return {"type": "text_delta", "text": text}
