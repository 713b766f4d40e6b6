"""Conversation -> prompt string -> token ids, in Aria's format (ARIA_SPEC §5.2).

The string is exactly what the chat template shipped with the model renders:

    for each message:  <|im_start|>{role}\\n{content}<|im_end|>\\n
    generation prompt: <|im_start|>assistant\\n

A message's content is a string, or a list of items: {"type": "text", "text": ...} items are
concatenated with no separator and each {"type": "image", ...} item becomes
`<fim_prefix><|img|><fim_suffix>`. No default system prompt and no BOS.

Before tokenizing, each picture's single `<|img|>` is expanded to the number of image tokens that
picture needs (its own crops x tokens per crop; never one count shared by all pictures, P6).
Where the template would silently drop something (an unknown item type, text that is not a
string) we raise InputError instead: a dropped picture or sentence is never what the user meant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InputError
from .tokenizer import FIM_PREFIX, FIM_SUFFIX, IM_END, IM_START, IMAGE_TOKEN, Tokenizer

IMAGE_PLACEHOLDER = f"{FIM_PREFIX}{IMAGE_TOKEN}{FIM_SUFFIX}"
GENERATION_PROMPT = f"{IM_START}assistant\n"

Message = Mapping[str, Any]


def render_prompt(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The prompt string of a conversation, one `<|img|>` per picture (not yet expanded)."""
    parts = []
    for number, message in enumerate(_check_messages(messages), start=1):
        parts.append(f"{IM_START}{message['role']}\n")
        content = message.get("content")
        if isinstance(content, str):
            parts.append(_checked_text(content, number))
        elif content is not None:
            for item in content:
                kind = item.get("type") if isinstance(item, Mapping) else None
                if kind == "text":
                    parts.append(_checked_text(item.get("text"), number))
                elif kind == "image":
                    parts.append(IMAGE_PLACEHOLDER)
                else:
                    raise InputError(
                        f"message {number} has a content item of type {kind!r}; use 'text' or 'image' items"
                    )
        parts.append(f"{IM_END}\n")
    if add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    return "".join(parts)


def count_images(messages: Sequence[Message]) -> int:
    """Number of image items in a conversation (= pictures its prompt expects, in order)."""
    return sum(
        1
        for message in messages
        if isinstance(message.get("content"), (list, tuple))
        for item in message["content"]
        if isinstance(item, Mapping) and item.get("type") == "image"
    )


def expand_image_tokens(prompt: str, image_token_counts: Sequence[int]) -> str:
    """Replace the i-th `<|img|>` of `prompt` by image_token_counts[i] copies of it."""
    pieces = prompt.split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(image_token_counts):
        raise InputError(
            f"the prompt has {len(pieces) - 1} image(s) but {len(image_token_counts)} were given; "
            "attach one image per image item"
        )
    out = [pieces[0]]
    for count, rest in zip(image_token_counts, pieces[1:]):
        out.append(IMAGE_TOKEN * count)
        out.append(rest)
    return "".join(out)


def encode_prompt(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    image_token_counts: Sequence[int] = (),
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of a conversation with each picture's `<|img|>` run expanded.

    image_token_counts: per picture, in the order the image items appear (for example
    `ProcessedImages.image_token_counts(config.tokens_per_crop(crop_size))`).
    """
    prompt = expand_image_tokens(render_prompt(messages, add_generation_prompt), image_token_counts)
    ids = tokenizer.encode(prompt)
    found = sum(1 for i in ids if i == tokenizer.image_token_id)
    if found != sum(image_token_counts):  # would break the feature scatter; cannot happen unless the file is odd
        raise InputError(f"the prompt encodes {found} image tokens but the images need {sum(image_token_counts)}")
    return ids


def _check_messages(messages: Sequence[Message]) -> Sequence[Message]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError("a conversation must be a list of messages")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping):
            raise InputError(f"message {number} is not an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InputError(f"message {number} has no role; use 'system', 'user' or 'assistant'")
        _checked_text(role, number)
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list, tuple)):
            raise InputError(f"message {number} content must be text or a list of items")
    return messages


def _checked_text(text: Any, number: int) -> str:
    if not isinstance(text, str):
        raise InputError(f"message {number} has a text item whose text is not a string")
    if IMAGE_TOKEN in text:
        # A literal marker would be taken for a picture and break the image token count.
        raise InputError(f"message {number} contains the reserved marker {IMAGE_TOKEN}; remove it from the text")
    return text
