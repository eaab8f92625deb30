"""Tool calls: `tools` reach the chat template (the prompt is the template's own rendering
with them), the daemon reads the model's tool calls with mlx-lm's tool parser for it, and
the HTTP front answers them as OpenAI `tool_calls` and Anthropic `tool_use` blocks,
streamed and not; a model without a tool parser gets a 400 (test_http_api.py).

The model is the llama test model with a tool-taking chat template and weights crafted so
that greedy decoding writes one tool call (tests/crafted_models.py): the real engine, daemon
and official SDKs, deterministically.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import Daemon
from crafted_models import CALL, tool_model_dir
from test_http_api import Http, free_port

from agentkv.client import InvalidRequest
from agentkv.daemon.engine.tool_calls import ToolParser, split

ARGS = ("--block-size", "16", "--pool-blocks", "256")
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def caller(model_dirs):
    """(Http of a daemon of the tool-calling model, its TokenizerWrapper)."""
    from agentkv.daemon.engine import load_model

    root = Path(tempfile.mkdtemp(prefix="akvtools", dir="/tmp"))
    model_dir = tool_model_dir(model_dirs["llama"], root / "model", calls=True)
    d = Daemon(model_dir, args=ARGS)
    port = free_port()
    d.start("--http", f"127.0.0.1:{port}")
    try:
        yield Http(d, port), load_model(model_dir)[1]
    finally:
        d.kill()
        shutil.rmtree(d.root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def _prompt_len(tokenizer, messages: list[dict], tools: list[dict] | None) -> int:
    return len(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True))


def test_the_parser_adapter_reads_calls_and_leaves_the_rest_text():
    """mlx-lm's json_tools parser between the markers: calls (several, with text around)
    are read; a malformed or unterminated call, or a non-call, leaves the text as it is."""
    from mlx_lm.tool_parsers import json_tools

    p = ToolParser("<tool_call>", "</tool_call>", json_tools.parse_tool_call, "json_tools")
    one = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
    got = p.parse(f"Sure. {one}\n{one.replace('f', 'g')}", [TOOL])
    assert got.calls == [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {"x": 1}}]
    assert got.content == "Sure. \n"
    assert p.parse("no calls here", None) is None
    assert p.parse('<tool_call>{"name": "f", "argu', None) is None  # cut by max_tokens
    assert p.parse("<tool_call>not json</tool_call>", None) is None
    assert p.parse('<tool_call>{"arguments": {}}</tool_call>', None) is None  # no name
    assert p.parse(f"{one}<tool_call>[1]</tool_call>", None) is None  # one bad: none
    assert split("a<s>b</s>c<s>d", "<s>", "</s>") == ("ac", ["b", "d"])


def test_held_text_shows_text_before_a_call_and_holds_the_call():
    """The streamed text of a turn with tools: a partial marker is held, the call is held;
    the end shows the text less the calls, or all of it when nothing parsed."""
    from agentkv.daemon.service.http.tools import HeldText

    held = HeldText("<tool_call>")
    shown = [held.feed(t) for t in ("Hi <to", "ol", "_call>{", '"name"}</tool_call> bye')]
    assert shown == ["Hi ", "", "", ""]
    assert held.finish([{"name": "f", "arguments": {}}], "Hi  bye") == " bye"
    held = HeldText("<tool_call>")
    text = "x <tool_call>oops"
    assert held.feed(text) == "x " and held.finish(None, None) == "<tool_call>oops"


def test_the_engine_refuses_tools_its_template_ignores(loaded_models):
    """A template that renders the same with and without tools (the llama test model's
    ChatML) refuses them rather than drop them; an empty list counts as no tools; tools
    go with messages only."""
    from agentkv.daemon.engine import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
    from agentkv.daemon.errors import InvalidRequestError

    model, tokenizer = loaded_models["llama"]
    spec = ModelCacheSpec.from_model(model, block_size=16)
    engine = BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, total_blocks=64), spec)
    assert engine.tool_calling is None
    with pytest.raises(InvalidRequestError, match="does not take tools"):
        engine.submit("e", messages=ASK, tools=[TOOL])
    with pytest.raises(InvalidRequestError, match="tools go with messages"):
        engine.submit("e", "hi", tools=[TOOL])
    engine.submit("e", messages=ASK, tools=[], max_tokens=2)
    [done] = list(engine.step())
    assert done.tool_calls is None and done.finish_reason in ("stop", "length")
    engine.close()


def test_openai_tool_calls_whole_and_streamed(caller):
    """tools reach the template (prompt_tokens equal mlx-lm's apply_chat_template with
    them, and differ without); the call comes back as tool_calls with finish_reason
    "tool_calls", streamed as a tool-call delta with no markup in the content."""
    http, tokenizer = caller
    oa = http.openai()
    r = oa.chat.completions.create(
        model="m", messages=ASK, tools=[TOOL], max_tokens=32, user="oa-tools"
    )
    assert r.usage.prompt_tokens == _prompt_len(tokenizer, ASK, [TOOL])
    assert r.usage.prompt_tokens != _prompt_len(tokenizer, ASK, None)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == CALL["name"]
    assert json.loads(call.function.arguments) == CALL["arguments"]

    chunks = list(
        oa.chat.completions.create(
            model="m", messages=ASK, tools=[TOOL], max_tokens=32, stream=True
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert content == "" and len(deltas) == 1
    assert deltas[0].function.name == CALL["name"] and deltas[0].index == 0
    assert json.loads(deltas[0].function.arguments) == CALL["arguments"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The call and its result in the history, as chat templates take them; the agent's
    # earlier turn is reused.
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    again = oa.chat.completions.create(
        model="m", messages=history, tools=[TOOL], max_tokens=32, user="oa-tools"
    )
    rendered = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": CALL}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    assert again.usage.prompt_tokens == _prompt_len(tokenizer, rendered, [TOOL])
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_anthropic_tool_use_whole_and_streamed(caller):
    """Anthropic's tools ({name, input_schema}) reach the template in the function-schema
    shape; the call comes back as a tool_use block with stop_reason "tool_use", streamed
    (the SDK's accumulated final message) and not; tool_result blocks are taken back."""
    http, tokenizer = caller
    an = http.anthropic()
    tool = {"name": "get_weather", "description": "The weather in a city"}
    tool["input_schema"] = TOOL["function"]["parameters"]
    r = an.messages.create(model="m", max_tokens=32, messages=ASK, tools=[tool])
    # input_tokens are the prefilled ones (Anthropic's count), the rest came from the cache
    prompt = r.usage.input_tokens + r.usage.cache_read_input_tokens
    assert prompt == _prompt_len(tokenizer, ASK, [TOOL])
    assert r.stop_reason == "tool_use"
    [block] = [b for b in r.content if b.type == "tool_use"]
    assert (block.name, block.input) == (CALL["name"], CALL["arguments"])

    with an.messages.stream(model="m", max_tokens=32, messages=ASK, tools=[tool]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    [streamed] = [b for b in final.content if b.type == "tool_use"]
    assert (streamed.name, streamed.input) == (CALL["name"], CALL["arguments"])
    assert "".join(b.text for b in final.content if b.type == "text") == ""

    async def both_async():  # the async clients, streamed
        oa, aan = http.async_openai(), http.async_anthropic()
        try:
            calls = []
            stream = await oa.chat.completions.create(
                model="m", messages=ASK, tools=[TOOL], max_tokens=32, stream=True
            )
            async for c in stream:
                if c.choices:
                    calls += c.choices[0].delta.tool_calls or []
            async with aan.messages.stream(
                model="m", max_tokens=32, messages=ASK, tools=[tool]
            ) as s:
                message = await s.get_final_message()
            return calls, message
        finally:
            await oa.close()
            await aan.close()

    calls, message = asyncio.run(both_async())
    assert [json.loads(c.function.arguments) for c in calls] == [CALL["arguments"]]
    assert [b.input for b in message.content if b.type == "tool_use"] == [CALL["arguments"]]

    history = [
        *ASK,
        {"role": "assistant", "content": [block.model_dump()]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "sunny"}],
        },
    ]
    again = an.messages.create(model="m", max_tokens=32, messages=history, tools=[tool])
    rendered = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": CALL}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    prompt = again.usage.input_tokens + again.usage.cache_read_input_tokens
    assert prompt == _prompt_len(tokenizer, rendered, [TOOL])


def test_the_zmq_client_takes_tools_and_gets_the_calls(caller):
    """Client.generate(messages=, tools=) returns the parsed calls; hello reports the
    model's tool calling; tools without messages are refused before sending."""
    http, _ = caller
    with http.daemon.client() as c:
        assert c.info["tool_calling"] == {
            "start": "<tool_call>",
            "end": "</tool_call>",
            "parser": "json_tools",
        }
        assert c.stats()["tool_calling"] == c.info["tool_calling"]  # status --json too
        r = c.generate("zmq-tools", messages=ASK, tools=[TOOL], max_tokens=32)
        assert r.tool_calls == [CALL] and r.content == ""
        assert r.text == f"<tool_call>{json.dumps(CALL)}</tool_call>"
        plain = c.generate("zmq-plain", messages=ASK, max_tokens=32)
        assert plain.tool_calls is None  # no tools given: the text alone
        with pytest.raises(InvalidRequest, match="tools go with messages"):
            c.generate("zmq-tools", "hi", tools=[TOOL])
        with pytest.raises(InvalidRequest, match="list of dicts"):
            c.generate("zmq-tools", messages=ASK, tools=["nope"])
