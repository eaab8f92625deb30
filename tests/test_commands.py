"""CommandHandler's own logic against a small fake engine (no model, no sockets).

What is checked here is the command layer alone: requests checked by the protocol's
SubmitRequest before the engine sees them, engine errors mapped to the protocol's codes,
events routed to the client that owns the turn and held until the store has the turn,
cancel and delete paths, paging of `agents` and `inspect`, the size bound of a step reply,
the bounds on turns not finished, shutdown and forgetting silent clients. The real engine
behind the same interface is exercised by the daemon integration tests.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from agentkv.client import protocol
from agentkv.client.protocol import SUBMIT_DEFAULTS, Message, MessageType
from agentkv.daemon.engine.requests import Completion, StepEvent, Usage
from agentkv.daemon.errors import (
    InvalidRequestError,
    PoolExhaustedError,
    UnknownAgentError,
    UnsupportedModelError,
)
from agentkv.daemon.service import commands, mailboxes, queries
from agentkv.daemon.service.commands import CommandHandler
from agentkv.daemon.service.engine_api import Engine

A, B = b"client-a", b"client-b"


@dataclass(slots=True)
class FakeInfo:
    agent_id: str
    tokens: int
    state: str = "in memory"


class FakeStore:
    """Settles an agent's writes when told to; `failed` names agents whose write failed."""

    def __init__(self) -> None:
        self.pending: set[str] = set()
        self.failed: dict[str, str] = {}
        self.delete_errors: dict[str, str] = {}
        self.counters = {"writes": 0}
        self.stats_calls = 0

    def is_settled(self, agent_id: str) -> bool:
        return agent_id not in self.pending

    def unsaved(self, agent_id: str, fingerprint):
        return self.failed.get(agent_id)

    def stats(self) -> dict:
        self.stats_calls += 1
        return {"blocks": 3}


class FakeEngine:
    """The `Engine` interface over plain dicts: turns run only when a test finishes them."""

    def __init__(self, store: FakeStore | None = None) -> None:
        self.store = store
        self.spec = SimpleNamespace(fingerprint="fp")
        self.contexts: dict[str, list[int]] = {}
        self.running: dict[int, str] = {}  # uid -> agent id
        self.submits: list[dict] = []
        self.encoding: set[int] = set()
        self.events: list[StepEvent] = []
        self.refuse: Exception | None = None
        self.unsaved: list[dict] = []
        self.closed = False
        self._uid = 0

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.events or self.encoding)

    @property
    def can_step(self) -> bool:
        return bool(self.events)

    def submit(self, agent_id, prompt=None, max_tokens=256, *, messages=None, **options) -> int:
        if self.refuse is not None:
            raise self.refuse
        self._uid += 1
        self.submits.append(
            {
                "agent_id": agent_id,
                "prompt": prompt,
                "messages": messages,
                "max_tokens": max_tokens,
                **options,
            }
        )
        self.running[self._uid] = agent_id
        self.contexts.setdefault(agent_id, [])
        return self._uid

    def is_encoding(self, uid: int) -> bool:
        return uid in self.encoding

    def step_once(self) -> list[StepEvent]:
        events, self.events = self.events, []
        return events

    def cancel(self, uid: int) -> bool:
        if uid not in self.running:
            return False
        self.finish(uid, [], reason="cancelled")
        return True

    def close(self) -> list[dict]:
        self.closed = True
        return self.unsaved

    def agent_ids(self) -> list[str]:
        return list(self.contexts)

    def agent_info(self, agent_id: str) -> FakeInfo:
        if agent_id not in self.contexts:
            raise UnknownAgentError(f"unknown agent {agent_id!r}")
        return FakeInfo(agent_id, len(self.contexts[agent_id]))

    def agent_snapshot(self, agent_id: str) -> tuple[FakeInfo, list[int]]:
        return self.agent_info(agent_id), list(self.contexts[agent_id])

    def delete_agent(self, agent_id: str) -> None:
        self.agent_info(agent_id)
        del self.contexts[agent_id]
        if self.store is not None:
            self.store.pending.add(agent_id)

    def finish_delete(self, agent_id: str) -> str | None:
        return self.store.delete_errors.get(agent_id)

    def fork_agent(self, agent_id: str, new_agent_id: str) -> None:
        self.contexts[new_agent_id] = list(self.agent_snapshot(agent_id)[1])

    def stats(self) -> dict:
        return {"agents": len(self.contexts)}

    def unsaved_report(self) -> list[dict]:
        return self.unsaved

    # -- test controls -----------------------------------------------------------------

    def finish(self, uid: int, tokens: list[int], *, reason: str = "stop", error=None) -> None:
        """The turn's token events and its completion, for the next step."""
        agent_id = self.running.pop(uid)
        for t in tokens:
            self.events.append(StepEvent(uid, agent_id, t, f"<{t}>"))
        if reason != "cancelled" and error is None:
            self.contexts[agent_id] += tokens
            if self.store is not None:
                self.store.pending.add(agent_id)
        code = getattr(error, "code", None)
        message = None if error is None else str(error)
        done = Completion(uid, agent_id, "", tokens, reason, Usage(), message, code, tokens)
        self.events.append(StepEvent(uid, agent_id, None, "", done))


class Harness:
    """A CommandHandler on a fake engine; `sent` collects its replies by client."""

    def __init__(self, store: FakeStore | None = None, **kwargs) -> None:
        self.engine = FakeEngine(store)
        self.sent: list[tuple[bytes, MessageType, dict]] = []
        self.handler = CommandHandler(self.engine, self._send, {"pid": 1}, **kwargs)
        self._rid = 0

    def _send(self, identity: bytes, kind: MessageType, header: dict) -> None:
        self.sent.append((identity, kind, header))

    def request(self, identity: bytes, kind: MessageType, body: dict, **envelope):
        """Send one request; its reply's header (None when it is held)."""
        self._rid += 1
        header = protocol.request_header(self._rid, body, envelope.get("session"))
        header.update({k: v for k, v in envelope.items() if k != "session"})
        before = len(self.sent)
        self.handler.handle(identity, Message(kind, header), nbytes=100)
        replies = [h for i, _, h in self.sent[before:] if h.get("id") == self._rid]
        return replies[-1] if replies else None

    def ok(self, identity: bytes, kind: MessageType, body: dict, **envelope):
        reply = self.request(identity, kind, body, **envelope)
        assert reply is not None and reply["ok"], reply
        return reply["result"]

    def code(self, identity: bytes, kind: MessageType, body: dict) -> str:
        reply = self.request(identity, kind, body)
        assert reply is not None and not reply["ok"], reply
        return reply["error"]["code"]

    def step(self, identity: bytes, timeout: float = 0) -> list[dict]:
        return self.ok(identity, MessageType.STEP, {"timeout": timeout})["events"]


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_the_fake_engine_implements_the_interface_the_real_engine_does():
    """The fake and BlockPoolBatchEngine both have every method of `Engine`, with the
    parameters the command layer passes."""
    from agentkv.daemon.engine.batch_engine import BlockPoolBatchEngine

    names = [n for n, v in vars(Engine).items() if not n.startswith("_") and callable(v)]
    assert {"submit", "step_once", "cancel", "agent_info", "finish_delete"} <= set(names)
    for cls in (FakeEngine, BlockPoolBatchEngine):
        for name in names:
            assert callable(getattr(cls, name, None)), (cls, name)
    wanted = inspect.signature(Engine.submit).parameters
    real = inspect.signature(BlockPoolBatchEngine.submit).parameters
    assert set(wanted) <= set(real)
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed"):
        assert real[name].default == getattr(SUBMIT_DEFAULTS, name), name


def test_submit_passes_the_schema_defaults_and_the_one_input(h):
    uid = h.ok(A, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "hi"})["uid"]
    assert uid == 1
    sub = h.engine.submits[-1]
    assert (sub["agent_id"], sub["prompt"], sub["messages"]) == ("a1", "hi", None)
    assert sub["max_tokens"] == SUBMIT_DEFAULTS.max_tokens == 256
    assert (sub["temperature"], sub["top_p"], sub["top_k"], sub["min_p"]) == (0.0, 1.0, 0, 0.0)
    assert sub["seed"] is None and sub["stop"] == []
    h.ok(A, MessageType.SUBMIT, {"agent_id": "a1", "tokens": [1, 2], "stop": "x", "seed": 7})
    assert h.engine.submits[-1]["prompt"] == [1, 2]
    assert (h.engine.submits[-1]["stop"], h.engine.submits[-1]["seed"]) == (["x"], 7)
    chat = [{"role": "user", "content": "hi"}]
    h.ok(A, MessageType.SUBMIT, {"agent_id": "a1", "messages": chat, "prompt": None})
    assert (h.engine.submits[-1]["prompt"], h.engine.submits[-1]["messages"]) == (None, chat)


def test_envelope_fields_are_not_request_fields(h):
    """`session`, `nonce` and `ts` belong to the envelope: accepted beside any body; an
    unknown body field is refused before the engine sees the request."""
    body = {"agent_id": "a1", "prompt": "hi"}
    h.ok(A, MessageType.SUBMIT, body, session="s", nonce="n", ts=1.0)
    assert h.code(A, MessageType.SUBMIT, {**body, "temprature": 0.5}) == "invalid_request"
    assert len(h.engine.submits) == 1
    with pytest.raises(ValueError, match="envelope"):
        protocol.request_header(1, {**body, "id": 2})


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi"},  # no agent id
        {"agent_id": "-bad", "prompt": "hi"},
        {"agent_id": "a1"},  # no input
        {"agent_id": "a1", "prompt": "hi", "tokens": [1]},  # two inputs
        {"agent_id": "a1", "prompt": [1, 2]},
        {"agent_id": "a1", "tokens": "hi"},
        {"agent_id": "a1", "messages": {"role": "user"}},
        {"agent_id": "a1", "prompt": "hi", "max_tokens": 0},
        {"agent_id": "a1", "prompt": "hi", "max_tokens": None},
        {"agent_id": "a1", "prompt": "hi", "max_tokens": True},
        {"agent_id": "a1", "prompt": "hi", "temperature": -1.0},
        {"agent_id": "a1", "prompt": "hi", "top_p": 0.0},
        {"agent_id": "a1", "prompt": "hi", "min_p": 1.0},
        {"agent_id": "a1", "prompt": "hi", "top_k": -1},
        {"agent_id": "a1", "prompt": "hi", "seed": 2**63},
        {"agent_id": "a1", "prompt": "hi", "stop": [""]},
        {"agent_id": "a1", "prompt": "hi", "stop": ["s"] * 17},
    ],
)
def test_bad_submits_are_invalid_requests_the_engine_never_sees(h, body):
    assert h.code(A, MessageType.SUBMIT, body) == "invalid_request"
    assert h.engine.submits == []
    h.ok(A, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "hi"})  # the next one runs


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequestError("prompt is empty"), "invalid_request"),
        (PoolExhaustedError(9, 1), "pool_exhausted"),
        (UnknownAgentError("x"), "unknown_agent"),
        (UnsupportedModelError("not a protocol code"), "internal"),
        (RuntimeError("bug"), "internal"),
    ],
)
def test_engine_errors_map_to_protocol_codes(h, error, code):
    """An engine error's code when the protocol knows it, else `internal`; the request
    fails alone and the handler goes on."""
    h.engine.refuse = error
    reply = h.request(A, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "hi"})
    assert reply["error"]["code"] == code and str(error) in reply["error"]["message"]
    h.engine.refuse = None
    h.ok(A, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "hi"})


def test_events_go_to_their_client_and_wait_for_the_store():
    """Tokens reach the client that submitted the turn; the final event waits until the
    store holds the turn, and says whether it is durable."""
    store = FakeStore()
    h = Harness(store)
    ua = h.ok(A, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "hi"})["uid"]
    ub = h.ok(B, MessageType.SUBMIT, {"agent_id": "b1", "prompt": "hi"})["uid"]
    h.engine.finish(ua, [5, 6])
    h.engine.finish(ub, [7], reason="length")
    h.handler.run_step()
    (ev,) = h.step(A)
    assert (ev["uid"], ev["token_ids"], ev["text"]) == (ua, [5, 6], "<5><6>")
    assert "finish_reason" not in ev  # a1's write is pending
    store.failed["b1"] = "disk full"
    store.pending.clear()
    h.handler.run_step()
    (ev,) = h.step(A)
    assert (ev["finish_reason"], ev["durable"], ev["context_token_ids"]) == ("stop", True, [5, 6])
    (ev,) = h.step(B)
    assert (ev["token_ids"], ev["finish_reason"], ev["durable"]) == ([7], "length", False)
    assert h.step(A) == []


def test_a_parked_step_is_answered_when_its_turn_finishes(h):
    uid = h.ok(A, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "hi"})["uid"]
    assert h.request(A, MessageType.STEP, {"timeout": 30}) is None  # parked
    h.engine.finish(uid, [1])
    h.handler.run_step()
    identity, kind, header = h.sent[-1]
    assert (identity, kind) == (A, MessageType.REPLY)
    assert header["result"]["events"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "body",
    [{"timeout": -1}, {"timeout": "1"}, {"timeout": float("nan")}, {"interval": 11}],
)
def test_bad_step_arguments_are_invalid_requests(h, body):
    assert h.code(A, MessageType.STEP, body) == "invalid_request"


def test_cancel_only_reaches_the_clients_own_running_turns(h):
    uid = h.ok(A, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "hi"})["uid"]
    assert h.code(B, MessageType.CANCEL, {"uid": uid}) == "unknown_request"
    assert h.code(A, MessageType.CANCEL, {"uid": "1"}) == "unknown_request"
    assert h.code(A, MessageType.CANCEL, {"uid": 99}) == "unknown_request"
    assert h.ok(A, MessageType.CANCEL, {"uid": uid}) == {"cancelled": True}
    h.handler.run_step()
    # Finished (cancelled) but not collected: a second cancel loses the race, not an error.
    assert h.ok(A, MessageType.CANCEL, {"uid": uid}) == {"cancelled": False}
    (ev,) = h.step(A)
    assert ev["finish_reason"] == "cancelled"
    assert h.code(A, MessageType.CANCEL, {"uid": uid}) == "unknown_request"


def test_agents_are_paged_by_id(h):
    h.engine.contexts = {f"ag{i:02d}": [0] * i for i in range(10)}
    page = h.ok(A, MessageType.AGENTS, {"limit": 4})
    assert [r["agent_id"] for r in page["agents"]] == ["ag00", "ag01", "ag02", "ag03"]
    assert page["agents"][2] == {"agent_id": "ag02", "tokens": 2, "state": "in memory"}
    rest = h.ok(A, MessageType.AGENTS, {"after": page["next"], "limit": 10})
    assert [r["agent_id"] for r in rest["agents"]] == [f"ag{i:02d}" for i in range(4, 10)]
    assert rest["next"] is None
    for bad in ({"after": 3}, {"limit": 0}, {"limit": queries.AGENTS_PAGE + 1}):
        assert h.code(A, MessageType.AGENTS, bad) == "invalid_request"


def test_an_agent_gone_while_listed_is_skipped(h, monkeypatch):
    h.engine.contexts = {"a": [], "b": [], "c": []}
    monkeypatch.setattr(h.engine, "agent_ids", lambda: ["a", "b", "c", "gone"])
    page = h.ok(A, MessageType.AGENTS, {})
    assert [r["agent_id"] for r in page["agents"]] == ["a", "b", "c"]


def test_inspect_pages_token_ids(h, monkeypatch):
    monkeypatch.setattr(queries, "INSPECT_PAGE_TOKENS", 4)
    h.engine.contexts["a1"] = list(range(10))
    first = h.ok(A, MessageType.INSPECT, {"agent_id": "a1"})
    assert (first["tokens"], first["token_ids"], first["token_offset"]) == (10, [0, 1, 2, 3], 0)
    page = h.ok(A, MessageType.INSPECT, {"agent_id": "a1", "token_offset": 8, "token_limit": 3})
    assert page["token_ids"] == [8, 9]
    assert h.code(A, MessageType.INSPECT, {"agent_id": "nobody"}) == "unknown_agent"
    assert h.code(A, MessageType.INSPECT, {"agent_id": "../x"}) == "invalid_request"
    bad = {"agent_id": "a1", "token_offset": -1}
    assert h.code(A, MessageType.INSPECT, bad) == "invalid_request"


def test_delete_without_a_store_answers_at_once(h):
    h.engine.contexts["a1"] = [1]
    assert h.ok(A, MessageType.DELETE, {"agent_id": "a1"}) == {"deleted": True, "durable": False}
    assert h.code(A, MessageType.DELETE, {"agent_id": "a1"}) == "unknown_agent"


def test_delete_with_a_store_answers_once_settled_or_reports_the_write_error():
    store = FakeStore()
    h = Harness(store)
    h.engine.contexts.update({"a1": [1], "a2": [2]})
    assert h.request(A, MessageType.DELETE, {"agent_id": "a1"}) is None  # held
    h.handler.run_step()
    assert h.sent == []
    store.pending.clear()
    h.handler.run_step()
    assert h.sent[-1][2]["result"] == {"deleted": True, "durable": True}
    store.delete_errors["a2"] = "read-only"
    assert h.request(A, MessageType.DELETE, {"agent_id": "a2"}) is None
    store.pending.clear()
    h.handler.run_step()
    reply = h.sent[-1][2]
    assert reply["error"]["code"] == "store_write" and "read-only" in reply["error"]["message"]


def test_fork_returns_the_new_agent(h):
    h.engine.contexts["src"] = [1, 2, 3]
    info = h.ok(A, MessageType.FORK, {"agent_id": "src", "new_agent_id": "dst"})
    assert info == {"agent_id": "dst", "tokens": 3, "state": "in memory"}
    assert h.code(A, MessageType.FORK, {"agent_id": "src", "new_agent_id": ""}) == (
        "invalid_request"
    )


def test_stats_merge_info_engine_and_cached_store_totals():
    store = FakeStore()
    h = Harness(store)
    stats = h.ok(A, MessageType.STATS, {})
    assert (stats["pid"], stats["agents"], stats["clients"]) == (1, 0, 0)
    assert stats["store"] == {"blocks": 3, "writes": 0} and stats["unsaved"] == []
    h.ok(A, MessageType.STATS, {})
    assert store.stats_calls == 1  # nothing written since: the totals are not recounted


def test_a_step_reply_carries_at_most_its_share_of_events(h, monkeypatch):
    """Events beyond STEP_REPLY_BYTES wait for the next step (always one at least)."""
    monkeypatch.setattr(mailboxes, "STEP_REPLY_BYTES", 3000)
    uids = [
        h.ok(A, MessageType.SUBMIT, {"agent_id": f"a{i}", "prompt": "x"})["uid"] for i in range(4)
    ]
    for uid in uids:
        h.engine.finish(uid, list(range(200)))  # ~1,000 bytes of ids and 512 for the rest
    h.handler.run_step()
    got = []
    while len(got) < 4:
        events = h.step(A)
        assert 1 <= len(events) <= 2, len(events)
        got += events
    assert [e["uid"] for e in got] == uids
    assert h.step(A) == []


def test_turns_not_finished_are_bounded_per_client(h, monkeypatch):
    monkeypatch.setattr(mailboxes, "MAX_TURNS_PER_CLIENT", 2)
    for _ in range(2):
        h.ok(A, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "hi"})
    assert h.code(A, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "hi"}) == "overloaded"
    h.ok(B, MessageType.SUBMIT, {"agent_id": "b1", "prompt": "hi"})  # another client's room
    h.engine.finish(1, [1])
    h.handler.run_step()
    h.ok(A, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "hi"})  # room again


def test_a_submit_being_tokenized_is_answered_when_done_or_with_its_error(h):
    h.engine.encoding.add(1)
    assert h.request(A, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "long"}) is None
    h.handler.run_step()
    assert h.sent == []
    h.engine.encoding.clear()
    h.handler.run_step()
    assert h.sent[-1][2]["result"] == {"uid": 1}
    h.engine.encoding.add(2)
    assert h.request(A, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "bad"}) is None
    h.engine.finish(2, [], reason="error", error=InvalidRequestError("no tokens"))
    h.handler.run_step()
    header = h.sent[-1][2]
    assert header["error"] == {"code": "invalid_request", "message": "no tokens"}
    assert h.step(A) == []  # the refused turn left no event behind


def test_shutdown_refuses_new_turns_and_reports_unsaved_agents(h):
    h.engine.unsaved = [{"agent_id": "a1", "behind_tokens": 3, "error": "disk full"}]
    rid = 500  # not one of the harness's ids
    assert h.handler.handle(A, Message(MessageType.SHUTDOWN, {"id": rid, "wait": True})) is True
    assert h.code(B, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "hi"}) == "engine_closed"
    assert h.handler.drained()
    h.handler.finish_shutdown()
    identity, _, header = next(s for s in h.sent if s[2]["id"] == rid)
    assert identity == A and h.engine.closed
    assert header["result"] == {"shutting_down": True, "stopped": True, "unsaved": h.engine.unsaved}


def test_shutdown_with_cancel_cancels_running_turns(h):
    uid = h.ok(A, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "hi"})["uid"]
    h.handler.handle(A, Message(MessageType.SHUTDOWN, {"id": 50, "cancel": True}))
    assert h.sent[-1][2]["result"] == {"shutting_down": True}
    h.handler.run_step()
    (ev,) = h.step(A)
    assert (ev["uid"], ev["finish_reason"]) == (uid, "cancelled")


def test_fail_all_ends_every_turn_with_an_internal_error(h):
    uid = h.ok(A, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "hi"})["uid"]
    h.handler.fail_all(RuntimeError("step broke"))
    (ev,) = h.step(A)
    assert (ev["uid"], ev["finish_reason"]) == (uid, "error")
    assert ev["error"] == {"code": "internal", "message": "RuntimeError: step broke"}


def test_a_silent_client_is_forgotten_after_its_ttl(monkeypatch):
    clock = [1000.0]
    fake_time = SimpleNamespace(monotonic=lambda: clock[0], time=lambda: 0)
    for module in (commands, mailboxes):
        monkeypatch.setattr(module, "time", fake_time)
    h = Harness(client_ttl=60.0)
    uid = h.ok(A, MessageType.SUBMIT, {"agent_id": "a1", "prompt": "hi"})["uid"]
    h.engine.finish(uid, [1])
    h.handler.run_step()  # finished, never collected
    clock[0] += 30
    h.handler.run_step()
    assert h.ok(A, MessageType.STATS, {})["clients"] == 1
    clock[0] += 61
    h.handler.run_step()
    stats = h.ok(B, MessageType.STATS, {})
    assert (stats["clients"], stats["expired_clients"]) == (0, 1)
