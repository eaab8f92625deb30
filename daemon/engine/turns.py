"""One submitted turn inside the engine: its record, its explicit status, the table of
unfinished turns, and the check of the arguments `BlockPoolBatchEngine.submit` takes."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from ..errors import InvalidRequestError
from . import outputs
from .kv_cache_manager import Admission
from .prompts import EncodeJob, check_agent_id
from .requests import SamplingParams, StepEvent, turn_options
from .tool_calls import ToolParser

LogitsProcessor = Callable


class RequestStatus(enum.Enum):
    """Where a turn is in its life; every turn is in exactly one.

    ENCODING: its input is being tokenized on the encoder's thread.
    WAITING: queued for admission, behind its agent's earlier turns.
    RUNNING: admitted: in the batch, its pool room reserved.
    FINISHED: completed, cancelled or failed; its completion is built.
    """

    ENCODING = "encoding"
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    """A turn from `submit` to its completion (engine-thread only)."""

    uid: int
    agent_id: str
    max_tokens: int
    params: SamplingParams
    processors: list = field(default_factory=list)
    stop: tuple[str, ...] = ()
    status: RequestStatus = RequestStatus.WAITING
    new_tokens: list[int] | None = None  # appended to the context
    full_tokens: list[int] | None = None  # the whole conversation (prefix reuse)
    submitted: float = 0.0
    admitted: float = 0.0
    first_token: float = 0.0
    batch_uid: int = -1
    admission: Admission | None = None
    detok: object = None
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    restore_ms: float = 0.0
    prefill_ms: float = 0.0
    failure: Exception | None = None
    held: str = ""  # text held back while it could be the start of a stop string
    # A text prompt encoded as a later turn (no BOS) while earlier turns were queued: if
    # they are cancelled or fail, it is the agent's first turn after all, and this (its
    # encoding as a first turn) is used instead (see Scheduler admission).
    first_tokens: list[int] | None = None
    job: EncodeJob | None = None  # its input is being tokenized on the encoder's thread
    fewest: int = 0  # a lower bound on its input's tokens (what is known while encoding)
    chat: bool = False  # its input is a whole chat (replaces the context)
    tools: list[dict] | None = None  # given to the chat template with the chat
    tool_parser: ToolParser | None = None  # reads tool calls in its output (with tools)
    followed: bool = False  # a waiting turn needs its prompt's blocks (prefix_sharing)

    def mark_failed(self, exc: Exception) -> None:
        """Record the first failure of a sampler or logits processor (seen after the step)."""
        if self.failure is None:
            self.failure = exc


class TurnTable:
    """Every unfinished turn by uid; each one ends here, once, counted by how it ended.

    Args:
        counters: the engine's counters ("completed", "cancelled" and "errors").
    """

    def __init__(self, counters: dict[str, int]) -> None:
        self._by_uid: dict[int, Request] = {}
        self._counters = counters

    def __getitem__(self, uid: int) -> Request:
        return self._by_uid[uid]

    def __iter__(self) -> Iterator[int]:
        return iter(self._by_uid)

    def get(self, uid: int) -> Request | None:
        """The unfinished turn `uid`, or None."""
        return self._by_uid.get(uid)

    def add(self, req: Request) -> None:
        """Track a new turn."""
        self._by_uid[req.uid] = req

    def end(self, req: Request, how: str) -> None:
        """Forget a turn that ended ("completed", "cancelled" or "errors")."""
        self._by_uid.pop(req.uid, None)
        req.status = RequestStatus.FINISHED
        self._counters[how] += 1

    def fail(self, req: Request, exc: Exception) -> StepEvent:
        """End a turn with finish_reason "error"; its last event carries the completion."""
        self.end(req, "errors")
        return outputs.last_event(req, outputs.error_completion(req, exc))


def checked_request(
    uid: int,
    agent_id: str,
    max_tokens: int,
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float,
    seed: int | None,
    logits_processors: Sequence[LogitsProcessor] | None,
    stop: Sequence[str] | None,
    submitted: float,
) -> Request:
    """A new turn from `submit`'s arguments, every one checked (its input comes later).

    Raises:
        InvalidRequestError: a bad agent id, max_tokens, sampling parameter, logits
            processor or stop string.
    """
    check_agent_id(agent_id)
    options = turn_options(max_tokens, temperature, top_p, top_k, min_p, seed, stop)
    return Request(
        uid=uid,
        agent_id=agent_id,
        max_tokens=options.max_tokens,
        params=SamplingParams.of(options),
        processors=_check_processors(logits_processors),
        stop=options.stop,
        submitted=submitted,
    )


def _check_processors(processors) -> list:
    if processors is None:
        return []
    if isinstance(processors, (str, bytes)) or not isinstance(processors, Sequence):
        raise InvalidRequestError("logits_processors must be a list of callables")
    if not all(callable(p) for p in processors):
        raise InvalidRequestError("every logits processor must be callable")
    return list(processors)
