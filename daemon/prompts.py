"""Turning a turn's input into token ids, the way mlx-lm would."""

from __future__ import annotations

from collections.abc import Sequence

from agentkv.client.protocol import AGENT_ID_RE

from .errors import InvalidRequestError


def check_agent_id(agent_id: object) -> str:
    """Validate an agent id: 1-128 chars of letters, digits and `._:@+-`, not starting with one
    of the punctuation marks. Ids are never used as file paths; this keeps logs and CLIs sane."""
    if not isinstance(agent_id, str) or not AGENT_ID_RE.fullmatch(agent_id):
        raise InvalidRequestError(
            f"invalid agent id {agent_id!r}: use 1-128 characters from A-Z a-z 0-9 . _ : @ + -, "
            "starting with a letter or digit"
        )
    return agent_id


def encode_turn(tokenizer, prompt: str, *, first_turn: bool) -> list[int]:
    """Encode a text prompt appended to an agent's context.

    The first turn is encoded as `mlx_lm.generate` encodes a prompt (special tokens added
    unless the text already starts with the BOS token); later turns continue a context, so
    no BOS is inserted in the middle of it.
    """
    if not isinstance(prompt, str):
        raise InvalidRequestError(
            f"prompt must be a string or a list of token ids, got {type(prompt).__name__}"
        )
    if not prompt:
        raise InvalidRequestError("prompt is empty")
    if first_turn:
        bos = getattr(tokenizer, "bos_token", None)
        add_special = bos is None or not prompt.startswith(bos)
    else:
        add_special = False
    ids = list(tokenizer.encode(prompt, add_special_tokens=add_special))
    if not ids:
        raise InvalidRequestError("prompt encodes to no tokens")
    return ids


def check_tokens(tokens: object, vocab_size: int, what: str = "tokens") -> list[int]:
    """Validate a list of token ids against the model's vocabulary."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise InvalidRequestError(f"{what} must be a list of token ids")
    if not tokens:
        raise InvalidRequestError(f"{what} is empty")
    out = []
    for t in tokens:
        if (
            not isinstance(t, int)
            or isinstance(t, bool)
            or t < 0
            or (vocab_size and t >= vocab_size)
        ):
            raise InvalidRequestError(f"{what}: {t!r} is not a token id in [0, {vocab_size})")
        out.append(int(t))
    return out


def render_messages(tokenizer, messages: object) -> list[int]:
    """Render chat messages with the model's chat template, ready for generation."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} dicts")
    for m in messages:
        ok = isinstance(m, dict) and isinstance(m.get("role"), str)
        if not ok or not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"bad message {m!r}: needs string 'role' and 'content'")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model's tokenizer has no chat template; send a prompt")
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise InvalidRequestError("messages render to no tokens")
    return ids


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
