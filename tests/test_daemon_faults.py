"""Unexpected errors inside the daemon's engine thread: the affected turns fail with a
typed error event, the traceback is logged, and the daemon serves on.

The daemon runs in this process (`DaemonServer` on a thread, real ROUTER socket, real
engine and model built by the daemon's own `_make_engine`) over a real store on disk whose
reads or settle checks fail with EIO on demand: a disk fault the engine does not expect.
"""

from __future__ import annotations

import errno
import logging
import threading
import time

import numpy as np
import pytest
from refs import eos_ids, random_tokens, scratch_tokens

from agentkv.client import Client, protocol
from agentkv.daemon.service.process import DaemonOptions, _make_engine
from agentkv.daemon.service.server import DaemonServer
from agentkv.storage import CacheStore

VOCAB = 768
BLOCK = 16


class FaultyStore(CacheStore):
    """A real CacheStore; while `fail_reads` is set, reading block files raises EIO, and
    the next `fail_settles` settle checks do too."""

    fail_reads = False
    fail_settles = 0

    def read_blocks_into(self, *args, **kwargs):
        if self.fail_reads:
            raise OSError(errno.EIO, "Input/output error (injected)")
        return super().read_blocks_into(*args, **kwargs)

    def is_settled(self, agent_id: str) -> bool:
        if self.fail_settles:
            self.fail_settles -= 1
            raise OSError(errno.EIO, "Input/output error (injected)")
        return super().is_settled(agent_id)


class InProcessDaemon:
    """A DaemonServer on a thread of this process over `store_dir`, with a FaultyStore."""

    def __init__(self, model_dir, store_dir, endpoint: str) -> None:
        opts = DaemonOptions(
            model=str(model_dir),
            store=store_dir,
            socket=endpoint,
            block_size=BLOCK,
            pool_blocks=96,
        )
        self.endpoint = endpoint
        self._stores: list[FaultyStore] = []
        info = {"pid": 0, "socket": endpoint}
        self.server = DaemonServer(
            lambda: _make_engine(opts, info, self._make_store), endpoint, info=info
        )
        ready = threading.Event()
        self._thread = threading.Thread(target=self.server.serve, kwargs={"ready": ready.set})
        self._thread.start()
        assert ready.wait(60), "the in-process daemon did not start"

    def _make_store(self, root, **kw) -> FaultyStore:
        self._stores.append(FaultyStore(root, **kw))
        return self._stores[0]

    @property
    def store(self) -> FaultyStore:
        """The daemon's store (fault switches only: it belongs to the engine thread)."""
        return self._stores[0]

    def stop(self) -> None:
        """Drain and stop, as SIGTERM does; the engine thread closes the store."""
        self.server.request_shutdown()
        self._thread.join(30)
        assert not self._thread.is_alive()


@pytest.fixture
def serve(model_dirs, tmp_path):
    """`serve()` -> a new InProcessDaemon over tmp_path/store (the previous one stopped
    first: one daemon per store); every one is stopped at the end."""
    made: list[InProcessDaemon] = []

    def start() -> InProcessDaemon:
        if made:
            made[-1].stop()
        made.append(
            InProcessDaemon(model_dirs["llama"], tmp_path / "store", f"ipc://{tmp_path}/d.sock")
        )
        return made[-1]

    yield start
    made[-1].stop()


def test_a_failed_restore_fails_that_turn_only(serve, loaded_models, caplog):
    """EIO while restoring an agent from disk: its turn ends with finish_reason "error"
    and code "internal" (a protocol code), others are served, and the agent's next turn
    recomputes its context and continues exactly."""
    model, tokenizer = loaded_models["llama"]
    eos = eos_ids(tokenizer)
    rng = np.random.default_rng(3)
    prompts = {a: random_tokens(rng, 40, VOCAB) for a in ("sick", "well")}
    d = serve()
    with Client(d.endpoint, timeout=30.0) as c:
        for agent, prompt in prompts.items():
            c.generate(agent, prompt, max_tokens=4)
        contexts = {a: c.inspect(a)["token_ids"] for a in prompts}
    d = serve()  # a second daemon over the same store: the agents are only on disk now
    store = d.store
    store.fail_reads = True
    with Client(d.endpoint, timeout=30.0) as c, caplog.at_level(logging.ERROR):
        uid = c.submit("sick", [5, 6], max_tokens=4)
        final = _final(c, uid)
        assert final.finish_reason == "error", final
        assert final.error["code"] == "internal" and final.error["code"] in protocol.ERRORS
        assert "Input/output error" in final.error["message"]
        assert "admission failed" in caplog.text and "Traceback" in caplog.text

        store.fail_reads = False
        well = c.generate("well", [7, 8], max_tokens=4)
        assert well.usage["restored_tokens"] == len(contexts["well"])
        again = c.generate("sick", [5, 6], max_tokens=4)
        assert again.usage["recomputed_tokens"] == len(contexts["sick"])
        assert again.token_ids == scratch_tokens(model, contexts["sick"] + [5, 6], 4, eos=eos)
        assert c.stats()["errors"] == 1


def test_an_error_in_a_step_fails_the_requests_in_flight_and_serving_goes_on(serve, caplog):
    """EIO from the store while a finished turn waits to be durable breaks a whole step:
    that turn, and every other request in flight, ends with an `internal` error event
    (not silence), the traceback is logged, and the next turns run normally."""
    d = serve()
    with Client(d.endpoint, timeout=30.0) as c, Client(d.endpoint, timeout=30.0) as other:
        c.generate("warm", [3, 4, 5], max_tokens=2)
        with caplog.at_level(logging.ERROR):
            theirs = other.submit("bystander", [9, 10, 11], max_tokens=400)
            d.store.fail_settles = 1  # the next turn to finish is checked first
            mine = c.submit("hit", [3, 4, 5], max_tokens=2)
            finals = {mine: _final(c, mine), theirs: _final(other, theirs)}
        for final in finals.values():
            assert final.finish_reason == "error" and final.error["code"] == "internal"
        assert "engine step failed" in caplog.text and "Traceback" in caplog.text
        r = c.generate("after", [6, 7], max_tokens=3)
        assert r.finish_reason in ("length", "stop")
        assert other.generate("bystander", [12], max_tokens=2).finish_reason in ("length", "stop")


def _final(client, uid: int, timeout: float = 60.0):
    """Step until request `uid` sends its last event; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in client.step(timeout=0.5):
            if event.uid == uid and event.finished:
                return event
    raise AssertionError(f"request {uid} did not finish")
