"""Tool calls: whether the model's chat template takes `tools`, and the calls a model
wrote, read with mlx-lm's tool parser for the model (the TokenizerWrapper's `tool_parser`,
applied to the text between its `tool_call_start` and `tool_call_end` markers, as
`mlx_lm.server` does).

Output that does not parse as tool calls is left as text: a turn reports tool calls only
when every marked span parsed, never a guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# A tool no template could render the same as no tools: used to tell a template that
# takes `tools` from one that ignores them.
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "agentkv_probe_tool",
        "description": "probe",
        "parameters": {"type": "object", "properties": {}},
    },
}
_PROBE_CHAT = [{"role": "user", "content": "x"}]


@dataclass(slots=True, frozen=True)
class ToolCalls:
    """A turn's tool calls and the text around them.

    Attributes:
        calls: each {"name": str, "arguments": the parsed arguments} (plus "id" when the
            model wrote one).
        content: the text less the marked spans of the calls.
    """

    calls: list[dict]
    content: str


@dataclass(slots=True, frozen=True)
class ToolParser:
    """The model's tool-call markers and parser (from its TokenizerWrapper)."""

    start: str
    end: str
    parse_one: Callable
    name: str

    @classmethod
    def of(cls, tokenizer) -> ToolParser | None:
        """The tokenizer's tool parser, or None when mlx-lm knows none for the model."""
        parse = getattr(tokenizer, "tool_parser", None)
        if not getattr(tokenizer, "has_tool_calling", False) or parse is None:
            return None
        start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
        if not isinstance(start, str) or not isinstance(end, str) or not start or not end:
            return None
        return cls(start, end, parse, getattr(parse, "__module__", "").rpartition(".")[2])

    def facts(self) -> dict:
        """What `hello` reports: the markers and the parser's name."""
        return {"start": self.start, "end": self.end, "parser": self.name}

    def parse(self, text: str, tools: list[dict] | None) -> ToolCalls | None:
        """The tool calls in `text`; None when it marks none, or when any marked span (an
        unterminated last one included) does not parse."""
        content, spans = split(text, self.start, self.end)
        if not spans:
            return None
        calls: list[dict] = []
        for span in spans:
            try:
                parsed = self.parse_one(span, tools)
            except Exception:  # the parser is the model's code: any failure is "no calls"
                return None
            for raw in parsed if isinstance(parsed, list) else [parsed]:
                call = _call(raw)
                if call is None:
                    return None
                calls.append(call)
        return ToolCalls(calls, content) if calls else None


def split(text: str, start: str, end: str) -> tuple[str, list[str]]:
    """(the text outside the marked spans, each span's inside); an unterminated last
    span runs to the end of the text."""
    outside, spans = [], []
    pos = 0
    while (i := text.find(start, pos)) >= 0:
        outside.append(text[pos:i])
        j = text.find(end, i + len(start))
        if j < 0:
            spans.append(text[i + len(start) :])
            pos = len(text)
            break
        spans.append(text[i + len(start) : j])
        pos = j + len(end)
    outside.append(text[pos:])
    return "".join(outside), spans


def template_takes_tools(render: Callable[..., str]) -> bool:
    """True when a chat rendered with a tool differs from it rendered without:
    `render(messages, tools=...)` is the tokenizer's apply_chat_template (tokenize=False)."""
    try:
        return render(_PROBE_CHAT, tools=[_PROBE_TOOL]) != render(_PROBE_CHAT, tools=None)
    except Exception:  # the model's template code: it cannot render tools
        return False


def _call(raw: object) -> dict | None:
    """A parsed call as {"name", "arguments"[, "id"]}; None when it is not one."""
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
        return None
    arguments = raw.get("arguments", {})
    call = {"name": raw["name"], "arguments": {} if arguments is None else arguments}
    if isinstance(raw.get("id"), str):
        call["id"] = raw["id"]
    return call
