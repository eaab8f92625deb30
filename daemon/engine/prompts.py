"""Turning a turn's input into token ids, the way mlx-lm would: checks, size bounds taken
before tokenizing, and the encoder that tokenizes large inputs off the engine thread."""

from __future__ import annotations

import functools
import json
import math
import queue
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agentkv.client.protocol import AGENT_ID_RE, shown

from ..errors import InvalidRequestError
from .tool_calls import template_takes_tools


def check_agent_id(agent_id: object) -> str:
    """Validate an agent id: 1-128 chars of letters, digits and `._:@+-`, not starting with one
    of the punctuation marks. Ids are never used as file paths; this keeps logs and CLIs sane."""
    if not isinstance(agent_id, str) or not AGENT_ID_RE.fullmatch(agent_id):
        raise InvalidRequestError(
            f"invalid agent id {shown(agent_id)}: use 1-128 characters from "
            "A-Z a-z 0-9 . _ : @ + -, starting with a letter or digit"
        )
    return agent_id


def encode_turn(tokenizer, prompt: str, *, first_turn: bool, encode=None) -> list[int]:
    """Encode a text prompt appended to an agent's context.

    The first turn is encoded as `mlx_lm.generate` encodes a prompt (special tokens added
    unless the text already starts with the BOS token); later turns continue a context, so
    no BOS is inserted in the middle of it. `encode(text, add_special)` replaces the
    tokenizer's own encode (see `PromptEncoder`).
    """
    check_text(prompt)
    if first_turn:
        bos = getattr(tokenizer, "bos_token", None)
        add_special = bos is None or not prompt.startswith(bos)
    else:
        add_special = False
    return _encode(tokenizer, prompt, add_special, encode, "prompt encodes to no tokens")


def _encode(tokenizer, text: str, add_special: bool, encode, empty: str) -> list[int]:
    """`text`'s token ids, by `encode(text, add_special)` when given, else the tokenizer's
    own encode; InvalidRequestError(`empty`) when there are none."""
    if encode is None:
        ids = list(tokenizer.encode(text, add_special_tokens=add_special))
    else:
        ids = encode(text, add_special)
    if not ids:
        raise InvalidRequestError(empty)
    return ids


def check_text(prompt: object) -> str:
    """A text prompt's type and content, checked before any tokenizing."""
    if not isinstance(prompt, str):
        raise InvalidRequestError(
            f"prompt must be a string or a list of token ids, got {type(prompt).__name__}"
        )
    if not prompt:
        raise InvalidRequestError("prompt is empty")
    _check_unicode(prompt, "prompt")
    return prompt


def _check_unicode(text: str, what: str) -> None:
    """Text a tokenizer can take: valid Unicode (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{what} is not valid Unicode: {exc.reason}") from None


# Normalizers that never shrink text by more than this factor in UTF-8 bytes: a character
# is 1-4 bytes and maps to at least one byte (NFKC of U+1D400 is "A"; compositions shrink less).
_UNICODE_NORMALIZERS = frozenset({"NFC", "NFD", "NFKC", "NFKD", "Lowercase"})
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "Punctuation"})


def max_token_bytes(tokenizer) -> int | None:
    """The most bytes of input text one token can cover, from the tokenizer's vocabulary
    (a byte-level BPE token covers one byte per character of its vocabulary entry; other
    entries at most their UTF-8 length), times what its normalizer may shrink text by.

    None when no bound holds: a tokenizer that is not a Hugging Face fast one, or one that
    may drop input or fold a run of it into one token (whitespace-dropping pre-tokenizers,
    fused unknown tokens, word pieces, normalizers that strip or replace by patterns).
    """
    backend = _backend(tokenizer)
    if backend is None:
        return None
    try:
        shrink = _shrink_factor(_state(backend.normalizer))
        pre = _state(backend.pre_tokenizer)
        if shrink is None or not _keeps_input(pre) or not _model_bounded(backend.model, pre):
            return None
        byte_level = "ByteLevel" in _types(pre)
        added = backend.get_added_tokens_decoder().values()
        longest = max(
            max(len(t) if byte_level else len(t.encode("utf-8")) for t in backend.get_vocab()),
            max((len(t.content.encode("utf-8")) for t in added), default=1),
            4,  # an unknown token covers one character
        )
    except Exception:  # an unexpected tokenizer layout: no bound (every input gets tokenized)
        return None
    return shrink * longest


def _backend(tokenizer):
    """The `tokenizers.Tokenizer` behind an mlx-lm or transformers tokenizer, or None."""
    for obj in (tokenizer, getattr(tokenizer, "_tokenizer", None)):
        backend = getattr(obj, "backend_tokenizer", None)
        if backend is not None:
            return backend
    return None


def _state(component) -> dict | None:
    return None if component is None else json.loads(component.__getstate__())


def _types(state: dict | None) -> list[str]:
    """Component types of a normalizer or pre-tokenizer, a Sequence's flattened."""
    if state is None:
        return []
    if state.get("type") == "Sequence":
        parts = state.get("normalizers") or state.get("pretokenizers") or []
        return [t for p in parts for t in _types(p)]
    return [state.get("type")]


def _shrink_factor(state: dict | None) -> int | None:
    """How many input bytes a normalized byte may stand for at most (None: unbounded)."""
    if state is None:
        return 1
    if state.get("type") == "Sequence":
        factors = [_shrink_factor(p) for p in state.get("normalizers", [])]
        return None if None in factors else math.prod(factors)
    kind = state.get("type")
    if kind in _UNICODE_NORMALIZERS:
        return 4
    if kind == "Prepend":
        return 1
    if kind == "Replace" and "String" in state.get("pattern", {}):
        pattern = len(state["pattern"]["String"].encode("utf-8"))
        content = len(state.get("content", "").encode("utf-8"))
        return None if content == 0 else max(1, math.ceil(pattern / content))
    return None  # Strip, regex replaces, precompiled maps...: may drop text


def _keeps_input(state: dict | None) -> bool:
    """A pre-tokenizer that splits without dropping any input."""
    if state is None:
        return True
    if state.get("type") == "Sequence":
        return all(_keeps_input(p) for p in state.get("pretokenizers", []))
    kind = state.get("type")
    if kind == "Split":
        return state.get("behavior") != "Removed"
    return kind in _KEEPING_PRE_TOKENIZERS


def _model_bounded(model, pre: dict | None) -> bool:
    """A BPE that never folds a run of unknown input into one token (byte-level, byte
    fallback, or no fused unknown token); unigram only with byte fallback."""
    kind = type(model).__name__
    if kind == "BPE":
        if "ByteLevel" in _types(pre) or model.byte_fallback:
            return True
        return model.unk_token is None or not model.fuse_unk
    if kind == "Unigram":
        return bool(json.loads(model.__getstate__()).get("byte_fallback"))
    return False  # WordPiece, WordLevel: a whole unknown word is one token


def fewest_tokens(
    prompt: object, messages: object, max_token_bytes: int | None, message_floor: int = 0
) -> int:
    """A lower bound on the tokens a text prompt or chat encodes to, without tokenizing.

    A text is at least its UTF-8 bytes over `max_token_bytes`. A chat is at least, for each
    user or assistant message, `message_floor` (what the template adds around any content)
    or, for a user message, its content's bytes over `max_token_bytes`, whichever is more
    (templates may rewrite other content, e.g. drop an assistant's reasoning). 0: unknown.
    """
    if isinstance(prompt, str):
        if max_token_bytes is None:
            return 0
        return len(prompt.encode("utf-8", "surrogatepass")) // max_token_bytes
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        return 0
    total = 0
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            continue
        content = m.get("content")
        text = 0
        if role == "user" and isinstance(content, str) and max_token_bytes is not None:
            text = len(content.encode("utf-8", "surrogatepass")) // max_token_bytes
        total += max(message_floor, text)
    return total


def message_floor(tokenizer) -> int:
    """The fewest tokens a user or assistant message adds to a rendered chat, whatever its
    content: special tokens the template puts around it, and one per stretch of other text
    between them (content only lengthens a stretch). Found by rendering small chats with
    empty contents; 0 when the template will not render them."""
    chats = [
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
        [
            {"role": "user", "content": ""},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": ""},
        ],
    ]
    try:
        specials = _added_token_pattern(tokenizer)
        counts = [_fewest_rendered(_render(tokenizer, chat), specials) for chat in chats]
    except Exception:  # the model's template code: no floor rather than a failed turn
        return 0
    return max(0, min(counts[1] - counts[0], counts[2] - counts[1]))


def _added_token_pattern(tokenizer) -> re.Pattern | None:
    added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, added))) if added else None


def _fewest_rendered(text: str, specials: re.Pattern | None) -> int:
    """Tokens a rendered text takes at least: each added token one, each stretch of other
    text with anything but whitespace (an added token may swallow spaces) at least one."""
    if specials is None:
        return 1 if text.strip() else 0
    stretches = specials.split(text)
    return len(stretches) - 1 + sum(1 for s in stretches if s.strip())


def check_tokens(tokens: object, vocab_size: int, what: str = "tokens") -> list[int]:
    """Validate a list of token ids against the model's vocabulary."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise InvalidRequestError(f"{what} must be a list of token ids")
    if not tokens:
        raise InvalidRequestError(f"{what} is empty")
    # The common case in C-speed passes (a million ids is ~0.1 s of the engine thread).
    plain = all(type(t) is int for t in tokens) and min(tokens) >= 0
    if plain and (not vocab_size or max(tokens) < vocab_size):
        return list(tokens)
    out = []
    for t in tokens:
        if (
            not isinstance(t, int)
            or isinstance(t, bool)
            or t < 0
            or (vocab_size and t >= vocab_size)
        ):
            raise InvalidRequestError(f"{what}: {shown(t)} is not a token id in [0, {vocab_size})")
        out.append(int(t))
    return out


def check_messages(tokenizer, messages: object) -> list[dict]:
    """A chat's shape checked before rendering: a non-empty list of string role/content
    dicts, for a tokenizer with a chat template."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} dicts")
    for m in messages:
        ok = isinstance(m, dict) and isinstance(m.get("role"), str)
        if not ok or not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"bad message {shown(m)}: needs string 'role' and 'content'")
        _check_unicode(m["content"], "message content")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model's tokenizer has no chat template; send a prompt")
    return list(messages)


def render_messages(tokenizer, messages: object, encode=None, tools=None) -> list[int]:
    """Render chat messages (and `tools`, for the template) with the model's chat template,
    ready for generation. `encode(text, add_special)` replaces the tokenizer's own encode
    (see `PromptEncoder`)."""
    messages = check_messages(tokenizer, messages)
    try:
        text = _render(tokenizer, messages, tools)
    except Exception as exc:  # the template is the model's code; it judged the input
        if type(exc).__name__ == "TemplateSyntaxError":  # broken template: not the request
            raise
        raise InvalidRequestError(f"the chat template refused these messages: {exc}") from exc
    return _encode(tokenizer, text, False, encode, "messages render to no tokens")


def _render(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    kw = {} if tools is None else {"tools": tools}  # as mlx-lm's server passes them
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kw)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# Text up to this size is tokenized on the caller's thread (a few milliseconds at most);
# larger text and chats go to the encoder's worker thread.
INLINE_ENCODE_BYTES = 16 * 1024
_MESSAGE_COST_BYTES = 64  # a chat message's template text, for the inline/worker choice
_TOOL_COST_BYTES = 1024  # a tool's schema as the template renders it, roughly
_FAST_PROBES = ("Hello world", " two  spaces\tand\nlines", "<s>x</s>", "ünï 😀 \u2581x")


@dataclass(slots=True, eq=False)
class EncodeJob:
    """One tokenizing job on the encoder's worker thread.

    Attributes:
        run: what to run (returns the token ids, or raises).
        done: set once it ran (or was skipped because it was cancelled).
        result: what `run` returned.
        error: what `run` raised, if anything.
        cancelled: set by the owner; a job not started yet is then skipped.
    """

    run: Callable[[], object]
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None
    cancelled: bool = False


class PromptEncoder:
    """Tokenizes turns' inputs for the engine: small ones at once, large ones on a worker
    thread, so the thread that owns MLX never stalls on megabytes of text or a chat of
    thousands of messages (tokenizers' Rust encode and Jinja templates touch no MLX).

    Its size bounds (`fewest`) let the engine refuse input that could never fit before
    anything is tokenized.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.inline_bytes = INLINE_ENCODE_BYTES  # larger inputs go to the worker thread
        self._bounds: tuple[int | None, int] | None = None
        self._fast = None  # the backend's encode_batch_fast, if it agrees with `encode`
        self._takes_tools: bool | None = None
        self._jobs: queue.SimpleQueue[EncodeJob | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def fewest(self, prompt: object, messages: object) -> int:
        """A lower bound on the tokens of a text prompt or chat (0: unknown)."""
        if self._bounds is None:
            self._bounds = (max_token_bytes(self.tokenizer), message_floor(self.tokenizer))
        return fewest_tokens(prompt, messages, *self._bounds)

    def is_large(self, prompt: object, messages: object, tools: list | None = None) -> bool:
        """True if tokenizing this input belongs on the worker thread."""
        if isinstance(prompt, str):
            return _utf8_len(prompt) > self.inline_bytes
        if isinstance(messages, list):
            size = _MESSAGE_COST_BYTES * len(messages) + _TOOL_COST_BYTES * len(tools or ())
            size += sum(_utf8_len(m["content"]) for m in messages)
            return size > self.inline_bytes
        return False

    def encode_turn(self, prompt: str, *, first_turn: bool) -> list[int]:
        """`encode_turn` with this encoder's encode; safe on the worker thread."""
        return encode_turn(self.tokenizer, prompt, first_turn=first_turn, encode=self._encode)

    def render(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """`render_messages` with this encoder's encode; safe on the worker thread."""
        return render_messages(self.tokenizer, messages, encode=self._encode, tools=tools)

    def takes_tools(self) -> bool:
        """True when the chat template renders `tools` (probed once)."""
        if self._takes_tools is None:
            render = functools.partial(_render, self.tokenizer)
            self._takes_tools = bool(getattr(self.tokenizer, "chat_template", None)) and (
                template_takes_tools(render)
            )
        return self._takes_tools

    def start(self, run: Callable[[], object]) -> EncodeJob:
        """Queue `run` on the worker thread (started on first use; jobs run in order)."""
        if self._fast is None:
            self._fast = self._fast_encode()  # on the caller's thread, before any job
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="agentkv-encoder", daemon=True)
            self._thread.start()
        job = EncodeJob(run)
        self._jobs.put(job)
        return job

    def close(self) -> None:
        """Stop the worker after the job it is running (queued jobs should be cancelled).
        It is a daemon thread: a long encode never holds up the process's exit."""
        if self._thread is not None:
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not job.cancelled:
                try:
                    job.result = job.run()
                except Exception as exc:  # handed to the engine thread with the job
                    job.error = exc
            job.done.set()

    def _encode(self, text: str, add_special: bool) -> list[int]:
        if self._fast:
            return self._fast([text], add_special_tokens=add_special)[0].ids
        return list(self.tokenizer.encode(text, add_special_tokens=add_special))

    def _fast_encode(self):
        """The backend's `encode_batch_fast` when it encodes as the tokenizer does: it lets
        go of the GIL while it works and builds no offsets (the plain encode holds the GIL
        for all of it, the engine thread with it). False when it differs or is missing."""
        backend = _backend(self.tokenizer)
        fast = getattr(backend, "encode_batch_fast", None)
        if fast is None:
            return False
        try:
            for text in _FAST_PROBES:
                for special in (False, True):
                    want = list(self.tokenizer.encode(text, add_special_tokens=special))
                    if fast([text], add_special_tokens=special)[0].ids != want:
                        return False
        except Exception:
            return False
        return fast


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))
