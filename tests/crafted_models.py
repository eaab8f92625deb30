"""Tiny test models crafted for one behaviour, from the llama test model.

`never_stopping_model_dir`: its lm_head is zero, so every logit ties and greedy decoding
takes token 0 (the pad token, not an EOS) forever: each turn runs to max_tokens.

`tool_model_dir`: a Hermes/Qwen-style chat template that renders `tools`, `tool_calls`
and `tool` messages (mlx-lm infers its `json_tools` parser from it), and, for
`calls=True`, weights crafted so that greedy decoding after the generation prompt writes
one tool call and ends:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>

The crafted model is an ordinary mlx-lm llama: its attention and MLP outputs are zero, so
each position's hidden state is its token's embedding, and the embeddings and lm_head
chain the last token of the generation prompt to the call's tokens (added tokens of the
tokenizer) and then to EOS. The real engine runs it; nothing is faked.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
CALL_TEXT = json.dumps(CALL)
EXTRA_VOCAB = 8

TOOL_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\nCall functions from <tools></tools>:\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n"
    'Reply with <tool_call>{"name": <name>, "arguments": <object>}</tool_call>'
    "<|im_end|>\n"
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' and loop.first %}"
    "{% elif message.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{% elif message.role == 'assistant' and message.tool_calls %}"
    "<|im_start|>assistant\n{{ message.content }}"
    "{% for tool_call in message.tool_calls %}"
    "{% if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}"
    '<tool_call>{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}'
    "</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tool_model_dir(src: Path, dst: Path, *, calls: bool) -> Path:
    """A copy of the model directory `src` at `dst` whose chat template takes tools; with
    `calls`, crafted to answer every chat with the tool call CALL."""
    shutil.copytree(src, dst)
    config_path = dst / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TOOL_TEMPLATE
    config_path.write_text(json.dumps(config))
    if calls:
        _craft_caller(dst)
    return dst


def never_stopping_model_dir(src: Path, dst: Path) -> Path:
    """A copy of the model directory `src` at `dst` whose turns never end by themselves."""
    import mlx.core as mx

    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "model.safetensors"))
    weights["lm_head.weight"] = mx.zeros_like(weights["lm_head.weight"])
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    return dst


def _craft_caller(d: Path) -> None:
    import mlx.core as mx
    from tokenizers import Tokenizer

    config = json.loads((d / "config.json").read_text())
    base = config["vocab_size"]
    tok_path = d / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    for i, content in enumerate(("<tool_call>", "</tool_call>", CALL_TEXT)):
        tok["added_tokens"].append(
            {
                "id": base + i,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )
    tok_path.write_text(json.dumps(tok))
    newline = Tokenizer.from_file(str(tok_path)).encode("assistant\n").ids[-1]
    eos = config["eos_token_id"]
    eos = eos[-1] if isinstance(eos, list) else eos
    # last prompt token -> <tool_call> -> CALL_TEXT -> </tool_call> -> EOS
    chain = [newline, base, base + 2, base + 1, eos]
    config["vocab_size"] = vocab = base + EXTRA_VOCAB
    (d / "config.json").write_text(json.dumps(config))

    weights = mx.load(str(d / "model.safetensors"))
    hidden = weights["model.embed_tokens.weight"].shape[1]
    embed = mx.zeros((vocab, hidden))
    head = mx.zeros((vocab, hidden))
    for k, (token, after) in enumerate(itertools.pairwise(chain)):
        embed[token, k] = 1.0
        head[after, k] = 10.0
    weights["model.embed_tokens.weight"] = embed
    weights["lm_head.weight"] = head
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = mx.zeros_like(weights[name])
    mx.save_safetensors(str(d / "model.safetensors"), weights)
