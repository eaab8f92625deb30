"""Misbehaving clients for tests/test_daemon_overload.py, run as their own process so their
busy loops do not share a GIL with the well-behaved clients that are measured.

    python overload_child.py ENDPOINT SECONDS BIG_AGENT [CLIENTS [KINDS]]

CLIENTS (default 20) raw DEALER sockets, round-robin in one thread, of four kinds:
never reading (RCVHWM 1) while asking `inspect` of a big agent; oversized fields (2 MB
agent ids in stats/inspect/submit, an 8 MB+ prompt); garbage frames; and greedy ones that
flood valid requests and read what comes (KINDS: a comma list of them, default all).
Prints a JSON summary: messages sent, CPU seconds, replies read by error code.
"""

from __future__ import annotations

import json
import os
import sys
import time

import msgpack
import zmq

MAGIC = b"AKV1"
BIG = 2 * 2**20


def _frames(big_agent: str) -> dict[str, list[list[bytes]]]:
    """Prebuilt messages per kind (ids are patched in per send where they matter)."""
    junk = "x" * BIG
    return {
        "noread": [
            [MAGIC, b"inspect", msgpack.packb({"id": 0, "agent_id": big_agent})],
            [MAGIC, b"stats", msgpack.packb({"id": 0})],
        ],
        "oversized": [
            [MAGIC, b"stats", msgpack.packb({"id": 0, "agent_id": junk})],
            [MAGIC, b"inspect", msgpack.packb({"id": 0, "agent_id": junk})],
            [MAGIC, b"submit", msgpack.packb({"id": 0, "agent_id": junk, "tokens": [1]})],
            [
                MAGIC,
                b"submit",
                msgpack.packb({"id": 0, "agent_id": "a", "prompt": "y" * 9_000_000}),
            ],
        ],
        "garbage": [
            [os.urandom(64)],
            [MAGIC, b"stats"],
            [MAGIC, b"stats", b"\xc1\xc1\xc1"],
            [MAGIC, b"nonsense", msgpack.packb({"id": 1})],
            [MAGIC, b"stats", msgpack.packb({"id": 1}), os.urandom(32)],
            [b"AKV9", b"stats", msgpack.packb({"id": 1})],
            [MAGIC, b"submit", b"\x91" * 4000 + b"\x00"],
        ],
        "greedy": [
            [MAGIC, b"stats", msgpack.packb({"id": 0})],
            [MAGIC, b"agents", msgpack.packb({"id": 0})],
            [MAGIC, b"inspect", msgpack.packb({"id": 0, "agent_id": big_agent})],
        ],
    }


def main(endpoint: str, seconds: float, big_agent: str, clients: int = 20, kinds=None) -> None:
    ctx = zmq.Context.instance()
    kinds = kinds.split(",") if kinds else ["noread", "oversized", "garbage", "greedy"]
    socks = []
    for i in range(clients):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100)
        if kinds[i % len(kinds)] == "noread":
            s.setsockopt(zmq.RCVHWM, 1)
        s.connect(endpoint)
        socks.append((kinds[i % len(kinds)], s))
    frames = _frames(big_agent)
    sent, codes, rid = 0, {}, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for kind, s in socks:
            for msg in frames[kind] * (4 if kind in ("noread", "greedy") else 1):
                rid += 1
                if kind in ("noread", "greedy"):  # valid: a fresh id each time
                    msg = [*msg[:2], msgpack.packb({**msgpack.unpackb(msg[2]), "id": rid})]
                try:
                    s.send_multipart(msg, zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    pass
            if kind != "noread":
                _drain(s, codes)
        time.sleep(0.002)  # hammer, but leave the box's other core to the daemon
    print(json.dumps({"sent": sent, "cpu_s": round(time.process_time(), 1), "codes": codes}))
    for _, s in socks:
        s.close(linger=0)


def _drain(sock, codes: dict) -> None:
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            header = msgpack.unpackb(frames[2])
            code = header["error"]["code"] if not header.get("ok") else "ok"
        except Exception:
            code = "unreadable"
        codes[code] = codes.get(code, 0) + 1


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], float(args[1]), args[2], *(int(a) for a in args[3:4]), *args[4:5])
