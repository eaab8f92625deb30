"""model_factory: offline tiny models that load with mlx-lm, are not degenerate, are
byte-for-byte reproducible, and fail loudly (without the hub) when a path is wrong."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache, make_prompt_cache

from agentkv.daemon.engine.model_factory import (
    ARCHITECTURES,
    build_model_dir,
    ensure_random_model,
    load_model,
    models_cache_dir,
)
from agentkv.daemon.errors import ModelNotFoundError

MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def greedy(model, tokenizer, prompt: str, n: int = 32) -> list[int]:
    """``n`` greedy tokens after ``prompt``, encoded the way mlx_lm.generate encodes it."""
    ids = mx.array(tokenizer.encode(prompt))
    steps = generate_step(ids, model, max_tokens=n)
    return [int(token) for token, _ in steps]


def param_count(model) -> int:
    return sum(value.size for _, value in tree_flatten(model.parameters()))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_model_dir_has_model_and_tokenizer_files(model_dirs, arch):
    names = {p.name for p in model_dirs[arch].iterdir()}
    assert names >= MODEL_FILES
    assert not [p for p in model_dirs[arch].parent.iterdir() if p.name.startswith(".")]


def test_cache_kinds_per_architecture(loaded_models):
    kinds = {arch: make_prompt_cache(model) for arch, (model, _) in loaded_models.items()}
    for arch in ("llama", "qwen3_moe"):
        assert all(type(c) is KVCache for c in kinds[arch]), arch
    gemma = kinds["gemma3_text"]
    assert [type(c) for c in gemma] == [RotatingKVCache, RotatingKVCache, KVCache] * 2
    assert all(c.max_size == 64 for c in gemma if isinstance(c, RotatingKVCache))
    next_kinds = {type(c) for c in kinds["qwen3_next"]}
    assert next_kinds == {ArraysCache, KVCache}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_output_is_diverse_and_depends_on_prompt(loaded_models, arch):
    model, tokenizer = loaded_models[arch]
    fox = greedy(model, tokenizer, "The quick brown fox")
    hello = greedy(model, tokenizer, "Hello, how are you today?")
    assert len(fox) == 32
    assert len(set(fox)) >= 20, fox
    assert fox != hello


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tokenizer_special_tokens_and_chat_template(loaded_models, arch):
    _, tokenizer = loaded_models[arch]
    eos = tokenizer.convert_tokens_to_ids("</s>")
    assert eos in tokenizer.eos_token_ids
    ids = tokenizer.encode("hi")
    assert ids[0] == tokenizer.bos_token_id and len(ids) > 1
    text = "The farmer sold his wheat."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    chat_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert chat_ids[:2] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")]


def test_same_seed_gives_identical_files_across_processes(model_dirs, tmp_path):
    # A fresh process has fresh hash seeds, so this also catches unordered-dict output.
    script = (
        "import sys\n"
        "from agentkv.daemon.engine.model_factory import ARCHITECTURES, build_model_dir\n"
        "for arch in ARCHITECTURES:\n"
        "    build_model_dir(f'{sys.argv[1]}/{arch}', arch, seed=0)\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=120)
    for arch, built in model_dirs.items():
        names = sorted(p.name for p in built.iterdir())
        assert names == sorted(p.name for p in (tmp_path / arch).iterdir())
        _, mismatch, errors = filecmp.cmpfiles(built, tmp_path / arch, names, shallow=False)
        assert (mismatch, errors) == ([], []), arch


def test_different_seed_gives_different_weights(model_dirs, tmp_path):
    other = build_model_dir(tmp_path / "llama-seed1", "llama", seed=1)
    base = model_dirs["llama"]
    assert (other / "model.safetensors").read_bytes() != (base / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_existing_model_is_reused_unless_overwrite(tmp_path):
    path = build_model_dir(tmp_path / "m", "qwen3_moe")
    weights = path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_model_dir(path, "qwen3_moe") == path
    assert weights.stat().st_mtime_ns == before
    build_model_dir(path, "qwen3_moe", seed=5, overwrite=True)
    assert weights.stat().st_mtime_ns != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left behind


def test_build_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_model_dir(tmp_path, "llama")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    ("arch", "size"),
    [("gpt2", "tiny"), ("llama", "huge"), ("gemma3_text", "small"), ("qwen3_next", "small")],
)
def test_bad_arch_or_size_is_a_value_error(tmp_path, arch, size):
    with pytest.raises(ValueError):
        build_model_dir(tmp_path / "m", arch, size=size)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "name",
    ["/nonexistent/agentkv-model", "./no-such-model", "~/no-such-agentkv-model", "a/b/c", "x/"],
)
def test_missing_local_path_fails_fast_without_the_hub(name):
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(name)
    assert time.monotonic() - start < 1.0


def test_missing_path_object_never_reaches_the_hub(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(Path("org") / "name")  # a Path is always local, even if it reads like an id


def test_unknown_hub_id_is_wrapped(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="Hugging Face hub"):
        load_model("agentkv-test/no-such-model")


def test_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        load_model(tmp_path)
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError):
        load_model(tmp_path / "file.bin")


def test_bad_weights_are_not_a_model(model_dirs, tmp_path):
    for source in model_dirs["llama"].iterdir():
        (tmp_path / source.name).write_bytes(source.read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelNotFoundError, match="cannot load"):
        load_model(tmp_path)


def test_models_cache_dir_locations(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTKV_HOME", str(tmp_path / "home"))
    assert models_cache_dir() == tmp_path / "home" / "models"
    monkeypatch.delenv("AGENTKV_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models_cache_dir() == tmp_path / "xdg" / "agentkv" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert models_cache_dir() == tmp_path / "user" / ".cache" / "agentkv" / "models"


def test_random_model_builds_once_and_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTKV_HOME", str(tmp_path))
    path = ensure_random_model()
    assert path.parent == tmp_path / "models"
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_random_model() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    model, tokenizer = load_model(path)
    assert 3_000_000 <= param_count(model) <= 6_000_000
    assert len(set(greedy(model, tokenizer, "The quick brown fox"))) >= 20
    assert os.access(path, os.R_OK | os.X_OK)
