"""The question-to-answer path (files -> processor -> model -> text) against transformers' own.

The reference is transformers' AriaProcessor + AriaForConditionalGeneration.generate on the same
checkpoint directory; ours is runtime.assistant. Same picture, same question: same token ids.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from runtime.assistant import Assistant, Conversation, GenerationOptions
from runtime.chat_template import render_prompt
from runtime.sampling import SamplingParams
from runtime.tiny_checkpoint import write_tiny_checkpoint
from tests.oracle import reference_greedy, reference_model, reference_tokenizer

N = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("assistant"), seed=21)


@pytest.fixture(scope="module")
def assistant(checkpoint):
    return Assistant.open(checkpoint, dtype=torch.float32)


def picture(colour="red", size=(640, 400)):
    image = Image.new("RGB", size, "white")
    image.paste(Image.new("RGB", (size[0] // 2, size[1] // 3), colour), (size[0] // 4, size[1] // 3))
    return image


def reference_tokens(checkpoint, conversation: Conversation, n: int) -> list[int]:
    from transformers import AriaImageProcessorPil, AriaProcessor

    tokenizer = reference_tokenizer(checkpoint)
    processor = AriaProcessor(image_processor=AriaImageProcessorPil(), tokenizer=tokenizer,
                              size_conversion={490: 8, 980: 16})
    images = conversation.images()
    # The prompt string: render_prompt is proven equal to the reference template in test_chat_template.py.
    text = render_prompt(conversation.messages())
    inputs = processor(text=text, images=images or None, return_tensors="pt")
    model = reference_model(checkpoint)
    pixel_values = inputs.get("pixel_values")
    return reference_greedy(model, inputs["input_ids"], n, pixel_values, inputs.get("pixel_mask"))


def test_answer_tokens_match_the_reference_pipeline(checkpoint, assistant):
    chat = Conversation()
    chat.add("user", "What is in the image?", [picture()])
    reply = assistant.reply(chat, GenerationOptions(max_tokens=N, stop=()))
    reply.read()
    # Our tokenizer's stop ids (im_end, eos) may end the reply early; the reference runs N tokens.
    assert len(reply.tokens) >= 8, "the comparison needs a real stretch of generated tokens"
    assert reply.tokens == reference_tokens(checkpoint, chat, N)[: len(reply.tokens)]
    assert reply.stats.prompt_tokens > 16 and reply.stats.completion_tokens == len(reply.tokens)


def test_length_limit_and_follow_up_reuses_the_cache(assistant):
    assistant.reset()
    chat = Conversation()
    chat.add("user", "Describe this picture in one sentence.", [picture("blue")])
    first = assistant.reply(chat, GenerationOptions(max_tokens=5))
    first.read()
    chat.add("assistant", first.text)
    chat.add("user", "Thank you!")
    second = assistant.reply(chat, GenerationOptions(max_tokens=5))
    second.read()
    assert second.stats.prefilled_tokens < second.stats.prompt_tokens
    if first.finish_reason == "length":
        assert len(first.tokens) == 5


def test_stop_string_is_not_shown_and_ends_the_reply(assistant):
    assistant.reset()
    chat = Conversation()
    chat.add("user", "Hello world!")
    full = assistant.reply(chat, GenerationOptions(max_tokens=30)).read()
    assert len(full) > 4, "need some text to pick a stop string from"
    stop = full[2:4]
    assistant.reset()
    cut = assistant.reply(chat, GenerationOptions(max_tokens=30, stop=(stop,)))
    text = cut.read()
    assert cut.finish_reason == "stop"
    assert stop not in text and full.startswith(text) and full.index(stop) == len(text)


def test_interrupt_keeps_what_was_said_and_the_chat_goes_on(checkpoint, assistant):
    assistant.reset()
    chat = Conversation()
    chat.add("user", "How many people can you see?", [picture("green")])
    reply = assistant.reply(chat, GenerationOptions(max_tokens=20))
    chunks = iter(reply)
    next(chunks)
    reply.interrupt()
    assert reply.finish_reason == "interrupted" and reply.tokens
    chat.add("assistant", reply.text, interrupted=True)
    chat.add("user", "Go on.")
    after_interrupt = assistant.reply(chat, GenerationOptions(max_tokens=8))
    after_interrupt.read()

    fresh = Assistant.open(checkpoint, dtype=torch.float32)
    expected = fresh.reply(chat, GenerationOptions(max_tokens=8))
    expected.read()
    assert after_interrupt.tokens == expected.tokens


def test_seeded_sampling_is_reproducible(assistant):
    chat = Conversation()
    chat.add("user", "Hello world!")
    options = GenerationOptions(max_tokens=12, sampling=SamplingParams(temperature=1.0, top_p=0.9, seed=3))
    runs = []
    for _ in range(2):
        assistant.reset()
        reply = assistant.reply(chat, options)
        reply.read()
        runs.append(reply.tokens)
    assert runs[0] == runs[1]


def test_pictures_that_alone_overflow_the_context_are_refused_before_decoding(checkpoint, monkeypatch):
    """Each picture costs at least one crop's tokens; a transcript naming one picture 2000 times
    once filled all memory preprocessing them before the context check."""
    import runtime.assistant as assistant_module
    from runtime.errors import InputError

    small = Assistant.open(checkpoint, dtype=torch.float32, max_context=64)
    per_crop = small.config.tokens_per_crop(small.crop_size)
    decoded = []
    monkeypatch.setattr(assistant_module, "preprocess_images", lambda *a, **k: decoded.append(1))
    chat = Conversation()
    chat.add("user", "What are these?", [picture()] * (64 // per_crop + 1))
    with pytest.raises(InputError, match="the conversation needs"):
        small.prompt_ids(chat)
    assert decoded == []


def test_the_picture_marker_never_enters_a_conversation(assistant):
    """Once in, every later prompt would be refused (chat_template); so it is refused on the way
    in, nothing added, and the conversation still answers."""
    from runtime.errors import InputError

    chat = Conversation()
    chat.set_system("Be brief.")
    for role, what in (("system", "the system prompt"), ("user", "the message"), ("assistant", "the answer")):
        with pytest.raises(InputError, match=f"^{what} contains <\\|img\\|>"):
            if role == "system":
                chat.set_system("see <|img|>")
            else:
                chat.add(role, "see <|img|> here")
    assert [(t.role, t.text) for t in chat.turns] == [("system", "Be brief.")]
    chat.add("user", "What is this?", [picture()])
    assert assistant.reply(chat, GenerationOptions(max_tokens=3)).read() is not None
