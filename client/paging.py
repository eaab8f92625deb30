"""Reading what a reply cannot hold at once (the agents' listing, an agent's token ids)
page by page, with no I/O: each reader is a generator that yields the next request as
`(message type, body)`, is sent that request's result, and returns the whole answer. Both
clients drive the same readers, `Client` with blocking calls, `AsyncClient` awaiting them.
"""

from __future__ import annotations

from collections.abc import Generator

from .errors import DaemonUnavailable
from .protocol import MessageType

Request = tuple[MessageType, dict]
Reader = Generator[Request, dict, object]

INSPECT_RETRIES = 8  # a turn that commits between pages: read the agent again


def agents() -> Reader:
    """Every agent the daemon knows (in memory or in its store)."""
    rows: list[dict] = []
    after = None
    while True:
        page = yield MessageType.AGENTS, ({} if after is None else {"after": after})
        rows += page["agents"]
        after = page.get("next")
        if not after:
            return rows


def inspect(agent_id: str) -> Reader:
    """One agent in detail, its `token_ids` read page by page.

    Raises:
        DaemonUnavailable: the agent changed between pages `INSPECT_RETRIES` times.
    """
    for _ in range(INSPECT_RETRIES):
        info = yield MessageType.INSPECT, {"agent_id": agent_id}
        tokens = info.get("token_ids")
        while tokens is not None and len(tokens) < info.get("tokens", 0):
            body = {"agent_id": agent_id, "token_offset": len(tokens)}
            page = yield MessageType.INSPECT, body
            if (page["tokens"], page.get("last_used")) != (info["tokens"], info.get("last_used")):
                break  # it changed: start again
            tokens += page["token_ids"]
        else:
            return info
    raise DaemonUnavailable(f"agent {agent_id!r} kept changing while it was read")
