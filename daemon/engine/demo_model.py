"""The embedded default model: a tiny llama that speaks simple English.

Random weights are right for tests but print noise, and a newcomer cannot tell noise from a
bug. So the default model is trained, with MLX, on a synthetic corpus: short grammatical
sentences about everyday actions that exercise tense and agreement ("Yesterday I worked in
the garden. Every day she walks to school. Tomorrow they will play in the park."), made by
a seeded generator from the small word lists below. Its byte-level BPE tokenizer is trained
with `tokenizers` on the same corpus.

Everything is deterministic given the seed: the corpus, the tokenizer, the weight init, the
batches and so the trained weights. `scripts/train_demo_model.py` runs `train_demo_model`
and writes the result (float32, ~4 MB) to `daemon/default_model/`, which ships with the
package; `model_factory.load_model()` loads it from there.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEMO_SEED = 0
SHIPPED_MODEL_DIR = Path(__file__).with_name("default_model")
TRAINING_RECORD = "training.json"

# A llama of ~1 M parameters: MLX's CPU backend trains it at ~600 tokens/s on one core, so
# the shipped model took 45 minutes; big enough to learn the corpus's grammar.
DEMO_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "intermediate_size": 384,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
TOKENIZER_VOCAB_SIZE = 1024


@dataclass(frozen=True, slots=True)
class TrainSettings:
    """Optimisation settings of `train_demo_model` (the defaults made the shipped model)."""

    steps: int = 750
    batch_size: int = 8
    # Windows of 256 tokens: the demo's contexts (a shared prompt and three turns) stay
    # within the positions the model has seen.
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    corpus_paragraphs: int = 60_000


# -- the corpus ---------------------------------------------------------------------------

# (base, third person singular, past, -ing, complements). Every complement reads well after
# every form of its verb, for any subject.
_VERBS: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("work", "works", "worked", "working", ("in the garden", "at the office", "on the farm")),
    ("play", "plays", "played", "playing", ("in the park", "with the dog", "the piano")),
    ("walk", "walks", "walked", "walking", ("to school", "to the market", "along the river")),
    ("cook", "cooks", "cooked", "cooking", ("dinner", "soup", "rice and fish")),
    ("clean", "cleans", "cleaned", "cleaning", ("the kitchen", "the windows", "the car")),
    ("paint", "paints", "painted", "painting", ("the fence", "a picture", "the old boat")),
    ("visit", "visits", "visited", "visiting", ("my grandmother", "the museum", "the farm")),
    ("watch", "watches", "watched", "watching", ("a film", "the birds", "the game")),
    ("help", "helps", "helped", "helping", ("the teacher", "my brother", "the farmer")),
    ("wash", "washes", "washed", "washing", ("the dishes", "the dog", "the clothes")),
    ("study", "studies", "studied", "studying", ("at the library", "for the test", "history")),
    ("carry", "carries", "carried", "carrying", ("the bags", "the water", "a box of apples")),
    ("go", "goes", "went", "going", ("to the market", "to school", "to the beach")),
    ("eat", "eats", "ate", "eating", ("an apple", "bread and cheese", "soup")),
    ("write", "writes", "wrote", "writing", ("a letter", "a story", "a song")),
    ("read", "reads", "read", "reading", ("a book", "the newspaper", "a story")),
    ("run", "runs", "ran", "running", ("to the station", "in the park", "along the beach")),
    ("swim", "swims", "swam", "swimming", ("in the lake", "in the sea", "at the pool")),
    ("sing", "sings", "sang", "singing", ("a song", "in the choir", "with my friends")),
    ("make", "makes", "made", "making", ("a cake", "tea", "bread")),
    ("buy", "buys", "bought", "buying", ("fresh bread", "new shoes", "apples")),
    ("drink", "drinks", "drank", "drinking", ("tea", "coffee", "a glass of milk")),
    ("ride", "rides", "rode", "riding", ("a bike", "the bus", "a horse")),
    ("fix", "fixes", "fixed", "fixing", ("the roof", "the bike", "the old radio")),
)

# (subject, person): "1s" I, "2" you, "3s" he/she/a singular noun, "p" we/they/plurals.
_SUBJECTS: tuple[tuple[str, str], ...] = (
    ("I", "1s"),
    ("you", "2"),
    ("he", "3s"),
    ("she", "3s"),
    ("we", "p"),
    ("they", "p"),
    ("the farmer", "3s"),
    ("my sister", "3s"),
    ("our teacher", "3s"),
    ("the old man", "3s"),
    ("Tom", "3s"),
    ("Anna", "3s"),
    ("the children", "p"),
    ("my parents", "p"),
    ("our neighbours", "p"),
    ("the students", "p"),
)

_PAST = ("Yesterday", "Last night", "Last week", "Two days ago", "Last summer")
_HABIT = ("Every day", "Every morning", "Every evening", "Every week", "On Sundays")
_NOW = ("Right now", "At the moment", "Today")
_FUTURE = ("Tomorrow", "Next week", "Tonight", "Next summer", "Soon")
_TENSES = ("past", "habit", "now", "future")
_TIMES = {"past": _PAST, "habit": _HABIT, "now": _NOW, "future": _FUTURE}

_BE = {"1s": "am", "2": "are", "3s": "is", "p": "are"}


def sentence(rng: random.Random, subject: tuple[str, str], verb, tense: str, obj: str) -> str:
    """One sentence: a time phrase, the subject, the verb in `tense`, its complement."""
    base, third, past, ing, _ = verb
    text, person = subject
    # Rare: a greedy or cool sampler would otherwise prefer "did not" to any one past form.
    negate = rng.random() < 0.06
    if tense == "past":
        phrase = f"did not {base}" if negate else past
    elif tense == "habit":
        do = "does" if person == "3s" else "do"
        phrase = f"{do} not {base}" if negate else (third if person == "3s" else base)
    elif tense == "now":
        phrase = f"{_BE[person]} not {ing}" if negate else f"{_BE[person]} {ing}"
    else:
        phrase = f"will not {base}" if negate else f"will {base}"
    time_phrase = rng.choice(_TIMES[tense])
    if rng.random() < 0.2:  # the time phrase at the end: "I worked in the garden yesterday."
        words = f"{text} {phrase} {obj} {_lower_time(time_phrase)}"
    else:
        words = f"{time_phrase} {text} {phrase} {obj}"
    return words[0].upper() + words[1:] + "."


def paragraph(rng: random.Random) -> str:
    """Two to four sentences: a tense ladder (one subject and action through time), or
    unrelated sentences."""
    if rng.random() < 0.5:
        subject, verb = rng.choice(_SUBJECTS), rng.choice(_VERBS)
        obj = rng.choice(verb[4])
        tenses = list(_TENSES)
        rng.shuffle(tenses)
        tenses = tenses[: rng.randint(2, 4)]
        return " ".join(sentence(rng, subject, verb, t, obj) for t in tenses)
    parts = []
    for _ in range(rng.randint(2, 4)):
        verb = rng.choice(_VERBS)
        parts.append(
            sentence(rng, rng.choice(_SUBJECTS), verb, rng.choice(_TENSES), rng.choice(verb[4]))
        )
    return " ".join(parts)


def corpus_paragraphs(seed: int = DEMO_SEED, count: int = 40_000) -> list[str]:
    """`count` paragraphs of the synthetic corpus; the same seed gives the same text."""
    rng = random.Random(seed)
    return [paragraph(rng) for _ in range(count)]


def corpus_words() -> frozenset[str]:
    """Every word (lower case, no punctuation) the corpus generator can produce."""
    text = [s for s, _ in _SUBJECTS]
    text += [" ".join(v[:4]) + " " + " ".join(v[4]) for v in _VERBS]
    text += [*_PAST, *_HABIT, *_NOW, *_FUTURE, *_BE.values(), "did do does not will"]
    return frozenset(w for w in re.findall(r"[a-z']+", " ".join(text).lower()))


def _lower_time(phrase: str) -> str:
    return phrase if phrase.startswith(("On ",)) else phrase[0].lower() + phrase[1:]


# -- training -----------------------------------------------------------------------------


def train_demo_model(
    out_dir: str | Path,
    *,
    seed: int = DEMO_SEED,
    settings: TrainSettings | None = None,
    progress: bool = True,
    dtype: str = "float16",
) -> dict[str, Any]:
    """Train the demo model and write an mlx-lm model directory to `out_dir`.

    Args:
        out_dir: directory to write (created; existing model files are replaced).
        seed: seeds the corpus, the weight init and the batch order.
        settings: optimisation settings; the defaults made the shipped model.
        progress: show a tqdm progress bar with the loss.
        dtype: dtype of the saved weights ("float16" to ship, "float32").

    Returns:
        The training record also written to `out_dir/training.json` (settings, parameter
        count, final loss, seconds).
    """
    import mlx.core as mx

    from .model_factory import save_model_dir, train_bpe_tokenizer

    settings = settings or TrainSettings()
    tic = time.perf_counter()
    paragraphs = corpus_paragraphs(seed, settings.corpus_paragraphs)
    tokenizer = train_bpe_tokenizer(paragraphs, TOKENIZER_VOCAB_SIZE)
    config = demo_config(tokenizer)
    stream = _token_stream(tokenizer, paragraphs)
    model, losses = _fit(config, stream, seed, settings, progress)
    from mlx.utils import tree_flatten

    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    record = {
        "seed": seed,
        "settings": asdict(settings),
        "parameters": sum(v.size for v in weights.values()),
        "dtype": dtype,
        "corpus_tokens": len(stream),
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "train_seconds": round(time.perf_counter() - tic, 1),
    }
    save_model_dir(Path(out_dir), config, weights, tokenizer.to_str())
    (Path(out_dir) / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def demo_config(tokenizer) -> dict[str, Any]:
    """The model's config.json for a trained tokenizer (vocabulary and special token ids)."""
    return {
        "model_type": "llama",
        "vocab_size": tokenizer.get_vocab_size(),
        "bos_token_id": tokenizer.token_to_id("<s>"),
        "eos_token_id": [tokenizer.token_to_id("</s>"), tokenizer.token_to_id("<|im_end|>")],
        "pad_token_id": tokenizer.token_to_id("<pad>"),
        **DEMO_CONFIG,
    }


def _token_stream(tokenizer, paragraphs: list[str]) -> list[int]:
    """Paragraphs back to back, each ended by eos: `Yesterday I ... .</s>Every day ...`."""
    eos = tokenizer.token_to_id("</s>")
    stream: list[int] = []
    for enc in tokenizer.encode_batch(paragraphs, add_special_tokens=False):
        stream += enc.ids
        stream.append(eos)
    return stream


def _batches(
    stream: list[int], bos: int, seed: int, settings: TrainSettings
) -> Iterator[tuple[Any, Any]]:
    """Windows of the stream that start at a paragraph, after bos, as mlx arrays."""
    import mlx.core as mx
    import numpy as np

    tokens = np.asarray(stream, dtype=np.int32)
    eos = tokens[-1]
    starts = np.concatenate([[0], np.flatnonzero(tokens[:-1] == eos) + 1])
    starts = starts[starts + settings.seq_len <= len(tokens)]
    rng = np.random.default_rng(seed)
    offsets = np.arange(settings.seq_len)
    while True:
        rows = tokens[rng.choice(starts, settings.batch_size)[:, None] + offsets]
        x = np.concatenate([np.full((settings.batch_size, 1), bos, np.int32), rows[:, :-1]], 1)
        yield mx.array(x), mx.array(rows)


def _fit(config: dict[str, Any], stream: list[int], seed: int, settings: TrainSettings, progress):
    """AdamW with linear warmup and cosine decay; returns the model and per-step losses."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.utils import _get_classes
    from tqdm import tqdm

    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    schedule = _schedule(settings)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=settings.weight_decay)

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    batches = _batches(stream, config["bos_token_id"], seed, settings)
    losses: list[float] = []
    bar = tqdm(range(settings.steps), desc="training", unit="step", disable=not progress)
    for i in bar:
        x, y = next(batches)
        loss = step(x, y)
        mx.eval(state, loss)
        losses.append(loss.item())
        if i % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return model, losses


def _schedule(settings: TrainSettings) -> Callable:
    import mlx.core as mx

    peak, warm, total = settings.learning_rate, settings.warmup_steps, settings.steps

    def lr(step):
        step = step.astype(mx.float32)
        warmup = peak * (step + 1) / warm
        progress = mx.clip((step - warm) / max(total - warm, 1), 0.0, 1.0)
        cosine = peak * (0.1 + 0.9 * 0.5 * (1 + mx.cos(math.pi * progress)))
        return mx.where(step < warm, warmup, cosine)

    return lr
