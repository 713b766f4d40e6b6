"""What the server sends: OpenAI's chat completion object, its stream chunks and error objects.

Field for field as OpenAI's Chat Completions API returns them, so the official clients parse
them. `finish_reason` is "stop" (an end token or a stop text) or "length" (the token limit, a
full context, or an answer the server cut short when it was told to stop). `usage` counts the
prompt's tokens (`prompt_tokens_details.cached_tokens`: how many of them the KV cache already
held from the previous request) and the answer's.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from runtime.assistant import Reply


@dataclass(frozen=True)
class Completion:
    """One request's identity, shared by its chunks."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self, reply: Reply) -> dict[str, Any]:
        message = {"role": "assistant", "content": reply.text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(reply)}
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage(reply)}

    def chunk(self, delta: dict[str, Any], finish: str | None = None,
              with_usage: dict[str, Any] | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        if with_usage is not None:
            out["usage"] = with_usage
        return out

    def usage_chunk(self, reply: Reply) -> dict[str, Any]:
        """The last chunk when the client asked for `stream_options.include_usage`: no choices."""
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage(reply)}


def finish_reason(reply: Reply) -> str:
    # "interrupted" (the server cut the answer on a stop signal) is not in OpenAI's vocabulary:
    # the answer is incomplete, which is what "length" tells a client.
    return "stop" if reply.finish_reason == "stop" else "length"


def usage(reply: Reply) -> dict[str, Any]:
    s = reply.stats
    return {
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": s.prompt_tokens - s.prefilled_tokens},
    }


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(obj: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")
