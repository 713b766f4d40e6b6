"""The demo model: a tiny Aria, trained on the shapes task, that ships inside the package.

It has Aria's exact architecture (routed + shared experts, vision tower, projector) at toy sizes
and the hub file layout, so `aria demo` and `aria ask --model demo PICTURE QUESTION` run the real
loading, preprocessing and generation path offline on a CPU in seconds, and its answers can be
right or wrong (runtime/shapes_task.py). scripts/train_demo.py makes it; scripts/eval_demo.py
measures it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from .demo_paths import DEMO_EXAMPLES_DIR, DEMO_MODEL_DIR

DEMO_QUESTION = "What is this?"
# Answers of the task are at most four tokens plus <|im_end|>; a little room for a wrong, longer one.
DEMO_MAX_TOKENS = 16


def demo_examples() -> list[Path]:
    """The example pictures shipped with the demo model, in name order."""
    return sorted(DEMO_EXAMPLES_DIR.glob("*.png"))


@lru_cache(maxsize=4)
def open_demo(dtype: torch.dtype = torch.float32, model_dir: str | Path = DEMO_MODEL_DIR):
    """The demo model behind an Assistant (loaded once per dtype and directory)."""
    from .assistant import Assistant

    return Assistant.open(model_dir, dtype=dtype, device="cpu", name="demo")


def ask_demo(image: Image.Image | str | Path, question: str = DEMO_QUESTION, assistant=None):
    """Ask about one picture (a PIL image or a file) in a new conversation; returns the finished
    `Reply` (its `text`, `tokens`, `stats`). `assistant`: another model to ask the same way
    (e.g. a quantized load of the demo model); default the demo model in float32."""
    from .assistant import Conversation, GenerationOptions
    from .image_sources import load_image

    if not isinstance(image, Image.Image):
        image = load_image(str(image), offline=True)
    assistant = assistant or open_demo()
    # A fresh one-question conversation each time. The session matches cached prompts by token
    # ids, and every picture's image tokens have the same id: without the reset, a new picture
    # asked the same question would be answered from the previous picture's cache.
    assistant.reset()
    chat = Conversation()
    chat.add("user", question, [image])
    try:
        reply = assistant.reply(chat, GenerationOptions(max_tokens=DEMO_MAX_TOKENS))
        reply.read()
        return reply
    finally:
        assistant.forget_pictures()


def answer_demo(image: Image.Image | str | Path, question: str = DEMO_QUESTION, assistant=None) -> str:
    """The demo model's greedy answer to `question` about one picture, e.g. "a red circle"."""
    return ask_demo(image, question, assistant).text.strip()
