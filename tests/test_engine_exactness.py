"""EXP-005: the engine's output is mlx-lm's output, byte for byte, with and without its cache."""

from __future__ import annotations

import pytest
from refs import make_engine, run_all, scratch_generate

SENTENCE = (
    "The quick brown fox jumps over the lazy dog while the old clock in the hall strikes "
    "nine, and a robot writes a story about quantum computing in great detail. "
)


def _prompt(tokenizer, n_tokens: int) -> str:
    text = "Hello"
    while len(tokenizer.encode(text)) < n_tokens:
        text += " " + SENTENCE
    return text


@pytest.fixture(scope="module")
def llama(loaded_models):
    return loaded_models["llama"]


@pytest.mark.parametrize(
    ("label", "n_tokens", "max_tokens"),
    [("short", 1, 20), ("medium", 300, 50), ("long", 900, 50)],
)
def test_engine_matches_mlx_generate(llama, label, n_tokens, max_tokens):
    model, tokenizer = llama
    prompt = _prompt(tokenizer, n_tokens)
    engine = make_engine(model, tokenizer, block_size=256, total_blocks=64)
    uid = engine.submit("test", prompt, max_tokens=max_tokens)
    (c,) = run_all(engine).values()
    ref_tokens, ref_text = scratch_generate(model, tokenizer, prompt, max_tokens)
    assert c.uid == uid and c.agent_id == "test"
    assert c.token_ids == ref_tokens
    assert c.text == ref_text  # byte-identical
    stopped = len(ref_tokens) < max_tokens  # mlx-lm stopped at an EOS
    assert c.finish_reason == ("stop" if stopped else "length")
    assert c.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert c.usage.generated_tokens == len(ref_tokens) + stopped  # the EOS was generated too
    context = engine.agent_tokens("test")
    assert len(context) == c.usage.prompt_tokens + c.usage.generated_tokens
    assert engine.agent_info("test").blocks == -(-len(context) // 256)
    assert engine.agent_info("test").blocks >= {"short": 1, "medium": 2, "long": 4}[label]


def test_cache_resume_equals_from_scratch(llama):
    model, tokenizer = llama
    engine = make_engine(model, tokenizer, block_size=256, total_blocks=64)
    engine.submit("a", _prompt(tokenizer, 280), max_tokens=30)
    run_all(engine)
    context = engine.agent_tokens("a")
    engine.submit("a", " I'm doing well, thanks!", max_tokens=40)
    (c2,) = run_all(engine).values()
    whole = context + tokenizer.encode(" I'm doing well, thanks!", add_special_tokens=False)
    ref_tokens, ref_text = scratch_generate(model, tokenizer, whole, 40)
    assert c2.token_ids == ref_tokens
    assert c2.text == ref_text
    assert c2.usage.cached_tokens == len(context)
    assert c2.usage.prompt_tokens == len(whole)
    assert len(set(ref_tokens)) >= 10  # a degenerate model would make this test vacuous


def test_first_turn_gets_bos_later_turns_do_not(llama):
    model, tokenizer = llama
    engine = make_engine(model, tokenizer)
    engine.submit("a", "Hello there", max_tokens=3)
    run_all(engine)
    first = engine.agent_tokens("a")
    assert first[: len(tokenizer.encode("Hello there"))] == tokenizer.encode("Hello there")
    engine.submit("a", " again", max_tokens=3)
    run_all(engine)
    second = engine.agent_tokens("a")
    added = tokenizer.encode(" again", add_special_tokens=False)
    assert second[len(first) : len(first) + len(added)] == added
    assert second.count(tokenizer.bos_token_id) == first.count(tokenizer.bos_token_id)
