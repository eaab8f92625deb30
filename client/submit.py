"""A `submit` request, one turn of one agent: `SubmitRequest` (the body: agent, input,
options) and `TurnOptions` (how the turn generates), with their defaults
(`SUBMIT_DEFAULTS`), limits and checks. The one place these are written: the client builds
its `submit` from SubmitRequest, the daemon's command layer reads it back from the wire,
and the engine checks its own `submit` arguments with TurnOptions. Pure Python;
`protocol` re-exports it all.
"""

from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass
from typing import NoReturn

from .checks import MAX_TOKENS_PER_MESSAGE, ProtocolError, check_agent_id, shown

TURN_INPUTS = ("prompt", "tokens", "messages")  # a submit gives exactly one of these
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
MAX_TOOLS = 128  # tools of one submit (each a JSON-schema dict; the size is the message's)


def check_sampling(temperature, top_p, top_k, min_p, seed) -> None:
    """Sampling parameters' ranges (see TurnOptions).

    Raises:
        ProtocolError: invalid_request, naming the first bad one.
    """
    _check_number("temperature", temperature, 0.0)
    _check_number("top_p", top_p, 0.0, 1.0, lo_open=True)
    _check_number("min_p", min_p, 0.0, 1.0, hi_open=True)
    if not _is_int(top_k) or top_k < 0:
        _invalid(f"top_k must be an integer >= 0, got {shown(top_k)}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        _invalid(f"seed must be an integer in [0, 2**63), got {shown(seed)}")


def _check_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):  # one string is one stop string, not its characters
        stop = [stop]
    ok = isinstance(stop, (list, tuple)) and len(stop) <= MAX_STOP_STRINGS
    if not ok or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        _invalid(
            f"stop must be up to {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_CHARS} chars"
        )
    return tuple(stop)


def _check_number(name, value, lo, hi=math.inf, lo_open=False, hi_open=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lo_b, hi_b = "(" if lo_open else "[", ")" if hi_open else "]"
        _invalid(f"{name} must be a number in {lo_b}{lo}, {hi}{hi_b}, got {shown(value)}")


def _int_like(value):
    """numpy's integers as ints (they travel as ints); anything else unchanged."""
    if not isinstance(value, (int, bool, float)) and hasattr(value, "__index__"):
        try:
            return operator.index(value)
        except TypeError:
            return value
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _invalid(message: str) -> NoReturn:
    raise ProtocolError("invalid_request", message)


@dataclass(slots=True, frozen=True)
class TurnOptions:
    """How a turn generates, checked and normalized: integer-likes (numpy's) become ints,
    one stop string becomes a 1-tuple. The defaults are every layer's defaults.

    Attributes:
        max_tokens: tokens to generate at most (> 0).
        temperature: >= 0; 0 means greedy (argmax).
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
        min_p: drop tokens below min_p times the top probability, in [0, 1); 0 disables it.
        seed: fixes the turn's random stream, in [0, 2**63); None draws a fresh one.
        stop: up to MAX_STOP_STRINGS non-empty strings (of <= MAX_STOP_CHARS characters)
            that end the turn when generated.

    Raises:
        ProtocolError: invalid_request, naming the first bad field.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_tokens", "top_k", "seed"):
            object.__setattr__(self, name, _int_like(getattr(self, name)))
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            _invalid(f"max_tokens must be an integer > 0, got {shown(self.max_tokens)}")
        check_sampling(self.temperature, self.top_p, self.top_k, self.min_p, self.seed)
        object.__setattr__(self, "stop", _check_stop(self.stop))

    def as_dict(self) -> dict:
        """The options by name (stop as a list, as on the wire)."""
        out = {name: getattr(self, name) for name in self.__slots__}
        out["stop"] = list(self.stop)
        return out


SUBMIT_DEFAULTS = TurnOptions()
_OPTION_FIELDS = frozenset(TurnOptions.__slots__)
SUBMIT_FIELDS = frozenset({"agent_id", *TURN_INPUTS, *_OPTION_FIELDS, "tools"})  # a body


@dataclass(slots=True, frozen=True)
class SubmitRequest:
    """A `submit` request's body: one turn of one agent.

    Exactly one input: `prompt` (text appended to the agent's context), `tokens` (token
    ids appended to it) or `messages` (the whole chat as {role, content} dicts, rendered
    with the model's chat template). `tools` (up to MAX_TOOLS dicts, e.g. OpenAI's
    function schemas) go with `messages`, to the chat template. What only the model can
    judge (token ids in its vocabulary, a chat template, text that encodes to nothing,
    whether its template takes tools) is the engine's to check.

    Raises:
        ProtocolError: invalid_request, naming the first bad field.
    """

    agent_id: str
    prompt: str | None = None
    tokens: list[int] | None = None
    messages: list[dict] | None = None
    options: TurnOptions = SUBMIT_DEFAULTS
    tools: list[dict] | None = None

    def __post_init__(self) -> None:
        check_agent_id(self.agent_id)
        given = [k for k in TURN_INPUTS if getattr(self, k) is not None]
        if len(given) != 1:
            _invalid("give exactly one of prompt, tokens, messages")
        if self.prompt is not None and not isinstance(self.prompt, str):
            _invalid("prompt must be a string (token ids: `tokens`)")
        for kind in ("tokens", "messages"):
            if getattr(self, kind) is not None and not isinstance(getattr(self, kind), list):
                _invalid(f"{kind} must be a list")
        if self.tokens is not None and len(self.tokens) > MAX_TOKENS_PER_MESSAGE:
            _invalid(f"at most {MAX_TOKENS_PER_MESSAGE} token ids per request")
        if self.tools is not None:
            check_tools(self.tools, chat=self.messages is not None)

    @classmethod
    def for_turn(
        cls, agent_id: str, prompt=None, *, messages=None, tools=None, **options
    ) -> SubmitRequest:
        """A request from `submit`-style arguments: `prompt` as text or token ids (any
        iterable of ints), `messages` and `tools` any sequences of dicts, options by name."""
        tokens = None
        if prompt is not None and not isinstance(prompt, str):
            try:
                tokens = list(prompt)
            except TypeError:
                _invalid(f"prompt must be text or token ids, got {type(prompt).__name__}")
            prompt = None
        if messages is not None and not isinstance(messages, (str, bytes, dict)):
            with contextlib.suppress(TypeError):  # not iterable: refused as not a list
                messages = list(messages)
        if tools is not None and not isinstance(tools, (str, bytes, dict)):
            with contextlib.suppress(TypeError):
                tools = list(tools)
        return cls(agent_id, prompt, tokens, messages, TurnOptions(**options), tools)

    @classmethod
    def from_body(cls, body: dict) -> SubmitRequest:
        """A request from a decoded body; an unknown field is refused, and an input given
        as None counts as not given."""
        unknown = set(body) - SUBMIT_FIELDS
        if unknown:
            _invalid(f"unknown field(s): {sorted(map(str, unknown))}")
        options = {k: v for k, v in body.items() if k in _OPTION_FIELDS}
        inputs = {k: body.get(k) for k in TURN_INPUTS}
        options = TurnOptions(**options)
        return cls(body.get("agent_id"), **inputs, options=options, tools=body.get("tools"))

    def to_body(self) -> dict:
        """The wire body: agent id, the one input given, and every option (`stop` only
        when there is one)."""
        body = {"agent_id": self.agent_id, **self.options.as_dict()}
        if not self.options.stop:
            del body["stop"]
        for kind in TURN_INPUTS:
            if getattr(self, kind) is not None:
                body[kind] = getattr(self, kind)
        if self.tools is not None:
            body["tools"] = self.tools
        return body


def check_tools(tools: object, *, chat: bool) -> list[dict]:
    """A submit's `tools`: a list of at most MAX_TOOLS dicts, given with `messages`.

    Raises:
        ProtocolError: invalid_request.
    """
    if not chat:
        _invalid("tools go with messages (the chat template renders them)")
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        _invalid(f"tools must be a list of dicts (JSON schemas), got {shown(tools)}")
    if len(tools) > MAX_TOOLS:
        _invalid(f"at most {MAX_TOOLS} tools per request, got {len(tools)}")
    return tools
