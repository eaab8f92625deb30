"""The protocol's submit schema (SubmitRequest, TurnOptions): one place for a turn's
defaults, limits and checks, and a body that round-trips through the wire unchanged."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from agentkv.client import protocol
from agentkv.client.protocol import (
    ENVELOPE_FIELDS,
    SUBMIT_DEFAULTS,
    SUBMIT_FIELDS,
    MessageType,
    ProtocolError,
    SubmitRequest,
    TurnOptions,
)


def test_defaults_are_the_documented_ones():
    assert TurnOptions(256, 0.0, 1.0, 0, 0.0, None, ()) == SUBMIT_DEFAULTS
    assert not SUBMIT_FIELDS & ENVELOPE_FIELDS
    # The engine passes its submit arguments in this order (requests.turn_options).
    order = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop")
    assert TurnOptions.__slots__ == order


def test_a_body_round_trips_through_msgpack():
    for request in (
        SubmitRequest.for_turn("a", "hello", max_tokens=8, stop=["x", "yy"], seed=3),
        SubmitRequest.for_turn("a", range(5), top_k=4, top_p=0.5, min_p=0.1, temperature=0.7),
        SubmitRequest.for_turn("a", messages=({"role": "user", "content": "hi"},)),
    ):
        body = msgpack.unpackb(msgpack.packb(request.to_body()))
        assert SubmitRequest.from_body(body) == request


def test_the_wire_body_has_the_1_0_shape():
    """Every option is sent, `stop` only when given: what 1.x daemons read."""
    body = SubmitRequest.for_turn("a", [1, 2]).to_body()
    assert body == {
        "agent_id": "a",
        "tokens": [1, 2],
        "max_tokens": 256,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "seed": None,
    }


def test_numpy_integers_become_ints_and_one_stop_string_stays_one():
    options = TurnOptions(max_tokens=np.int32(4), top_k=np.int64(2), seed=np.uint64(9), stop="ab")
    assert (options.max_tokens, options.top_k, options.seed, options.stop) == (4, 2, 9, ("ab",))
    assert all(type(v) is int for v in (options.max_tokens, options.top_k, options.seed))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"top_k": True}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"stop": [1]}, "stop"),
        ({"stop": ["x" * 257]}, "stop"),
    ],
)
def test_bad_options_name_their_field(options, field):
    with pytest.raises(ProtocolError, match=field) as info:
        TurnOptions(**options)
    assert info.value.code == "invalid_request"


def test_an_envelope_field_is_not_a_body_field():
    with pytest.raises(ProtocolError, match="unknown field"):
        SubmitRequest.from_body({"agent_id": "a", "prompt": "x", "session": "s"})
    header = protocol.request_header(7, {"agent_id": "a"}, "sess")
    msg = protocol.decode(protocol.encode(MessageType.SUBMIT, header))
    assert (msg.id, msg.body) == (7, {"agent_id": "a"})
    assert msg.header == {"agent_id": "a", "id": 7, "session": "sess"}


def test_a_prompt_that_is_neither_text_nor_ids_is_refused():
    with pytest.raises(ProtocolError, match="prompt must be text or token ids"):
        SubmitRequest.for_turn("a", 5)
    with pytest.raises(ProtocolError, match="messages must be a list"):
        SubmitRequest.for_turn("a", messages={"role": "user", "content": "x"})
    with pytest.raises(ProtocolError, match="messages must be a list"):
        SubmitRequest.for_turn("a", messages=7)


def test_tools_go_with_messages_as_a_bounded_list_of_dicts():
    """`tools` round-trip with a chat; refused without one, when not a list of dicts, and
    past MAX_TOOLS."""
    chat = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    request = SubmitRequest.for_turn("a", messages=chat, tools=(tool,))
    body = msgpack.unpackb(msgpack.packb(request.to_body()))
    assert body["tools"] == [tool] and SubmitRequest.from_body(body) == request
    assert "tools" not in SubmitRequest.for_turn("a", messages=chat).to_body()
    bad = [
        ({"prompt": "hi"}, [tool], "tools go with messages"),
        ({"messages": chat}, tool, "list of dicts"),
        ({"messages": chat}, ["f"], "list of dicts"),
        ({"messages": chat}, [tool] * (protocol.MAX_TOOLS + 1), "at most"),
    ]
    for given, tools, message in bad:
        with pytest.raises(ProtocolError, match=message):
            SubmitRequest.from_body({"agent_id": "a", **given, "tools": tools})
