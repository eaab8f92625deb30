"""The engine's records: sampling parameters, usage, completions and per-step events.

A turn's defaults, limits and checks are the protocol's (`agentkv.client.protocol.
TurnOptions`): the engine checks its `submit` arguments with them, so a direct caller and
a client over the wire meet the same rules."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from agentkv.client.protocol import (
    SUBMIT_DEFAULTS,
    ProtocolError,
    TurnOptions,
    TurnOutcome,
    check_sampling,
)

from ..errors import InvalidRequestError


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How a request picks its tokens; temperature 0 is greedy (argmax).

    Attributes:
        temperature: >= 0; 0 means greedy.
        top_p: nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
        min_p: drop tokens below min_p times the top probability, in [0, 1); 0 disables it.
        seed: fixes the random stream of this request alone (what else is in the batch does
            not change it); None draws a fresh seed.
    """

    temperature: float = SUBMIT_DEFAULTS.temperature
    top_p: float = SUBMIT_DEFAULTS.top_p
    top_k: int = SUBMIT_DEFAULTS.top_k
    min_p: float = SUBMIT_DEFAULTS.min_p
    seed: int | None = SUBMIT_DEFAULTS.seed

    def __post_init__(self) -> None:
        try:
            check_sampling(self.temperature, self.top_p, self.top_k, self.min_p, self.seed)
        except ProtocolError as exc:
            raise InvalidRequestError(str(exc)) from None

    @classmethod
    def of(cls, options: TurnOptions) -> SamplingParams:
        """A turn's sampling parameters from its (checked) options."""
        return cls(options.temperature, options.top_p, options.top_k, options.min_p, options.seed)

    @property
    def greedy(self) -> bool:
        """True when the request takes the argmax at every step."""
        return self.temperature == 0.0


@dataclass(slots=True)
class Usage:
    """What one turn cost and reused.

    Attributes:
        prompt_tokens: context tokens before generation (reused plus prefilled).
        cached_tokens: of those, taken from the cache instead of prefilled.
        generated_tokens: tokens the model produced (a final EOS included).
        restored_tokens: of the cached ones, read back from disk (0 without a store).
        recomputed_tokens: context tokens the agent had before whose cache was gone, so
            they were prefilled again.
        queue_ms: submit to admission into the batch.
        restore_ms: rebuilding the cache from blocks.
        prefill_ms: batch steps spent prefilling this turn's new tokens (from joining the
            batch to its first token; others' decoding shares those steps).
        ttft_ms: submit to the first generated token.
        total_ms: submit to finish.
    """

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    restored_tokens: int = 0
    recomputed_tokens: int = 0
    queue_ms: float = 0.0
    restore_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0

    def as_dict(self) -> dict:
        """Plain dict (for JSON and msgpack)."""
        return asdict(self)

    def __getitem__(self, key: str):
        """`usage["cached_tokens"]` reads like `usage.cached_tokens` (dict-style callers)."""
        if key not in self.__slots__:
            raise KeyError(key)
        return getattr(self, key)


@dataclass(slots=True)
class Completion(TurnOutcome):
    """A finished request: the protocol's `TurnOutcome` fields, and:

    Attributes:
        usage: token counts and timings.
        error: message when finish_reason is "error".
        error_code: the error's stable code (see `agentkv.daemon.errors`).
        context_token_ids: the generated ids exactly as appended to the agent's context: a
            final EOS included when the turn ended on one (whichever of the model's EOS ids
            it was); empty when the context did not change (cancelled, error).
        tool_calls: for a turn given tools, the calls its text holds, read with the
            model's tool parser (see `tool_calls.ToolParser`); None when there are none.
        content: with tool_calls, the text less the calls.
    """

    usage: Usage = field(default_factory=Usage)
    error: str | None = None
    error_code: str | None = None
    context_token_ids: list[int] = field(default_factory=list)
    tool_calls: list[dict] | None = None
    content: str | None = None


@dataclass(slots=True)
class StepEvent:
    """What one engine step produced for one request.

    Attributes:
        uid: the request.
        agent_id: its agent.
        token: the new token id, or None (e.g. an EOS, or a finish without a token).
        text: the text this token completed (may be "" while a multi-byte char is pending).
        completion: set on the request's last event.
    """

    uid: int
    agent_id: str
    token: int | None
    text: str
    completion: Completion | None = None


def turn_options(*args, **kwargs) -> TurnOptions:
    """A turn's options (TurnOptions' fields, in its order) checked by the protocol's schema.

    Raises:
        InvalidRequestError: the first bad option.
    """
    try:
        return TurnOptions(*args, **kwargs)
    except ProtocolError as exc:
        raise InvalidRequestError(str(exc)) from None
