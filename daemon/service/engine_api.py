"""What the command layer needs of an engine and its store: the seam between the
service (requests, clients, replies) and the engine (MLX, the pool, the batch).

`BlockPoolBatchEngine` implements `Engine`; CommandHandler depends on this interface only,
so its own logic (validation, error codes, routing, paging, durability holds) is tested
against a small fake engine (tests/test_commands.py), and a second engine could serve
the same commands. No MLX here: these are types only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..engine.requests import StepEvent


class AgentRecord(Protocol):
    """One agent as `agent_info` reports it: a slots record whose every field goes into
    the `agents` and `inspect` replies (see `BlockPoolBatchEngine.AgentInfo`)."""

    __slots__: Sequence[str]
    agent_id: str
    tokens: int


class EngineSpec(Protocol):
    """The model facts the command layer reads."""

    fingerprint: str | None


class EngineStore(Protocol):
    """The engine's persistent store, as the command layer waits on it."""

    counters: dict

    def is_settled(self, agent_id: str) -> bool:
        """True once nothing of the agent is queued for writing (written, or failed)."""
        ...

    def unsaved(self, agent_id: str, fingerprint: str | None) -> object | None:
        """Why the agent's latest write failed, or None when it is on disk."""
        ...

    def stats(self) -> dict:
        """The store's totals (counted over its index)."""
        ...


class Engine(Protocol):
    """The engine the command layer drives, on the one thread that owns it."""

    store: EngineStore | None
    spec: EngineSpec

    @property
    def has_work(self) -> bool:
        """Turns queued, tokenizing or running."""
        ...

    @property
    def can_step(self) -> bool:
        """A step could make progress now (not only waiting for tokenizing)."""
        ...

    def submit(
        self,
        agent_id: str,
        prompt: str | Sequence[int] | None = None,
        max_tokens: int = ...,
        *,
        messages: Sequence[dict] | None = None,
        temperature: float = ...,
        top_p: float = ...,
        top_k: int = ...,
        min_p: float = ...,
        seed: int | None = ...,
        stop: Sequence[str] | None = None,
        tools: list[dict] | None = None,
    ) -> int:
        """Queue a turn; its uid. Raises AgentKVError subclasses (typed codes)."""
        ...

    def is_encoding(self, uid: int) -> bool:
        """The turn's input is still being tokenized (its submit not answered yet)."""
        ...

    def step_once(self) -> list[StepEvent]:
        """One scheduling step's events (tokens, text, completions)."""
        ...

    def cancel(self, uid: int) -> bool:
        """Cancel a turn; False if it had finished."""
        ...

    def close(self) -> list[dict] | None:
        """Stop and flush the store; the agents not durable."""
        ...

    def agent_ids(self) -> Iterable[str]:
        """Every agent, in memory or stored."""
        ...

    def agent_info(self, agent_id: str) -> AgentRecord:
        """One agent's record. Raises UnknownAgentError."""
        ...

    def agent_snapshot(self, agent_id: str) -> tuple[AgentRecord, list[int]]:
        """One agent's record and its token ids. Raises UnknownAgentError."""
        ...

    def delete_agent(self, agent_id: str) -> None:
        """Forget an agent (its store delete queued). Raises UnknownAgentError."""
        ...

    def finish_delete(self, agent_id: str) -> str | None:
        """After the store settled a delete: None when it is on disk, else why not."""
        ...

    def fork_agent(self, agent_id: str, new_agent_id: str) -> None:
        """Branch an agent under a new id."""
        ...

    def stats(self) -> dict:
        """Engine counters and pool use."""
        ...

    def unsaved_report(self) -> list[dict]:
        """Agents whose latest turns are not on disk."""
        ...
