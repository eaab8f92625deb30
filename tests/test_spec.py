"""ModelCacheSpec on the four test architectures, and block payload / rebuild mechanics."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from agentkv.daemon import CacheReconstructionError, LayerKind, ModelCacheSpec
from agentkv.daemon.engine.kv_blocks import BlockKV, block_payload, rebuild_caches
from agentkv.daemon.engine.model_factory import load_model
from agentkv.daemon.engine.spec import LayerSpec
from agentkv.daemon.errors import UnsupportedModelError

KINDS = {
    "llama": [LayerKind.FULL] * 4,
    "gemma3_text": [LayerKind.SLIDING, LayerKind.SLIDING, LayerKind.FULL] * 2,
    "qwen3_moe": [LayerKind.FULL] * 2,
    "qwen3_next": [LayerKind.RECURRENT, LayerKind.FULL] * 2,
}


@pytest.mark.parametrize("arch", sorted(KINDS))
def test_spec_layers(loaded_models, arch):
    model, _ = loaded_models[arch]
    spec = ModelCacheSpec.from_model(model, block_size=64)
    assert [layer.kind for layer in spec.layers] == KINDS[arch]
    assert spec.model_type == arch
    for layer in spec.layers:
        if layer.kind is LayerKind.RECURRENT:
            assert layer.state_shapes and layer.fixed_bytes > 0 and layer.bytes_per_token == 0
            continue
        assert layer.n_kv_heads == 2 and layer.dtype == "float32"
        assert layer.bytes_per_token == 2 * layer.k_head_dim * 2 * 4
        if layer.kind is LayerKind.SLIDING:
            assert layer.window == 64 and layer.fixed_bytes == 64 * layer.bytes_per_token
    full = [spec.layers[i].bytes_per_token for i in spec.full_layers]
    assert spec.bytes_per_block() == 64 * sum(full)
    assert spec.bytes_per_block(256) == 256 * sum(full)
    assert spec.all_full == (arch in ("llama", "qwen3_moe"))
    assert spec.vocab_size == 768


def test_fingerprint_tells_models_apart(loaded_models, model_dirs, tmp_path):
    from agentkv.daemon.engine.model_factory import build_model_dir, load_model

    model, _ = loaded_models["llama"]
    again = ModelCacheSpec.from_model(load_model(model_dirs["llama"])[0])
    other = load_model(build_model_dir(tmp_path / "seed1", "llama", seed=1))[0]
    assert ModelCacheSpec.from_model(model).fingerprint == again.fingerprint
    assert ModelCacheSpec.from_model(other).fingerprint != again.fingerprint


def test_unsupported_cache_is_refused():
    from mlx_lm.models.cache import ChunkedKVCache

    class Odd:
        def make_cache(self):
            return [ChunkedKVCache(16)]

        def __call__(self, tokens, cache):
            cache[0].update_and_fetch(mx.zeros((1, 1, 1, 4)), mx.zeros((1, 1, 1, 4)))

        def parameters(self):
            return {}

    with pytest.raises(UnsupportedModelError):
        ModelCacheSpec.from_model(Odd())


def _toy_spec(layers=2) -> ModelCacheSpec:
    specs = tuple(LayerSpec(i, LayerKind.FULL, 2, 4, 4, "float32") for i in range(layers))
    return ModelCacheSpec("toy", specs, "fp", block_size=4)


class _Cache:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values


def test_payload_is_an_owned_copy_and_rebuild_round_trips():
    spec = _toy_spec()
    keys = mx.random.normal((1, 2, 10, 4))
    values = mx.random.normal((1, 2, 10, 4))
    caches = [_Cache(keys, values), _Cache(keys * 2, values * 2)]
    payloads = [block_payload(spec, caches, a, min(a + 4, 10)) for a in (0, 4, 8)]
    mx.eval([p.keys for p in payloads])
    # a payload never shares memory with the buffer it was cut from
    assert not np.shares_memory(
        np.array(keys, copy=False), np.array(payloads[0].keys[0], copy=False)
    )
    for n in (10, 7, 4, 1):
        rebuilt = rebuild_caches(spec, payloads, n)
        assert rebuilt[0].offset == n
        assert np.array_equal(np.array(rebuilt[0].keys), np.array(keys[:, :, :n, :]))
        assert np.array_equal(np.array(rebuilt[1].values), np.array(values[:, :, :n, :] * 2))


def test_rebuild_refuses_inconsistent_pieces():
    spec = _toy_spec()
    good = BlockKV((mx.zeros((1, 2, 4, 4)),) * 2, (mx.zeros((1, 2, 4, 4)),) * 2, 4)
    with pytest.raises(CacheReconstructionError):
        rebuild_caches(spec, [good], 6)  # holds 4 tokens, 6 asked
    bad = BlockKV((mx.zeros((1, 3, 4, 4)),) * 2, (mx.zeros((1, 3, 4, 4)),) * 2, 4)
    with pytest.raises(CacheReconstructionError):
        rebuild_caches(spec, [bad], 4)  # wrong head count


def test_model_fingerprint_from_files(model_dirs, tmp_path):
    import shutil

    from agentkv.daemon.engine.fingerprint import model_fingerprint
    from agentkv.daemon.engine.model_factory import build_model_dir

    src = model_dirs["llama"]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    assert model_fingerprint(copy) == model_fingerprint(src)  # content, not location
    other = build_model_dir(tmp_path / "seed1", "llama", seed=1)
    assert model_fingerprint(other) != model_fingerprint(src)  # other weights
    config = (copy / "tokenizer_config.json").read_text()
    (copy / "tokenizer_config.json").write_text(config.replace("<s>", "<S>"))
    assert model_fingerprint(copy) != model_fingerprint(src)  # other tokenizer


def test_model_fingerprint_sees_a_fine_tune_of_one_middle_tensor(model_dirs, tmp_path):
    """A checkpoint with the same layout whose only change is one tensor deep inside the
    file (a fine-tune of a middle layer) is another model: caches must not carry over."""
    import json
    import shutil
    import struct

    from agentkv.daemon.engine.fingerprint import model_fingerprint

    src = model_dirs["llama"]
    copy = tmp_path / "tuned"
    shutil.copytree(src, copy)
    (weights,) = copy.glob("*.safetensors")
    data = bytearray(weights.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    names = sorted(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    start, stop = header[names[len(names) // 2]]["data_offsets"]
    a, b = 8 + n + start, 8 + n + stop
    assert a > 64 * 1024 and b < len(data) - 64 * 1024  # away from the file's ends
    values = np.frombuffer(bytes(data[a:b]), np.float32) * np.float32(1.01)
    data[a:b] = values.tobytes()
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != model_fingerprint(src)


def test_weights_fingerprint_samples_each_tensor_beyond_its_first_values(model_dirs):
    from mlx.utils import tree_flatten

    from agentkv.daemon.engine.fingerprint import weights_fingerprint

    model, _ = load_model(model_dirs["llama"])
    before = weights_fingerprint(model)
    name, value = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])[3]
    flat = value.reshape(-1)
    half = flat.size // 2
    tuned = mx.concatenate([flat[:half], flat[half:] * 1.01]).reshape(value.shape)
    model.load_weights([(name, tuned)], strict=False)
    assert weights_fingerprint(model) != before


def _random_model(config: dict):
    from mlx.utils import tree_map
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(config))
    # Larger weights than the default init: distributions far from uniform, so a leak of
    # padding shows as a large change of log-probabilities (as it does in trained models).
    model.update(tree_map(lambda p: p * 3 if p.ndim > 1 else p, model.parameters()))
    mx.eval(model.parameters())
    return model


BATCH_LEAKS = {
    # mamba's mixer takes no mask: left padding flows into every shorter prompt's state.
    "mamba": {
        "model_type": "mamba",
        "vocab_size": 768,
        "hidden_size": 64,
        "intermediate_size": 128,
        "state_size": 8,
        "num_hidden_layers": 2,
        "conv_kernel": 4,
        "use_bias": False,
        "use_conv_bias": True,
        "time_step_rank": 8,
        "tie_word_embeddings": True,
    },
    # gemma2 reshapes scores to 5 dimensions; the 4-d batch mask then broadcasts wrongly.
    "gemma2": {
        "model_type": "gemma2",
        "vocab_size": 768,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 32,
    },
}


@pytest.mark.parametrize("arch", sorted(BATCH_LEAKS))
def test_a_model_that_computes_differently_in_a_batch_is_refused(arch):
    """Their cache classes are ones agentkv keeps, but mlx-lm's batched generation lets
    left padding change their outputs: refused with UnsupportedModelError, never served
    with wrong tokens."""
    model = _random_model(BATCH_LEAKS[arch])
    with pytest.raises(UnsupportedModelError, match="batch"):
        ModelCacheSpec.from_model(model, block_size=16)


def test_the_batch_probe_passes_the_test_architectures(loaded_models):
    for model, _ in loaded_models.values():
        ModelCacheSpec.from_model(model, block_size=16)  # raises if refused
