"""The engine's records: sampling parameters, usage, completions and per-step events."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from agentkv.client.protocol import shown

from ..errors import InvalidRequestError

MAX_SEED = 2**63 - 1


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

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature, lo=0.0)
        _check_number("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_number("min_p", self.min_p, lo=0.0, hi=1.0, hi_open=True)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0, got {shown(self.top_k)}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidRequestError(
                f"seed must be an integer in [0, 2**63), got {shown(self.seed)}"
            )

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
class Completion:
    """A finished request.

    Attributes:
        uid: the id `submit` returned.
        agent_id: whose turn it was.
        text: the generated text (an EOS token is not rendered).
        token_ids: generated token ids, without a final EOS (as `mlx_lm.generate` yields).
        finish_reason: "stop" (EOS), "length" (max_tokens), "cancelled" or "error".
        usage: token counts and timings.
        error: message when finish_reason is "error".
        error_code: the error's stable code (see `agentkv.daemon.errors`).
        context_token_ids: the generated ids exactly as appended to the agent's context: a
            final EOS included when the turn ended on one (whichever of the model's EOS ids
            it was); empty when the context did not change (cancelled, error).
    """

    uid: int
    agent_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage = field(default_factory=Usage)
    error: str | None = None
    error_code: str | None = None
    context_token_ids: list[int] = field(default_factory=list)


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


def check_max_tokens(max_tokens: object) -> int:
    """Validate max_tokens: a positive integer."""
    if not _is_int(max_tokens) or max_tokens <= 0:
        raise InvalidRequestError(f"max_tokens must be an integer > 0, got {shown(max_tokens)}")
    return int(max_tokens)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_number(
    name: str,
    value: object,
    *,
    lo: float,
    hi: float = math.inf,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lo_b, hi_b = "(" if lo_open else "[", ")" if hi_open else "]"
        raise InvalidRequestError(
            f"{name} must be a number in {lo_b}{lo}, {hi}{hi_b}, got {shown(value)}"
        )
