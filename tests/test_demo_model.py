"""The embedded default model: shipped, trained, and it speaks the corpus's grammar.

The corpus generator is checked for what it promises (deterministic, grammatical, closed
vocabulary); the training loop with a few steps (a loadable, reproducible model directory);
and the shipped model by what it writes after prompts it never saw whole.
"""

from __future__ import annotations

import json
import random
import re

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

from agentkv.daemon.engine.demo_model import (
    TRAINING_RECORD,
    TrainSettings,
    corpus_paragraphs,
    corpus_words,
    train_demo_model,
)
from agentkv.daemon.engine.model_factory import default_model_dir, ensure_default_model, load_model

SENTENCE = re.compile(r"[A-Z][^.]*\.")


@pytest.fixture(scope="module")
def default_model():
    return load_model()


def continuation(model, tokenizer, prompt: str, n: int = 24) -> str:
    """Greedy text after ``prompt`` up to the first end of sentence (or ``n`` tokens)."""
    ids = mx.array(tokenizer.encode(prompt))
    out = []
    for token, _ in generate_step(ids, model, max_tokens=n):
        out.append(int(token))
        if tokenizer.decode(out).rstrip().endswith("."):
            break
    return tokenizer.decode(out)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def test_corpus_is_deterministic_and_seeded():
    assert corpus_paragraphs(3, 50) == corpus_paragraphs(3, 50)
    assert corpus_paragraphs(3, 50) != corpus_paragraphs(4, 50)


def test_corpus_sentences_are_grammatical_and_use_a_closed_vocabulary():
    vocabulary = corpus_words()
    for paragraph in corpus_paragraphs(7, 2000):
        sentences = SENTENCE.findall(paragraph)
        assert " ".join(sentences) == paragraph
        assert 2 <= len(sentences) <= 4
        assert set(words(paragraph)) <= vocabulary
        for s in sentences:
            lower = s.lower()
            if re.search(r"\b(she|he|tom|anna|the farmer)\b (do|are|am|were)\b", lower):
                pytest.fail(f"agreement broken: {s}")
            if re.search(r"\b(tomorrow|next week|tonight|soon)\b", lower) and " will " not in s:
                pytest.fail(f"future sentence without will: {s}")


def test_default_model_is_shipped_complete_and_trained(default_model):
    path = ensure_default_model()
    assert path == default_model_dir()
    record = json.loads((path / TRAINING_RECORD).read_text())
    model, _ = default_model
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert params == record["parameters"]
    assert 500_000 <= params <= 5_000_000
    assert record["final_loss"] < 2.0  # near the corpus's own entropy, far below ln(vocab)


@pytest.mark.parametrize(
    ("prompt", "expected_next"),
    [
        ("Tomorrow the children", {"will"}),
        ("Next week my sister", {"will"}),
        ("Right now I", {"am"}),
        ("At the moment our neighbours", {"are"}),
        ("Every day Tom", None),  # a third person singular form: checked below
    ],
)
def test_default_model_continues_with_grammatical_english(default_model, prompt, expected_next):
    model, tokenizer = default_model
    text = continuation(model, tokenizer, prompt)
    got = words(text)
    assert got, f"{prompt!r} -> {text!r}"
    assert set(got) <= corpus_words(), f"{prompt!r} -> {text!r}"
    assert text.rstrip().endswith("."), f"{prompt!r} -> {text!r}"
    if expected_next is not None:
        assert got[0] in expected_next, f"{prompt!r} -> {text!r}"
    else:
        assert got[0] == "does" or got[0].endswith("s"), f"{prompt!r} -> {text!r}"


def test_default_model_depends_on_its_context(default_model):
    model, tokenizer = default_model
    rng = random.Random(0)
    prompts = [f"{t} {s}" for t in ("Yesterday", "Tomorrow", "Every day") for s in ("I", "she")]
    rng.shuffle(prompts)
    texts = {continuation(model, tokenizer, p) for p in prompts}
    assert len(texts) >= 5  # not one memorised sentence for every prompt


def test_training_a_few_steps_writes_a_reproducible_model(tmp_path):
    settings = TrainSettings(
        steps=3, batch_size=2, seq_len=32, warmup_steps=1, corpus_paragraphs=400
    )
    first = train_demo_model(tmp_path / "a", settings=settings, progress=False, dtype="float32")
    train_demo_model(tmp_path / "b", settings=settings, progress=False, dtype="float32")
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("a", "b")]
    assert weights[0] == weights[1]
    assert json.loads((tmp_path / "a" / TRAINING_RECORD).read_text()) == first
    model, tokenizer = load_model(tmp_path / "a")
    assert tokenizer.encode("Yesterday I worked.")[0] == tokenizer.bos_token_id
    assert first["parameters"] == sum(v.size for _, v in tree_flatten(model.parameters()))
