"""The starlette app: routes, API-key check, size-limited JSON bodies, and errors in the
shape of the API each route belongs to."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agentkv.client import AgentKVClientError, AsyncClient, protocol

from .anthropic_api import AnthropicApi
from .errors import ApiError, from_client_error
from .openai_api import OpenAIApi
from .turns import Turns

log = logging.getLogger("agentkv.http")

# Bodies past this are refused (413) before they are parsed: a request the daemon would
# refuse anyway (its messages are at most protocol.MAX_MESSAGE_BYTES).
MAX_BODY_BYTES = protocol.MAX_MESSAGE_BYTES
PARENT_POLL_S = 1.0
# How long the front waits for any reply of the daemon: longer than a Client's 30 s, since
# one engine step (restoring many long agents at once on a loaded CPU) can take that long,
# and the front lives and dies with its daemon anyway.
DAEMON_TIMEOUT_S = 300.0
RETRY_AFTER_S = 1  # the Retry-After of a 429


@dataclass(slots=True)
class FrontConfig:
    """What the front needs: the daemon's socket and key, the HTTP API key (None: none,
    loopback only), the body limit, and the pid whose exit stops the front."""

    socket: str
    auth_key: Path | None = None
    api_key: bytes | None = None
    max_body: int = MAX_BODY_BYTES
    parent_pid: int | None = None


def make_app(config: FrontConfig) -> Starlette:
    """The ASGI app of the HTTP front."""
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        client = AsyncClient(config.socket, timeout=DAEMON_TIMEOUT_S, auth_key=config.auth_key)
        state["turns"] = turns = Turns(client)
        state["openai"], state["anthropic"] = OpenAIApi(turns), AnthropicApi(turns)
        watcher = asyncio.get_running_loop().create_task(_watch_parent(config.parent_pid, client))
        try:
            yield
        finally:
            watcher.cancel()
            await client.close()

    def route(path, method, shape, call):
        async def endpoint(request: Request) -> Response:
            try:
                _authorize(request, config.api_key)
                body = await _json_body(request, config.max_body) if method == "POST" else None
                return await call(state, request, body)
            except ApiError as exc:
                return _error(exc, shape)
            except AgentKVClientError as exc:
                return _error(from_client_error(exc), shape)

        return Route(path, endpoint, methods=[method])

    routes = [
        route("/v1/models", "GET", "openai", _models),
        route("/v1/chat/completions", "POST", "openai", _chat),
        route("/v1/completions", "POST", "openai", _completion),
        route("/v1/messages", "POST", "anthropic", _messages),
        route("/health", "GET", "openai", _health),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={404: _not_found, 405: _not_allowed},
    )


async def _models(state: dict, request: Request, body) -> Response:
    return await state["openai"].models()


async def _chat(state: dict, request: Request, body: dict) -> Response:
    return await state["openai"].chat(request.headers, body)


async def _completion(state: dict, request: Request, body: dict) -> Response:
    return await state["openai"].completion(request.headers, body)


async def _messages(state: dict, request: Request, body: dict) -> Response:
    return await state["anthropic"].messages(request.headers, body)


async def _health(state: dict, request: Request, body) -> Response:
    info = await state["turns"].info()
    return JSONResponse({"ok": True, "model": info.get("model"), "pid": info.get("pid")})


def _authorize(request: Request, key: bytes | None) -> None:
    """With an API key, every request carries it: `Authorization: Bearer KEY` (OpenAI) or
    `x-api-key: KEY` (Anthropic), compared in constant time."""
    if key is None:
        return
    given = request.headers.get("x-api-key", "")
    bearer = request.headers.get("authorization", "")
    if bearer[:7].lower() == "bearer ":
        given = bearer[7:].strip()
    if not given:
        raise ApiError(401, "missing API key (Authorization: Bearer KEY)", code="missing_api_key")
    if not hmac.compare_digest(given.encode(), key):
        raise ApiError(401, "invalid API key", code="invalid_api_key")


async def _json_body(request: Request, limit: int) -> dict:
    """The body as a JSON object, refused (413) past `limit` bytes before any parsing."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body over {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return body


def _error(exc: ApiError, shape: str) -> JSONResponse:
    if exc.status >= 500:
        log.warning("%d: %s", exc.status, exc.message)
    body = exc.anthropic() if shape == "anthropic" else exc.openai()
    # An overloaded daemon refused the turn unrun: a second later it may have room.
    headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 429 else None
    return JSONResponse(body, status_code=exc.status, headers=headers)


async def _not_found(request: Request, exc) -> Response:
    return _error(ApiError(404, f"no route {request.url.path}", code="not_found"), _shape(request))


async def _not_allowed(request: Request, exc) -> Response:
    message = f"{request.method} is not allowed on {request.url.path}"
    return _error(ApiError(405, message, code="method_not_allowed"), _shape(request))


def _shape(request: Request) -> str:
    return "anthropic" if request.url.path.startswith("/v1/messages") else "openai"


async def _watch_parent(pid: int | None, client: AsyncClient) -> None:
    """The front lives only as long as its daemon: once the parent is gone, the requests
    waiting for it are answered 503 (closing the client fails them with DaemonUnavailable;
    the server lets them finish as it stops), and the front stops."""
    if pid is None:
        return
    while os.getppid() == pid:
        await asyncio.sleep(PARENT_POLL_S)
    log.warning("daemon (pid %d) is gone: stopping the HTTP front", pid)
    await client.close()
    os.kill(os.getpid(), signal.SIGTERM)
