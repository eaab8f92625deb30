"""A Hugging Face tokenizer rebuilt from a GGUF file's metadata.

GGUF files carry the vocabulary (``tokenizer.ggml.tokens``), the BPE merges, token types,
the pre-tokenizer's name (``tokenizer.ggml.pre``), bos/eos ids, whether to prepend bos, and
the chat template. This module rebuilds a byte-level BPE ``tokenizers.Tokenizer`` from
them and saves ``tokenizer.json`` + ``tokenizer_config.json`` the way mlx-lm's
``TokenizerWrapper`` loads them. Only byte-level BPE vocabularies (``tokenizer.ggml.model``
``"gpt2"``) with a known pre-tokenizer are supported; SentencePiece vocabularies and
unknown pre-tokenizers are refused, since a guessed split gives different ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UnsupportedModelError

# llama.cpp's token types.
_CONTROL = 3
_USER_DEFINED = 4

# The regexes llama.cpp uses for each pre-tokenizer name (src/llama-vocab.cpp).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# pre-tokenizer name -> (regex before the byte-level step or None, digits one by one,
# ignore_merges: a whole-word vocabulary hit wins over merging, as llama.cpp does for llama3)
_PRE_TOKENIZERS: dict[str, tuple[str | None, bool, bool]] = {
    "gpt-2": (None, False, False),
    "gpt2": (None, False, False),
    "smollm": (None, True, False),
    "llama-bpe": (_LLAMA3_REGEX, False, True),
    "llama3": (_LLAMA3_REGEX, False, True),
    "qwen2": (_QWEN2_REGEX, False, False),
}


def check_tokenizer(meta: dict[str, Any], path: Path | str = "GGUF file") -> None:
    """Refuse a vocabulary this module cannot rebuild exactly.

    Raises:
        UnsupportedModelError: not byte-level BPE, unknown pre-tokenizer, or missing parts.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"{path}: tokenizer {kind!r} is not supported (byte-level BPE 'gpt2' only)"
        )
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in _PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"{path}: pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if not meta.get(key):
            raise UnsupportedModelError(f"{path}: GGUF metadata lacks {key}")


def build_tokenizer(meta: dict[str, Any]) -> Any:
    """The ``tokenizers.Tokenizer`` the GGUF metadata describes (``check_tokenizer`` first)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    check_tokenizer(meta)
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    regex, split_digits, ignore_merges = _PRE_TOKENIZERS[meta.get("tokenizer.ggml.pre", "gpt-2")]
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    steps = []
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if regex is not None:
        steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tokenizer.add_tokens(
        [
            AddedToken(tokens[i], special=t == _CONTROL, normalized=False)
            for i, t in enumerate(types)
            if t in (_CONTROL, _USER_DEFINED)
        ]
    )
    bos = _token(meta, "bos")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        from tokenizers import processors

        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return tokenizer


def save_tokenizer(meta: dict[str, Any], directory: Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
    from transformers import PreTrainedTokenizerFast

    names = {f"{t}_token": _token(meta, t) for t in ("bos", "eos", "unk", "pad")}
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(meta),
        model_max_length=int(meta.get(f"{meta['general.architecture']}.context_length", 4096)),
        **{k: v for k, v in names.items() if v is not None},
    )
    wrapped.save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # transformers 5 writes its backend's class name, which 4.x cannot resolve; and 4.x
    # reads the chat template from tokenizer_config.json only.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if template := meta.get("tokenizer.chat_template"):
        config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _token(meta: dict[str, Any], kind: str) -> str | None:
    """The text of the bos/eos/unk/pad token, if the metadata names one in range."""
    index = meta.get(f"tokenizer.ggml.{kind}_token_id")
    tokens = meta["tokenizer.ggml.tokens"]
    return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None
