"""A `POST /v1/chat/completions` body, checked field by field, into what the runtime answers.

Follows OpenAI's Chat Completions request: `messages` with text and `image_url` parts, `model`,
`stream` and `stream_options.include_usage`, `max_tokens` / `max_completion_tokens`,
`temperature`, `top_p`, `seed`, `stop`, `n` (1 only), plus `top_k` as vLLM and llama-server take
it. Fields that change an answer in a way this server cannot honour (tools, logprobs, penalties,
a JSON response format...) are refused rather than ignored; bookkeeping fields (`user`,
`metadata`, `store`...) are ignored. Every problem is a RequestError naming the field (`param`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The roles Aria's template knows; OpenAI's newer "developer" role is its system prompt.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MAX_STOPS = 16
_MAX_SEED = 2**64 - 1
# Fields whose meaning this server cannot honour: a client asking for them must hear so.
_UNSUPPORTED = {
    "tools": "tool calling", "functions": "function calling", "logprobs": "log probabilities",
    "top_logprobs": "log probabilities", "logit_bias": "logit bias", "audio": "audio output",
    "prediction": "predicted outputs",
}
_ZERO_MEANS_OFF = ("frequency_penalty", "presence_penalty")


class RequestError(Exception):
    """What is wrong with a request, as an OpenAI error object says it (see completions.error_body)."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
        self.headers = headers or {}


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    text: str  # its text parts, joined with nothing between (as Aria's template joins them)
    images: tuple[str, ...] = ()  # image URLs (data: or http(s)), in order
    image_offsets: tuple[int, ...] = ()  # where each stands in `text`


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    messages: tuple[Message, ...]
    stream: bool = False
    include_usage: bool = False
    # Generation settings the request gives, by setting name (max_tokens, temperature, top_p,
    # top_k, seed, stop); the server's own flags fill in the rest.
    settings: dict[str, Any] = field(default_factory=dict)


def parse_chat_request(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string", param="model")
    for name, what in _UNSUPPORTED.items():
        if body.get(name) not in (None, False, [], {}):
            raise RequestError(f"'{name}' is not supported: this server has no {what}", param=name,
                               code="unsupported_parameter")
    for name in _ZERO_MEANS_OFF:
        if _number(body, name) not in (None, 0):
            raise RequestError(f"'{name}' is not supported; leave it out or 0", param=name,
                               code="unsupported_parameter")
    _check_response_format(body.get("response_format"))
    _check_tool_choice(body.get("tool_choice"))
    n = _integer(body, "n", low=1)
    if n not in (None, 1):
        raise RequestError("'n' must be 1: this server gives one answer per request", param="n")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    include_usage = bool(options) and _boolean(options, "include_usage", "stream_options.include_usage")
    if options and not stream:
        raise RequestError("'stream_options' is only allowed with 'stream': true", param="stream_options")
    return ChatRequest(model, _messages(body.get("messages")), stream, include_usage, _settings(body))


def _settings(body: dict[str, Any]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    max_tokens = _integer(body, "max_tokens", low=1)
    newer = _integer(body, "max_completion_tokens", low=1)
    if max_tokens is not None and newer is not None and max_tokens != newer:
        raise RequestError("'max_tokens' and 'max_completion_tokens' disagree; give one", param="max_tokens")
    if (newer or max_tokens) is not None:
        settings["max_tokens"] = newer or max_tokens
    temperature = _number(body, "temperature")
    if temperature is not None:
        if not 0 <= temperature <= 2:
            raise RequestError(f"'temperature' must be from 0 to 2 (got {temperature:g})", param="temperature")
        settings["temperature"] = float(temperature)
    top_p = _number(body, "top_p")
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise RequestError(f"'top_p' must be more than 0 and at most 1 (got {top_p:g})", param="top_p")
        settings["top_p"] = float(top_p)
    top_k = _integer(body, "top_k", low=0)
    if top_k is not None:
        settings["top_k"] = top_k
    seed = _integer(body, "seed", low=0)
    if seed is not None:
        if seed > _MAX_SEED:
            raise RequestError(f"'seed' must be at most {_MAX_SEED}", param="seed")
        settings["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise RequestError("'stop' must be a string or a list of strings", param="stop")
        if len(stops) > _MAX_STOPS:
            raise RequestError(f"'stop' takes at most {_MAX_STOPS} strings", param="stop")
        _no_lone_surrogates(stops, "stop")
        settings["stop"] = tuple(s for s in stops if s)
    return settings


def _messages(raw: Any) -> tuple[Message, ...]:
    if raw is None:
        raise RequestError("'messages' is required: a list of {role, content} objects", param="messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    return tuple(_message(item, i) for i, item in enumerate(raw))


def _message(item: Any, i: int) -> Message:
    where = f"messages[{i}]"
    if not isinstance(item, dict):
        raise RequestError(f"{where} must be an object with 'role' and 'content'", param=where)
    role = _ROLES.get(item.get("role")) if isinstance(item.get("role"), str) else None
    if role is None:
        raise RequestError(f"{where}.role must be one of system, developer, user, assistant (got "
                           f"{_shown(item.get('role'))}); tool messages are not supported", param=f"{where}.role")
    if item.get("tool_calls") or item.get("function_call"):
        raise RequestError(f"{where} has tool calls, which this server does not support", param=f"{where}.tool_calls")
    content = item.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        _no_lone_surrogates([content], f"{where}.content")
        return Message(role, content)
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
    text, images, offsets = "", [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            piece = part.get("text")
            if not isinstance(piece, str):
                raise RequestError(f"{at}.text must be a string", param=f"{at}.text")
            _no_lone_surrogates([piece], f"{at}.text")
            text += piece
        elif kind == "image_url":
            if role != "user":
                raise RequestError(f"{at}: pictures go in user messages", param=at)
            images.append(_image_url(part.get("image_url"), at))
            offsets.append(len(text))
        else:
            raise RequestError(f"{at} must be a part of type 'text' or 'image_url' (got {_shown(kind)})", param=at)
    return Message(role, text, tuple(images), tuple(offsets))


def _image_url(raw: Any, at: str) -> str:
    url = raw.get("url") if isinstance(raw, dict) else raw  # some clients send the URL itself
    if not isinstance(url, str) or not url:
        raise RequestError(f"{at}.image_url must be an object with a 'url' string", param=f"{at}.image_url")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("data", "http", "https"):
        raise RequestError(f"{at}.image_url.url must be a data: URL or an http(s) URL (the server reads no local "
                           "files); e.g. data:image/png;base64,...", param=f"{at}.image_url.url")
    return url


def _check_response_format(raw: Any) -> None:
    if raw is None:
        return
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind != "text":
        raise RequestError(f"'response_format' of type {_shown(kind)} is not supported; only 'text'",
                           param="response_format", code="unsupported_parameter")


def _check_tool_choice(raw: Any) -> None:
    if raw not in (None, "none", "auto"):
        raise RequestError("'tool_choice' is not supported: this server has no tool calling", param="tool_choice",
                           code="unsupported_parameter")


def _boolean(body: dict[str, Any], name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{param or name}' must be true or false", param=param or name)
    return value


def _integer(body: dict[str, Any], name: str, *, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer", param=name)
    if value < low:
        raise RequestError(f"'{name}' must be at least {low} (got {value})", param=name)
    return value


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{name}' must be a number", param=name)
    return value


def _no_lone_surrogates(texts: list[str], param: str) -> None:
    # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer can encode.
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(f"{param} holds a lone UTF-16 surrogate (a broken \\u escape); send valid text",
                               param=param) from None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
