"""The question-to-answer path (files -> processor -> model -> text) against transformers' own.

The reference is transformers' AriaProcessor + AriaForConditionalGeneration.generate on the same
checkpoint directory; ours is runtime.assistant. Same picture, same question: same token ids.
"""

from __future__ import annotations

import gc
import io
import threading
import weakref

import pytest
import torch
from PIL import Image

from runtime.assistant import Assistant, Conversation, GenerationOptions
from runtime.chat_template import render_prompt
from runtime.image_processing import preprocess_images
from runtime.image_sources import load_image
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


def reference_inputs(checkpoint, text: str, images: list[Image.Image]):
    """AriaProcessor's input_ids / pixel_values / pixel_mask for a prompt string and its pictures."""
    from transformers import AriaImageProcessorPil, AriaProcessor

    tokenizer = reference_tokenizer(checkpoint)
    processor = AriaProcessor(image_processor=AriaImageProcessorPil(), tokenizer=tokenizer,
                              size_conversion={490: 8, 980: 16})
    return processor(text=text, images=images or None, return_tensors="pt")


def reference_tokens_for_prompt(checkpoint, text: str, images: list[Image.Image], n: int) -> list[int]:
    inputs = reference_inputs(checkpoint, text, images)
    model = reference_model(checkpoint)
    return reference_greedy(model, inputs["input_ids"], n, inputs.get("pixel_values"), inputs.get("pixel_mask"))


def reference_tokens(checkpoint, conversation: Conversation, n: int) -> list[int]:
    # The prompt string: render_prompt is proven equal to the reference template in test_chat_template.py.
    return reference_tokens_for_prompt(checkpoint, render_prompt(conversation.messages()), conversation.images(), n)


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


# ---------------------------------------------------------------- pictures behind the cache


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_another_picture_behind_the_same_tokens_is_not_answered_from_the_cache(checkpoint, assistant):
    """Every picture's tokens are the same id: the same question about another picture of the
    same size is the same prompt ids. Once answered from the first picture's keys and values."""
    red, blue = Conversation(), Conversation()
    red.add("user", "What colour is the box?", [picture("red")])
    blue.add("user", "What colour is the box?", [picture("blue")])
    ids, _ = assistant.prompt_ids(blue)
    assert ids == assistant.prompt_ids(red)[0], "the test needs two pictures behind identical token ids"
    expected_red, expected_blue = reference_tokens(checkpoint, red, 8), reference_tokens(checkpoint, blue, 8)
    assert expected_red != expected_blue, "the test needs pictures the reference answers differently"

    assistant.reset()
    options = GenerationOptions(max_tokens=8, stop=())
    first = assistant.reply(red, options)
    first.read()
    assert first.tokens == expected_red[: len(first.tokens)]
    second = assistant.reply(blue, options)
    second.read()
    assert len(second.tokens) >= 4 and second.tokens != expected_red[: len(second.tokens)]
    assert second.tokens == expected_blue[: len(second.tokens)]
    # The text before the picture came from the cache; the picture and all after it did not.
    picture_at = ids.index(assistant.config.image_token_index)
    reused = second.stats.prompt_tokens - second.stats.prefilled_tokens
    assert second.stats.prompt_tokens == len(ids) and 0 < reused <= picture_at


def test_the_same_picture_as_a_new_object_reuses_the_cache_past_it(checkpoint, assistant):
    """A server gets the whole conversation again with every request, its pictures decoded anew:
    same pixels, so only the new turn is prefilled."""
    assistant.reset()
    original = picture("red")
    chat = Conversation()
    chat.add("user", "Describe the picture.", [original])
    first = assistant.reply(chat, GenerationOptions(max_tokens=6, stop=()))
    first.read()

    reopened = load_image(_png(original))
    assert reopened is not original
    assert preprocess_images([reopened], 980).key() == preprocess_images([original], 980).key()
    again = Conversation()
    again.add("user", "Describe the picture.", [reopened])
    again.add("assistant", first.text)
    again.add("user", "And its colours?")
    second = assistant.reply(again, GenerationOptions(max_tokens=8, stop=()))
    second.read()
    reused = second.stats.prompt_tokens - second.stats.prefilled_tokens
    assert reused >= first.stats.prompt_tokens, "the first prompt, picture included, comes from the cache"
    assert len(second.tokens) >= 4
    assert second.tokens == reference_tokens(checkpoint, again, 8)[: len(second.tokens)]


def test_pictures_are_let_go_once_they_leave_the_conversation(assistant):
    assistant.reset()
    image = picture("yellow")
    gone = weakref.ref(image)
    chat = Conversation()
    chat.add("user", "What is it?", [image])
    assistant.reply(chat, GenerationOptions(max_tokens=2)).read()
    del chat, image
    other = Conversation()
    other.add("user", "Hello!")
    assistant.reply(other, GenerationOptions(max_tokens=2)).read()
    gc.collect()
    assert gone() is None


# ---------------------------------------------------------------- cancel


class _SetFrom:
    """is_set() is False until its k-th call, True from then on."""

    def __init__(self, k: int):
        self.k, self.calls = k, 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls >= self.k


def test_cancel_ends_the_reply_at_that_token_and_the_chat_goes_on(checkpoint, assistant):
    assistant.reset()
    chat = Conversation()
    chat.add("user", "What is in the image?", [picture()])
    expected = reference_tokens(checkpoint, chat, 8)
    reply = assistant.reply(chat, GenerationOptions(max_tokens=8, stop=()), cancel=_SetFrom(3))
    reply.read()
    assert reply.finish_reason == "interrupted" and reply.tokens == expected[:3]
    assert reply.stats.completion_tokens == 3

    chat.add("assistant", reply.text, interrupted=True)
    chat.add("user", "Go on.")
    after = assistant.reply(chat, GenerationOptions(max_tokens=8, stop=()))
    after.read()
    assert after.stats.prefilled_tokens < after.stats.prompt_tokens  # the cache behind the cut answer was kept
    assert len(after.tokens) >= 4 and after.tokens == reference_tokens(checkpoint, chat, 8)[: len(after.tokens)]

    # A threading.Event fits; set before the reply, it ends after the first token.
    event = threading.Event()
    event.set()
    early = assistant.reply(chat, GenerationOptions(max_tokens=8, stop=()), cancel=event)
    early.read()
    assert early.finish_reason == "interrupted" and early.tokens == after.tokens[:1]


# ---------------------------------------------------------------- pictures inside the text


def test_a_picture_inside_the_text_matches_the_reference_template(checkpoint, assistant):
    from tests.test_chat_template import ARIA_CHAT_TEMPLATE

    before, after = "Look: ", " What is it?"
    image = picture("green")
    chat = Conversation()
    chat.add("user", before + after, [image], image_offsets=[len(before)])
    messages = [{"role": "user", "content": [
        {"type": "text", "text": before}, {"type": "image"}, {"type": "text", "text": after},
    ]}]
    text = reference_tokenizer(checkpoint).apply_chat_template(
        messages, chat_template=ARIA_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert text.index(before) < text.index("<|img|>") < text.index(after)
    ids, _ = assistant.prompt_ids(chat)
    assert ids == reference_inputs(checkpoint, text, [image])["input_ids"][0].tolist()

    assistant.reset()
    reply = assistant.reply(chat, GenerationOptions(max_tokens=8, stop=()))
    reply.read()
    assert len(reply.tokens) >= 4
    assert reply.tokens == reference_tokens_for_prompt(checkpoint, text, [image], 8)[: len(reply.tokens)]


@pytest.mark.parametrize(("offsets", "content"), [
    ([0], [{"type": "image"}, {"type": "text", "text": "Two words."}]),
    ([10], [{"type": "text", "text": "Two words."}, {"type": "image"}]),
    ([0, 4], [{"type": "image"}, {"type": "text", "text": "Two "}, {"type": "image"},
              {"type": "text", "text": "words."}]),
    ([4, 4], [{"type": "text", "text": "Two "}, {"type": "image"}, {"type": "image"},
              {"type": "text", "text": "words."}]),
])
def test_pictures_at_the_edges_and_together_render_as_the_template_does(checkpoint, offsets, content):
    from tests.test_chat_template import ARIA_CHAT_TEMPLATE

    chat = Conversation()
    chat.add("user", "Two words.", [picture()] * len(offsets), image_offsets=offsets)
    expected = reference_tokenizer(checkpoint).apply_chat_template(
        [{"role": "user", "content": content}], chat_template=ARIA_CHAT_TEMPLATE, tokenize=False,
        add_generation_prompt=True)
    assert render_prompt(chat.messages()) == expected
