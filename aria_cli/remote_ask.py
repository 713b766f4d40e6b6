"""`aria ask --server URL`: the question goes to a running `aria serve` (ollama's split), so a
large model is loaded once and each question costs only its answer.

Pictures travel as data: URLs (paths and standard input) or as the URLs they are; the answer
streams back over server-sent events into the same output as a local answer. Only the standard
library speaks HTTP here: the client side needs nothing the server side does not.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from runtime.assistant import Reply
from runtime.errors import AriaError, UsageError
from runtime.image_sources import decode_image, image_bytes

from .options import RunOptions
from .settings import SETTINGS

_TIMEOUT_S = 600  # per read: a long prefill on a big model sends nothing for a while


def picture_url(source: str, offline: bool) -> str:
    """What the server is sent for one picture: a URL stays a URL, the rest becomes a data: URL
    of the file's own bytes (checked here first, so a bad path fails before anything is sent)."""
    if source.lower().startswith(("http://", "https://", "data:")):
        return source
    data, name = image_bytes(source, offline=offline)
    decode_image(data, name)  # the same checks as a local ask
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def request_body(opts: RunOptions, prompt: str, pictures: list[str]) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in pictures]
    content.append({"type": "text", "text": prompt})
    messages = ([{"role": "system", "content": opts.system}] if opts.system else []) + [
        {"role": "user", "content": content}]
    body: dict[str, Any] = {
        "messages": messages, "stream": True, "max_tokens": opts.max_tokens, "temperature": opts.temperature,
        "top_p": opts.top_p, "top_k": opts.top_k, "stop": list(opts.stop),
    }
    if opts.seed is not None:
        body["seed"] = opts.seed
    if opts.model != SETTINGS["model"].default:  # named on purpose: the server checks it is the one it runs
        body["model"] = opts.model
    return body


def remote_reply(server: str, body: dict[str, Any]) -> Reply:
    """The server's streamed answer as a Reply (closing it closes the connection)."""
    conn, path = _connect(server)
    reply = Reply(iter(()))
    reply._chunks = _stream(reply, conn, path, body, server)
    return reply


def _connect(server: str) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(server if "://" in server else f"http://{server}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--server {server}: give the server's URL, like http://127.0.0.1:8000")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    try:
        conn = kind(parts.hostname, parts.port, timeout=_TIMEOUT_S)
    except ValueError:  # a port that is not a number
        raise UsageError(f"--server {server}: give the server's URL, like http://127.0.0.1:8000") from None
    base = parts.path.rstrip("/")
    return conn, (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"


def _stream(reply: Reply, conn: http.client.HTTPConnection, path: str, body: dict[str, Any],
            server: str) -> Iterator[str]:
    key = os.environ.get("ARIA_API_KEY")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        try:
            conn.request("POST", path, json.dumps(body), headers)
            response = conn.getresponse()
        except OSError as exc:
            raise AriaError(f"cannot reach aria serve at {server} ({exc.strerror or exc}); start it with "
                            "`aria serve`, or check --server") from None
        if response.status != 200:
            raise AriaError(f"the server at {server} refused the question (HTTP {response.status}): "
                            f"{_error_message(response.read())}")
        for event in _events(response):
            if "error" in event:
                raise AriaError(f"the server at {server} failed mid-answer: {_error_message(json.dumps(event))}")
            usage = event.get("usage")
            if usage:
                reply.stats.prompt_tokens = usage.get("prompt_tokens", 0)
                reply.stats.completion_tokens = usage.get("completion_tokens", 0)
            for choice in event.get("choices") or ():
                if choice.get("finish_reason"):
                    reply.finish_reason = choice["finish_reason"]
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text
    except (http.client.HTTPException, OSError, ValueError) as exc:  # ValueError: an event that is not JSON
        raise AriaError(f"the connection to {server} broke mid-answer ({exc}); try again") from None
    finally:
        conn.close()


def _events(response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    for raw in response:
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _error_message(payload: bytes | str) -> str:
    try:
        return str(json.loads(payload)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        text = payload.decode("utf-8", errors="replace") if isinstance(payload, bytes) else payload
        return text.strip()[:200] or "no reason given"
