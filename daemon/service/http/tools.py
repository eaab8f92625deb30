"""Tool calls over HTTP: a request's `tools` and its tool history checked and mapped to
what chat templates take (OpenAI's function-schema shape), and a turn's tool calls (read
by the daemon with mlx-lm's tool parser for the model) shaped for each API.

Tools are accepted only when the daemon reports a tool parser for its model (`hello`'s
`tool_calling`); otherwise they are refused with a 400, never rendered and then answered
with unparsed tool-call text.
"""

from __future__ import annotations

import json

from .errors import ApiError

MAX_TOOLS = 128  # the protocol's bound (`protocol.MAX_TOOLS`)


def require_tool_calling(info: dict, where: str = "tools") -> dict:
    """The daemon's tool-calling facts; a 400 when its model has no tool parser."""
    facts = info.get("tool_calling")
    if not isinstance(facts, dict):
        raise ApiError(
            400,
            f"tools are not supported for model {info.get('model', 'default')!r}: mlx-lm has "
            "no tool parser for it (or its chat template takes no tools), so agentkv refuses "
            "tools rather than return unparsed tool-call text",
            param=where,
            code="tools_unsupported",
        )
    return facts


def openai_tools(body: dict, info: dict) -> list[dict] | None:
    """OpenAI's `tools` (function schemas) as the chat template takes them; None without
    tools or with tool_choice "none"."""
    if body.get("functions") is not None:
        raise ApiError(400, "'functions' is deprecated: use 'tools'", param="functions")
    tools = body.get("tools")
    if tools is None or tools == []:
        return None
    require_tool_calling(info)
    _check_list(tools, "tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(fn, dict) or not _name(fn):
            raise ApiError(
                400,
                f"tools[{i}] must be {{type: function, function: {{name, ...}}}}",
                param="tools",
            )
    return None if _choice(body.get("tool_choice"), "none", "auto") == "none" else tools


def anthropic_tools(body: dict, info: dict) -> list[dict] | None:
    """Anthropic's `tools` ({name, description, input_schema}) in the function-schema shape
    chat templates take; None without tools or with tool_choice {type: none}."""
    tools = body.get("tools")
    if tools is None or tools == []:
        return None
    require_tool_calling(info)
    _check_list(tools, "tools")
    out = []
    for i, tool in enumerate(tools):
        if not _name(tool) or not isinstance(tool.get("input_schema", {}), dict):
            raise ApiError(
                400, f"tools[{i}] needs a 'name' and an object 'input_schema'", param="tools"
            )
        fn = {"name": tool["name"]}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        fn["parameters"] = tool.get("input_schema", {})
        out.append({"type": "function", "function": fn})
    choice = body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else choice
    return None if _choice(kind, "none", "auto") == "none" else out


def _choice(choice: object, *allowed: str) -> str:
    """A tool_choice the engine honours: the model decides ("auto"), or no tools ("none");
    forcing a call cannot be guaranteed, so it is refused."""
    if choice is None:
        return "auto"
    if choice not in allowed:
        raise ApiError(
            400,
            f"tool_choice {choice!r} is not supported (only {' or '.join(allowed)}): the "
            "model decides whether to call a tool",
            param="tool_choice",
        )
    return choice


def _check_list(tools: object, where: str) -> None:
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ApiError(400, f"'{where}' must be an array of objects", param=where)
    if len(tools) > MAX_TOOLS:
        raise ApiError(400, f"at most {MAX_TOOLS} tools per request", param=where)


def _name(obj: dict) -> bool:
    return isinstance(obj.get("name"), str) and bool(obj["name"])


# -- history: earlier calls and their results, as chat templates take them --------------


def openai_call(raw: object, where: str) -> dict:
    """An assistant message's tool call as templates take it (arguments parsed)."""
    fn = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(fn, dict) or not _name(fn):
        raise ApiError(400, f"{where}: a tool call needs function.name", param=where)
    arguments = fn.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            raise ApiError(400, f"{where}: arguments are not JSON", param=where) from None
    call = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
    if isinstance(raw.get("id"), str):
        call["id"] = raw["id"]
    return call


def anthropic_call(block: dict, where: str) -> dict:
    """A tool_use block of an assistant message as templates take it."""
    if not _name(block) or not isinstance(block.get("input", {}), dict):
        raise ApiError(400, f"{where}: tool_use needs a 'name' and an object 'input'", param=where)
    fn = {"name": block["name"], "arguments": block.get("input", {})}
    call = {"type": "function", "function": fn}
    if isinstance(block.get("id"), str):
        call["id"] = block["id"]
    return call


# -- a turn's calls, shaped for each API --------------------------------------------------


def openai_calls(calls: list[dict], uid: int, *, stream: bool = False) -> list[dict]:
    """OpenAI's `tool_calls` (arguments as a JSON string; `index` when streamed)."""
    out = []
    for i, call in enumerate(calls):
        item = {
            "id": call.get("id") or f"call_{uid}_{i}",
            "type": "function",
            "function": {"name": call["name"], "arguments": _json(call["arguments"])},
        }
        out.append({"index": i, **item} if stream else item)
    return out


def anthropic_blocks(calls: list[dict], uid: int) -> list[dict]:
    """Anthropic's tool_use content blocks."""
    return [
        {
            "type": "tool_use",
            "id": call.get("id") or f"toolu_{uid}_{i}",
            "name": call["name"],
            "input": call["arguments"] if isinstance(call["arguments"], dict) else {},
        }
        for i, call in enumerate(calls)
    ]


def _json(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class HeldText:
    """A streamed turn's text when it was given tools: text before the first tool-call
    marker is shown as it comes; from the marker on (and a partial marker at the end) it
    is held until the turn ends. Then the rest is the text less the calls when the daemon
    read calls, else everything held (output that did not parse stays text).

    Args:
        start: the model's tool-call start marker.
    """

    def __init__(self, start: str) -> None:
        self.start = start
        self.held = ""
        self.holding = False
        self.shown = 0

    def feed(self, text: str) -> str:
        """What of `text` to show now."""
        if self.holding:
            self.held += text
            return ""
        text = self.held + text
        i = text.find(self.start)
        if i >= 0:
            self.holding, self.held, out = True, text[i:], text[:i]
        else:
            keep = next(
                (k for k in range(len(self.start) - 1, 0, -1) if text.endswith(self.start[:k])), 0
            )
            self.held, out = text[len(text) - keep :], text[: len(text) - keep]
        self.shown += len(out)
        return out

    def finish(self, calls: list[dict] | None, content: str | None) -> str:
        """The text still to show once the turn ended (`calls` and `content` as the last
        event gives them)."""
        if calls:
            return (content or "")[self.shown :]
        return self.held
