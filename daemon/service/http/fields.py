"""Typed reads of a JSON request body: every wrong type or value is a 400 naming its
field."""

from __future__ import annotations

import math

from agentkv.client import protocol

from .errors import ApiError

_MISSING = object()


def integer(body: dict, name: str, *, low: int, high: int | None = None, default=None):
    """An integer field within [low, high] (booleans are not integers)."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be an integer, got {_kind(value)}", param=name)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ApiError(400, f"'{name}' must be {bound}, got {value}", param=name)
    return value


def number(body: dict, name: str, *, low: float, high: float, default=None):
    """A finite number field within [low, high]."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise ApiError(400, f"'{name}' must be a number, got {_kind(value)}", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return float(value)


def flag(body: dict, name: str, default: bool = False) -> bool:
    """A boolean field."""
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be a boolean, got {_kind(value)}", param=name)
    return value


def mapping(body: dict, name: str) -> dict:
    """An object field ({} when absent)."""
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"'{name}' must be an object, got {_kind(value)}", param=name)
    return value


def strings(body: dict, name: str, *, most: int = 16) -> list[str] | None:
    """A string or a list of non-empty strings (stop sequences)."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ApiError(400, f"'{name}' must be a string or a list of non-empty strings", param=name)
    if len(value) > most:
        raise ApiError(400, f"'{name}' holds at most {most} strings", param=name)
    return value or None


def messages(raw: object) -> list:
    """A request's `messages`: a non-empty array (each message is the API's to check)."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    return raw


def agent_id(value: object, where: str) -> str:
    """An agent id from a header or field, checked as the daemon would."""
    try:
        return protocol.check_agent_id(value)
    except protocol.ProtocolError as exc:
        raise ApiError(400, f"{where}: {exc}", param=where, code="invalid_agent_id") from None


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
