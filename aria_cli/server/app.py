"""The HTTP side of `aria serve`: OpenAI's routes on Starlette.

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`.
Every failure is an OpenAI error object with its status (400 bad JSON or fields, bad pictures;
401 a missing or wrong key; 404 unknown model or route; 413 body too large; 429 queue full, with
Retry-After; 503 while the model loads or the server stops; 500 a bug, logged), and nothing a
client sends ends the server. A client that disconnects stops its answer after the current
token (the response watches the connection the whole time, queued or streaming).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from runtime.assistant import Conversation, Reply
from runtime.errors import AriaError, ImageError, InputError
from runtime.image_sources import DEFAULT_MAX_BYTES, load_image

from .. import console
from ..assistant_loader import generation_options
from ..options import ServeOptions
from ..settings import format_size
from .chat_request import ChatRequest, RequestError, parse_chat_request
from .completions import DONE, Completion, error_body, finish_reason, sse, usage
from .model_worker import Job, ModelWorker

# A request may carry one picture at the size limit as base64 (4/3 of its bytes), and its text.
MAX_BODY_BYTES = DEFAULT_MAX_BYTES * 4 // 3 + 2**20
RETRY_AFTER_S = 2  # what a refused client is told to wait: about one short answer


@dataclass
class ServerState:
    opts: ServeOptions
    worker: ModelWorker
    max_body: int = MAX_BODY_BYTES
    # Threads that fetch and decode requests' pictures at once: more would only share the same
    # cores, and each thread's allocations stay with it (glibc gives every thread its own arena).
    picture_threads: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(4))


def build_app(state: ServerState) -> Starlette:
    routes = [
        Route("/health", _guarded(lambda request: _health(state)), methods=["GET"]),
        Route("/v1/models", _guarded(lambda request: _models(state, request)), methods=["GET"]),
        Route("/v1/models/{model_id:path}", _guarded(lambda request: _model(state, request)), methods=["GET"]),
        Route("/v1/chat/completions", _guarded(lambda request: _chat_completions(state, request)),
              methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


def _guarded(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Every failure becomes an OpenAI error response; a bug is logged in one line, never raised
    into the server (it would print a traceback and drop the connection)."""

    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        except Exception as exc:  # noqa: BLE001 - see _as_request_error
            return _error_response(_as_request_error(exc, f"answering {request.url.path}"))

    return guarded


def _as_request_error(exc: BaseException | None, doing: str) -> RequestError:
    """What a client is told of a failure: its own RequestError; a prompt too long for the context
    or a setting the runtime refuses (400); anything else is a bug, logged in one line (500)."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, InputError):  # the prompt does not fit the context, or a picture does not
        return RequestError(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, AriaError):
        return RequestError(str(exc))
    console.error(f"unexpected {type(exc).__name__} {doing}: {exc} (this is a bug in aria)")
    return RequestError("the server failed to answer (a bug in aria; see its log)", status=500, kind="server_error")


def _error_object(exc: RequestError) -> dict[str, Any]:
    return error_body(str(exc), exc.kind, exc.param, exc.code)


def _error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(_error_object(exc), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route {request.url.path}; the routes are /v1/chat/completions, /v1/models and /health"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(error_body(message, param=None, code=code), status_code=exc.status_code,
                        headers=exc.headers)


# --- access --------------------------------------------------------------------------------------


def _check_access(state: ServerState, request: Request) -> None:
    key = state.opts.api_key
    if key is not None:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise RequestError("missing or wrong API key; send the header Authorization: Bearer KEY", status=401,
                               code="invalid_api_key")
        return
    # Without a key, a web page open in the user's browser could otherwise use the model: browsers
    # send any page's form posts to 127.0.0.1, and say where they come from in Origin.
    origin = request.headers.get("origin")
    if origin is not None and not is_loopback(urlsplit(origin).hostname or ""):
        raise RequestError(f"requests from web pages ({origin}) are refused without an API key; start the server "
                           "with --api-key", status=403, code="origin_not_allowed")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- routes --------------------------------------------------------------------------------------


async def _health(state: ServerState) -> Response:
    worker = state.worker
    status = "stopping" if worker.stopping.is_set() else "ok" if worker.ready else "loading"
    body = {"status": status, "model": state.opts.model, "requests": worker.admitted}
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.opts.model, "object": "model", "created": 0, "owned_by": "aria"}


async def _models(state: ServerState, request: Request) -> Response:
    _check_access(state, request)
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def _model(state: ServerState, request: Request) -> Response:
    _check_access(state, request)
    _check_model(state, request.path_params["model_id"])
    return JSONResponse(_model_card(state))


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.opts.model:
        raise RequestError(f"this server runs the model '{state.opts.model}', not '{name}'", status=404,
                           param="model", code="model_not_found")


async def _chat_completions(state: ServerState, request: Request) -> Response:
    _check_access(state, request)
    worker = state.worker
    if worker.stopping.is_set():
        raise RequestError("the server is stopping", status=503, kind="server_error", code="shutting_down")
    if not worker.ready:
        raise RequestError(f"the model {state.opts.model} is still loading; retry in a moment", status=503,
                           kind="server_error", code="model_loading", headers={"Retry-After": str(RETRY_AFTER_S)})
    body = _parse_json(await _read_body(request, state.max_body))
    chat = parse_chat_request(body)
    _check_model(state, chat.model)
    if not worker.admit():
        raise RequestError(f"the server is busy and its wait queue ({worker.max_waiting}) is full; retry later",
                           status=429, kind="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
    try:
        conversation = await anyio.to_thread.run_sync(_conversation, chat, state.opts,
                                                      limiter=state.picture_threads)
        options = generation_options(dataclasses.replace(state.opts, **chat.settings))
        completion = Completion(state.opts.model)
        job = Job(asyncio.get_running_loop(), conversation, options, completion.id)
        worker.submit(job)
    except BaseException:
        worker.release()
        raise
    return _Answer(job, completion, chat, worker)


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = RequestError(f"the request body is over {format_size(limit)}; send smaller pictures", status=413,
                             code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_large
    return bytes(data)


def _parse_json(data: bytes) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(data.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError:
        raise RequestError("the request body is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "nested too deeply"
        raise RequestError(f"the request body is not valid JSON ({reason})") from None


def _conversation(chat: ChatRequest, opts: ServeOptions) -> Conversation:
    """The request's messages with their pictures fetched and decoded (on a worker thread)."""
    conversation = Conversation()
    for i, message in enumerate(chat.messages):
        pictures = []
        for j, url in enumerate(message.images):
            try:
                pictures.append(load_image(url, offline=opts.offline))
            except ImageError as exc:
                raise RequestError(f"messages[{i}] picture {j + 1}: {exc}", param=f"messages[{i}].content",
                                   code="invalid_image") from None
        sources = [url if not url.startswith("data:") else "data: URL" for url in message.images]
        try:
            conversation.add(message.role, message.text, pictures, sources, image_offsets=message.image_offsets)
        except InputError as exc:
            raise RequestError(f"messages[{i}]: {exc}", param=f"messages[{i}].content") from None
    if conversation.system is None and opts.system:
        conversation.set_system(opts.system)
    return conversation


# --- the answer ----------------------------------------------------------------------------------


class _Answer(Response):
    """A job's answer, as one JSON object or as server-sent events, watching the connection the
    whole time: a client that leaves, while waiting or while reading, cancels its job."""

    def __init__(self, job: Job, completion: Completion, chat: ChatRequest, worker: ModelWorker):
        self.job, self.completion, self.chat, self.worker = job, completion, chat, worker
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.ensure_future(_until_disconnect(receive))
        delivered = False
        try:
            event = await self._next(gone)
            if event is None:
                return
            kind, value = event
            if kind == "error":
                await _failure(value)(scope, receive, send)
            elif self.chat.stream:
                await self._stream(send, gone)
            else:
                await self._whole(scope, receive, send, gone)
            delivered = True
        finally:
            gone.cancel()
            if not delivered:  # the client left, or sending failed: the model has better things to do
                self.job.stop("the client went away")
            self.worker.release()

    async def _next(self, gone: asyncio.Future) -> tuple[str, Any] | None:
        """The job's next event, or None (and the job cancelled) when the client has gone."""
        if gone.done():
            self.job.stop("the client went away")
            return None
        get = asyncio.ensure_future(self.job.events.get())
        await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        if get.done():
            return get.result()
        get.cancel()
        self.job.stop("the client went away")
        return None

    async def _whole(self, scope: Scope, receive: Receive, send: Send, gone: asyncio.Future) -> None:
        while (event := await self._next(gone)) is not None:
            kind, value = event
            if kind == "done":
                await JSONResponse(self.completion.whole(value))(scope, receive, send)
                return
            if kind == "error":
                await _failure(value)(scope, receive, send)
                return

    async def _stream(self, send: Send, gone: asyncio.Future) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await self._event(send, self.completion.chunk({"role": "assistant", "content": ""}))
        while (event := await self._next(gone)) is not None:
            kind, value = event
            if kind == "chunk":
                await self._event(send, self.completion.chunk({"content": value}))
            elif kind == "done":
                await self._finish(send, value)
                return
            elif kind == "error":  # after the answer started: OpenAI's way is an error event
                await self._event(send, _error_object(_as_request_error(value, "while answering")))
                await send({"type": "http.response.body", "body": DONE, "more_body": False})
                return

    async def _finish(self, send: Send, reply: Reply) -> None:
        # With include_usage OpenAI sends usage alone in a last chunk without choices; without it,
        # on the finishing chunk (as llama-server does), so a client always learns the counts.
        last = self.completion.chunk({}, finish_reason(reply), None if self.chat.include_usage else usage(reply))
        await self._event(send, last)
        if self.chat.include_usage:
            await self._event(send, self.completion.usage_chunk(reply))
        await send({"type": "http.response.body", "body": DONE, "more_body": False})

    @staticmethod
    async def _event(send: Send, obj: dict[str, Any]) -> None:
        await send({"type": "http.response.body", "body": sse(obj), "more_body": True})


def _failure(exc: BaseException | None) -> JSONResponse:
    """The response for what ended a job before its answer."""
    return _error_response(_as_request_error(exc, "while answering"))


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
