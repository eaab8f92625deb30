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
    _check_unicode(prompt, "prompt")
    if first_turn:
        bos = getattr(tokenizer, "bos_token", None)
        add_special = bos is None or not prompt.startswith(bos)
    else:
        add_special = False
    ids = list(tokenizer.encode(prompt, add_special_tokens=add_special))
    if not ids:
        raise InvalidRequestError("prompt encodes to no tokens")
    return ids


def _check_unicode(text: str, what: str) -> None:
    """Text a tokenizer can take: valid Unicode (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{what} is not valid Unicode: {exc.reason}") from None


def fewest_tokens(prompt: object, messages: object, max_token_bytes: int) -> int:
    """A lower bound on the tokens a text prompt or chat encodes to, without tokenizing:
    no token holds more than `max_token_bytes` bytes of text, and a chat template renders
    each message to at least one token (its role markers). 0 when unknown."""
    if isinstance(prompt, str):
        return len(prompt.encode("utf-8", "surrogatepass")) // max_token_bytes
    if isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)):
        text = sum(
            len(m["content"].encode("utf-8", "surrogatepass"))
            for m in messages
            if isinstance(m, dict) and isinstance(m.get("content"), str)
        )
        return max(len(messages), text // max_token_bytes)
    return 0


def max_token_bytes(tokenizer) -> int:
    """The most bytes of text one token of this tokenizer can stand for (an upper bound:
    4 bytes per character of its longest vocabulary entry)."""
    try:
        longest = max(map(len, tokenizer.get_vocab()), default=1)
    except Exception:  # no vocabulary to read: no bound (every input gets tokenized)
        return 2**62
    return 4 * max(longest, 1)


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
        _check_unicode(m["content"], "message content")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model's tokenizer has no chat template; send a prompt")
    try:
        text = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # the template is the model's code; it judged the input
        if type(exc).__name__ == "TemplateSyntaxError":  # broken template: not the request
            raise
        raise InvalidRequestError(f"the chat template refused these messages: {exc}") from exc
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
