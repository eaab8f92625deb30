"""What a turn shows: text deltas from its tokens, stop strings, and its completion.

Pure functions of a `Request` (they update its own text and token lists only); the
scheduler decides when a turn ends and what happens to its cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .requests import Completion, StepEvent, Usage

if TYPE_CHECKING:
    from .turns import Request


@dataclass(slots=True, frozen=True)
class TokenOutput:
    """One generated token as the turn shows it.

    Attributes:
        shown: the token for the step event, None for a final EOS (never rendered).
        delta: the text it completes, less anything held back for a stop string.
        stopped: a stop string ended the turn at this token.
    """

    shown: int | None
    delta: str
    stopped: bool


def take_token(req: Request, token: int, finish_reason: str | None, eos) -> TokenOutput:
    """Append a generated token to the turn's tokens and text.

    An EOS that ends the turn is not rendered nor counted in `generated` (as
    `mlx_lm.generate` yields); the last token of a turn flushes the detokenizer.
    """
    hit_eos = finish_reason == "stop" and token in eos
    delta = ""
    if not hit_eos:
        req.generated.append(token)
        req.detok.add_token(token)
        delta = req.detok.last_segment
    if finish_reason is not None and req.failure is None:
        req.detok.finalize()
        delta += req.detok.last_segment
    delta, stopped = apply_stop(req, delta, final=finish_reason is not None)
    req.text.append(delta)
    return TokenOutput(None if hit_eos else token, delta, stopped)


def apply_stop(req: Request, delta: str, *, final: bool) -> tuple[str, bool]:
    """Text to show now, and whether a stop string ended the turn.

    Text that could be the start of a stop string is held back, so no streamed delta ever
    shows part of one.
    """
    if not req.stop:
        return delta, False
    text = req.held + delta
    hits = [i for i in (text.find(s) for s in req.stop) if i >= 0]
    if hits:
        req.held = ""
        return text[: min(hits)], True
    if final:
        req.held = ""
        return text, False
    keep = max((k for s in req.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    req.held = text[len(text) - keep :]
    return text[: len(text) - keep], False


def completion(req: Request, reason: str) -> Completion:
    """The turn's completion as of now: its text, tokens, usage and finish reason."""
    adm = req.admission
    usage = Usage(
        prompt_tokens=len(adm.full_tokens) if adm else 0,
        cached_tokens=adm.cached_len if adm else 0,
        generated_tokens=len(req.generated),
        restored_tokens=adm.restored if adm else 0,
        recomputed_tokens=adm.recomputed if adm else 0,
        queue_ms=_ms(req.submitted, req.admitted),
        restore_ms=round(req.restore_ms, 3),
        prefill_ms=round(req.prefill_ms, 3),
        ttft_ms=_ms(req.submitted, req.first_token),
        total_ms=_ms(req.submitted, time.perf_counter()),
    )
    text = "".join(req.text)
    return Completion(req.uid, req.agent_id, text, list(req.generated), reason, usage)


def committed_completion(req: Request, reason: str, tokens: list[int]) -> Completion:
    """The completion of a turn whose sequence (`tokens`, all of it) became the context:
    it counts the final EOS too, and says what was appended to the context."""
    out = completion(req, reason)
    prompt = len(req.admission.full_tokens)
    out.usage.generated_tokens = len(tokens) - prompt
    out.context_token_ids = list(tokens[prompt:])
    if req.tool_parser is not None:
        found = req.tool_parser.parse(out.text, req.tools)
        if found is not None:
            out.tool_calls, out.content = found.calls, found.content
    return out


def error_completion(req: Request, exc: Exception) -> Completion:
    """The completion of a failed turn: finish_reason "error" with the error's code."""
    out = completion(req, "error")
    out.error = str(exc) or type(exc).__name__
    out.error_code = getattr(exc, "code", "internal")
    return out


def last_event(
    req: Request, done: Completion, token: int | None = None, delta: str = ""
) -> StepEvent:
    """The turn's last step event, carrying its completion."""
    return StepEvent(req.uid, req.agent_id, token, delta, done)


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1e3, 3) if start and end else 0.0
