"""Build small mlx-lm model directories offline (the test and benchmark models).

The daemon needs a model to run, and its tests need several architectures whose caches
differ: plain ``KVCache`` stacks (llama, qwen3_moe), sliding-window ``RotatingKVCache``
layers mixed with global ones (gemma3_text), and recurrent ``ArraysCache`` layers mixed with
attention (qwen3_next). Nothing here touches the network: weights come from a seeded random
init, the tokenizer is a byte-level BPE trained on a text embedded in this module, and the
result is an ordinary mlx-lm model directory that ``mlx_lm.load`` reads in milliseconds.

The random weights are scaled up so that greedy decoding is diverse and depends on context;
a model that repeats one token forever would let equivalence tests pass without testing
anything.

Models are loaded by ``model_loader.load_model`` and written by ``model_files`` (both
re-exported here, where the tests and scripts have always found them). The default model
is not random: it is a tiny llama trained on a synthetic corpus of simple sentences
(``demo_model``), shipped in the package so that a newcomer's first run prints readable
text. Benchmarks use a bigger random model (``ensure_random_model``), built once into a
user cache directory.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .model_files import (
    build_cached,
    build_dir,
    is_empty_dir,
    is_model_dir,
    models_cache_dir,
    save_model_dir,
    write_model_files,
)
from .model_loader import (
    SMOLLM2_GGUF,
    default_model_dir,
    ensure_default_model,
    load_model,
    smollm2_gguf,
)

if TYPE_CHECKING:
    import mlx.core as mx

__all__ = [  # what this module has always offered, loading and writing included
    "ARCHITECTURES",
    "SIZES",
    "SMOLLM2_GGUF",
    "build_cached",
    "build_model_dir",
    "default_model_dir",
    "ensure_default_model",
    "ensure_random_model",
    "load_model",
    "model_config",
    "models_cache_dir",
    "save_model_dir",
    "smollm2_gguf",
    "train_bpe_tokenizer",
    "write_model_files",
]

ARCHITECTURES = ("llama", "gemma3_text", "qwen3_moe", "qwen3_next")
SIZES = ("tiny", "small")

# Bump whenever build_model_dir's bytes change for the same arguments, so that an old
# cached copy is never mistaken for the new one.
_RANDOM_MODEL_VERSION = "v1"


_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
_TOKENIZER_VOCAB_SIZE = 768


# Factor applied to every >= 2-D weight except embeddings and norms. Default init gives
# near-uniform logits and greedy decoding that repeats one token; ~3x gives peaked,
# context-dependent outputs (26-32 distinct ids in 32 greedy tokens on every architecture).
_WEIGHT_SCALE = 3.0


_ARCH_CONFIGS: dict[tuple[str, str], dict[str, Any]] = {
    ("llama", "tiny"): {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    ("llama", "small"): {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 256,
        "num_hidden_layers": 8,
        "intermediate_size": 512,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
    ("gemma3_text", "tiny"): {
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "rope_local_base_freq": 10000.0,
        "sliding_window": 64,
        "sliding_window_pattern": 3,
    },
    ("qwen3_moe", "tiny"): {
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    },
    ("qwen3_next", "tiny"): {
        "architectures": ["Qwen3NextForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "full_attention_interval": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "partial_rotary_factor": 0.5,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    },
}


def build_model_dir(
    path: str | os.PathLike[str],
    arch: str = "llama",
    *,
    seed: int = 0,
    size: str = "tiny",
    overwrite: bool = False,
) -> Path:
    """Build a small random-weight mlx-lm model directory at ``path``, offline.

    The directory holds ``config.json``, ``model.safetensors`` and the tokenizer files. It is
    written into a temporary sibling and renamed into place, so ``path`` never holds a
    half-built model. The same ``(arch, seed, size)`` always gives byte-identical files.

    Args:
        path: directory to create.
        arch: one of ``ARCHITECTURES``.
        seed: seed of the random weight init.
        size: ``"tiny"`` (test models, ~0.1-1 M parameters) or ``"small"`` (~5 M
            parameters, the benchmarks' model; llama only).
        overwrite: replace whatever is at ``path``. Without it, a complete model already
            there is returned untouched.

    Returns:
        The model directory.

    Raises:
        ValueError: unknown ``arch`` or ``size``, or ``size="small"`` with an
            architecture other than llama.
        FileExistsError: ``path`` exists, is neither empty nor a complete model directory,
            and ``overwrite`` is not set.
    """
    config = model_config(arch, size)  # validates arch and size before touching the disk
    target = Path(path).expanduser()
    if not overwrite and is_model_dir(target):
        return target
    if not overwrite and target.exists() and not is_empty_dir(target):
        raise FileExistsError(f"{target} exists and is not a model directory")
    write = functools.partial(_write_model_files, config=config, seed=seed)
    return build_dir(target, write, overwrite=overwrite)


def ensure_random_model(arch: str = "llama", size: str = "small", seed: int = 0) -> Path:
    """Build a random-weight model into ``models_cache_dir()`` on first use; its directory.

    The benchmarks' model (``llama``, ``small``: ~5 M parameters). An exclusive ``fcntl``
    lock on a file next to the directory makes concurrent first calls from several
    processes build it once; later calls reuse it. Temporary directories left by a build
    that crashed are removed under the same lock.
    """
    config = model_config(arch, size)  # validates before touching the disk
    target = models_cache_dir() / f"random-{arch}-{size}-s{seed}-{_RANDOM_MODEL_VERSION}"
    return build_cached(target, functools.partial(_write_model_files, config=config, seed=seed))


def model_config(arch: str, size: str = "tiny") -> dict[str, Any]:
    """The ``config.json`` contents ``build_model_dir`` writes for ``(arch, size)``.

    Raises:
        ValueError: unknown ``arch`` or ``size``, or ``size="small"`` with an
            architecture other than llama.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    if size == "small" and arch != "llama":
        raise ValueError(f"size 'small' exists for llama only, not {arch!r}")
    tokens = _tokenizer_ids()
    config: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": tokens["vocab_size"],
        "bos_token_id": tokens["bos"],
        "eos_token_id": tokens["eos"],
        "pad_token_id": tokens["pad"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 8192,
        "rope_theta": 10000.0,
    }
    config.update(_ARCH_CONFIGS[(arch, size)])
    return config


def _write_model_files(directory: Path, config: dict[str, Any], seed: int) -> None:
    """Write config, seeded random weights and the embedded tokenizer into ``directory``."""
    weights = _init_weights(config, seed, _WEIGHT_SCALE)
    save_model_dir(directory, config, weights, _trained_tokenizer_json())


def _init_weights(config: dict[str, Any], seed: int, scale: float) -> dict[str, mx.array]:
    """Seeded random init of the model ``config`` describes, with scaled-up matrices.

    Reseeds mlx's global random generator.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    for name, value in weights.items():
        if value.ndim >= 2 and "embed" not in name and "norm" not in name:
            weights[name] = value * scale
    mx.eval(weights)
    return weights


def train_bpe_tokenizer(lines: list[str], vocab_size: int) -> Any:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``lines``, deterministically.

    It has the special tokens ``<pad> <s> </s> <|im_start|> <|im_end|>`` (ids 0-4) and
    prepends ``<s>`` on ``encode(add_special_tokens=True)``, as Llama tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tokenizer


@functools.cache
def _trained_tokenizer_json() -> str:
    """The random test models' tokenizer, trained on the embedded text; cached."""
    lines = _CORPUS.splitlines(keepends=True)
    return train_bpe_tokenizer(lines, _TOKENIZER_VOCAB_SIZE).to_str()


def _trained_tokenizer() -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_tokenizer_json())


@functools.cache
def _tokenizer_ids() -> dict[str, Any]:
    """Vocabulary size and special token ids of the embedded tokenizer."""
    tokenizer = _trained_tokenizer()
    return {
        "vocab_size": tokenizer.get_vocab_size(),
        "pad": tokenizer.token_to_id("<pad>"),
        "bos": tokenizer.token_to_id("<s>"),
        "eos": [tokenizer.token_to_id("</s>"), tokenizer.token_to_id("<|im_end|>")],
    }


# A few KB of plain English for the tokenizer: enough merges for a ~768-token vocabulary.
_CORPUS = """\
The quick brown fox jumps over the lazy dog while the farmer watches from the porch.
A small boat drifted across the quiet lake as the sun rose behind the distant hills.
She opened the old wooden box and found a bundle of letters tied with a faded ribbon.
Every morning the baker lights the oven at four o'clock and the street smells of bread.
The library closes at nine, but the students often stay late to finish their projects.
He forgot his umbrella on the train, so he walked home in the pouring rain.
Scientists measured the temperature of the ocean at twelve different depths.
The meeting was moved to Thursday because the manager was travelling on Tuesday.
Children laughed and chased each other around the fountain in the city park.
A gentle wind carried the scent of pine trees down into the valley below.
Please remember to water the plants and feed the cat while I am away.
The museum displays paintings, sculptures and ancient coins from many countries.
Our train leaves the station at half past seven and arrives before noon.
The recipe calls for two eggs, a cup of flour, some sugar and a pinch of salt.
When the storm passed, the neighbours came outside to clear the fallen branches.
My grandmother tells wonderful stories about growing up on a farm by the sea.
The engineer checked every bolt on the bridge before the inspectors arrived.
Birds sang in the hedges, and a thin mist hung over the fields at dawn.
They built a tiny cabin in the woods with a stone chimney and a red door.
Reading a good book by the fire is the best way to spend a winter evening.
The orchestra tuned their instruments while the audience found their seats.
Could you tell me the way to the post office, or is it too far to walk?
The river flows north through three towns before it reaches the harbour.
After dinner we played cards, drank tea and talked until well past midnight.
The garden was full of roses, tulips, daisies and tall yellow sunflowers.
A young doctor moved to the village and opened a clinic near the market.
The computer saves a copy of each file every ten minutes, just in case.
Mountains covered in snow rose sharply above the green and narrow valley.
I would like a window seat, a glass of water and a quiet place to work.
The teacher asked the class to write a short essay about their favourite animal.
On Saturday the market sells fresh fish, cheese, honey, apples and warm pies.
The lighthouse keeper climbed the spiral stairs to check the great lamp.
Two cats slept in a patch of sunlight on the kitchen floor all afternoon.
The pilot announced that the flight would land twenty minutes early.
We planted seven apple trees along the fence at the bottom of the garden.
The detective noticed a muddy footprint beside the broken window.
Fresh snow fell overnight, and the whole town was white and silent by morning.
The shop on the corner repairs bicycles, clocks and old radios.
Her brother plays the violin in a band that tours every summer.
The committee will review the proposal and announce a decision next month.
Waves crashed against the rocks, throwing white spray high into the air.
He wrote the numbers one, two, three, four and five on the blackboard.
The soup was too hot, so we waited a few minutes before tasting it.
An old map showed a path through the forest to a hidden waterfall.
The students asked many questions, and the speaker answered each one with care.
Lanterns glowed along the harbour as the fishing boats returned at dusk.
The price of coffee went up again, but people still queue outside the cafe.
Keep the door closed, because the heating is on and the dog likes to wander.
Thunder rumbled in the distance, and the first heavy drops began to fall.
The chess club meets on Wednesday evenings in the back room of the library.
She painted the fence blue, then decided that green would look much better.
In spring the meadow fills with wild flowers, bees and bright butterflies.
The new road will connect the northern villages to the hospital in the city.
Write clearly, check your spelling, and always keep a copy of your work.
Why does the moon look larger when it is close to the horizon at night?
The farmer sold his wheat, bought a new tractor and repaired the barn roof.
Hello, how are you today? I am fine, thank you, and I hope you are well too.
What time is it? It is ten past three, and the meeting starts at four.
"""
