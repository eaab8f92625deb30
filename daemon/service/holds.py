"""What the command layer holds back until the store has it on disk: a finished turn's
final event, released once its agent has nothing left to write (with `durable` saying
whether its latest write landed), and a `delete`'s reply, sent once the delete is on disk
(or failed: then a `store_write` error, and the agent is still stored). So a turn or a
delete a client has seen done survives a crash of the daemon.

A failed write settles too (the store logs and counts it): the turn is reported, served
from memory, and its agent rewritten at its next turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agentkv.client import protocol

from .engine_api import Engine
from .mailboxes import Mailboxes


@dataclass(slots=True, frozen=True)
class _HeldTurn:
    identity: bytes
    uid: int
    agent_id: str
    final: dict  # the final event's fields


@dataclass(slots=True, frozen=True)
class _HeldDelete:
    identity: bytes
    rid: object  # the delete's request id
    agent_id: str


class DurabilityHolds:
    """Finished turns and deletes waiting for the store (see the module docstring).

    Args:
        engine: the engine, whose `store` says what is settled.
        mail: the clients' mailboxes, where released final events go.
        send: sends (identity, type, header) back through the I/O thread.
    """

    def __init__(self, engine: Engine, mail: Mailboxes, send: Callable) -> None:
        self.engine = engine
        self._mail = mail
        self._send = send
        self._turns: list[_HeldTurn] = []
        self._deletes: list[_HeldDelete] = []

    def __bool__(self) -> bool:
        return bool(self._turns or self._deletes)

    def hold_turn(self, identity: bytes, uid: int, agent_id: str, final: dict) -> None:
        """A finished turn: its final event goes out once its agent is settled."""
        self._turns.append(_HeldTurn(identity, uid, agent_id, final))
        self._release_turns()

    def hold_delete(self, identity: bytes, rid, agent_id: str) -> None:
        """A delete queued on the store: answered once it is on disk."""
        self._deletes.append(_HeldDelete(identity, rid, agent_id))
        self._answer_deletes()

    def holds_turn(self, identity: bytes, uid: int) -> bool:
        """The client's turn `uid` finished and its final event is held here."""
        return any(t.identity == identity and t.uid == uid for t in self._turns)

    def release(self) -> None:
        """Send what the store has settled since the last call."""
        if self._turns:
            self._release_turns()
        if self._deletes:
            self._answer_deletes()

    def fail_turns(self, error: dict) -> None:
        """End every held turn with `error` (after a failed step: whether it was written
        is unknown)."""
        held, self._turns = self._turns, []
        for t in held:
            failed = {**t.final, "finish_reason": "error", "error": error}
            self._mail.deliver(t.identity, t.uid, t.agent_id, failed)

    def _release_turns(self) -> None:
        store = self.engine.store
        waiting = []
        for t in self._turns:
            if store is not None and not store.is_settled(t.agent_id):
                waiting.append(t)
                continue
            t.final["durable"] = self._is_durable(t.agent_id)
            self._mail.deliver(t.identity, t.uid, t.agent_id, t.final)
        self._turns = waiting

    def _is_durable(self, agent_id: str) -> bool:
        """True if the agent's latest write landed (its context is on disk as it is now)."""
        store = self.engine.store
        return store is not None and store.unsaved(agent_id, self.engine.spec.fingerprint) is None

    def _answer_deletes(self) -> None:
        store = self.engine.store
        waiting = []
        for d in self._deletes:
            if not store.is_settled(d.agent_id):
                waiting.append(d)
                continue
            why = self.engine.finish_delete(d.agent_id)
            if why is None:
                result = {"deleted": True, "durable": True}
                self._send(d.identity, *protocol.reply(d.rid, result))
            else:
                message = (
                    f"agent {d.agent_id!r} could not be deleted on disk ({why}): kept as it was"
                )
                self._send(d.identity, *protocol.error(d.rid, "store_write", message))
        self._deletes = waiting
