"""Prompt format: string equality with the Jinja template rendered by transformers, token ids and
pixels equal to transformers' AriaProcessor, per-image expansion, and input errors."""


import numpy as np
import pytest
from PIL import Image
from transformers import AriaProcessor
from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil

from runtime.chat_template import count_images, encode_prompt, expand_image_tokens, render_prompt
from runtime.config import AriaConfig
from runtime.errors import InputError
from runtime.image_processing import preprocess_images
from runtime.tiny_tokenizer import train_tiny_tokenizer
from runtime.tokenizer import Tokenizer
from tests.oracle import reference_tokenizer

# The chat template shipped with rhymes-ai/Aria (ARIA_SPEC §5.2), verbatim.
ARIA_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% elif message['content'] is iterable %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% elif item['type'] == 'image' %}"
    "<fim_prefix><|img|><fim_suffix>{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONVERSATIONS = {
    "text-only": [{"role": "user", "content": "Hello there!"}],
    "system-user-assistant": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
    "one-image": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}
    ],
    "several-images": [
        {"role": "user", "content": [
            {"type": "text", "text": "Compare "},
            {"type": "image", "path": "a.png"},
            {"type": "text", "text": " and "},
            {"type": "image", "path": "b.png"},
            {"type": "text", "text": ".\nWhich is brighter?"},
        ]},
        {"role": "assistant", "content": [{"type": "text", "text": "The first one."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
    ],
    "unicode-and-whitespace": [
        {"role": "system", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "  日本語 😀\n\n\ttabs  "}]},
    ],
    "empty-content": [{"role": "user", "content": None}, {"role": "assistant", "content": []}],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    train_tiny_tokenizer(directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    return reference_tokenizer(model_dir)


def _config(tokens_490=3, tokens_980=5):
    return AriaConfig.from_dict({
        "projector_patch_to_query_dict": {"1225": tokens_490, "4900": tokens_980},
        "text_config": {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                        "moe_num_experts": 4, "moe_topk": 2, "intermediate_size": 32},
        "vision_config": {"hidden_size": 32, "num_attention_heads": 2, "patch_size": 14, "image_size": 980},
    })


def _picture(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# ---------------------------------------------------------------- the string


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_string_equals_jinja_template(hf_tokenizer, name, generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=ARIA_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert render_prompt(messages, add_generation_prompt=generation_prompt) == expected


def test_spec_example_by_hand():
    assert render_prompt(CONVERSATIONS["one-image"]) == (
        "<|im_start|>user\n<fim_prefix><|img|><fim_suffix>What is in the image?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_expansion_per_image():
    prompt = render_prompt(CONVERSATIONS["several-images"])
    assert count_images(CONVERSATIONS["several-images"]) == 3
    expanded = expand_image_tokens(prompt, [2, 4, 1])
    assert expanded.count("<fim_prefix><|img|><|img|><fim_suffix>") == 1
    assert expanded.count("<fim_prefix><|img|><|img|><|img|><|img|><fim_suffix>") == 1
    assert expanded.count("<fim_prefix><|img|><fim_suffix>") == 1
    assert expanded.index("<|img|><|img|><fim_suffix>") < expanded.index("<|img|><|img|><|img|><|img|>")


# ---------------------------------------------------------------- ids and pixels vs AriaProcessor


@pytest.mark.parametrize("crop_size", [490, 980])
def test_ids_and_pixels_match_aria_processor(hf_tokenizer, tok, crop_size):
    config = _config()
    messages = CONVERSATIONS["several-images"]
    pictures = [_picture(300, 200, 1), _picture(120, 400, 2), _picture(640, 480, 3)]
    processor = AriaProcessor(
        image_processor=AriaImageProcessorPil(), tokenizer=hf_tokenizer,
        size_conversion={490: config.tokens_per_crop(490), 980: config.tokens_per_crop(980)},
    )
    reference = processor(
        text=render_prompt(messages), images=pictures, max_image_size=crop_size, return_tensors="np"
    )

    images = preprocess_images(pictures, crop_size)
    ids = encode_prompt(tok, messages, images.image_token_counts(config.tokens_per_crop(crop_size)))
    assert ids == reference["input_ids"][0].tolist()
    assert np.abs(images.pixel_values.numpy() - reference["pixel_values"]).max() <= 1e-6
    assert np.array_equal(images.pixel_mask.numpy(), reference["pixel_mask"])


def test_split_images_get_their_own_counts(tok):
    config = _config()
    pictures = [_picture(1024, 768, 4), _picture(800, 800, 5)]  # 7 and 5 crops at 490
    images = preprocess_images(pictures, 490, split=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}]
    ids = encode_prompt(tok, messages, images.image_token_counts(config.tokens_per_crop(490)))
    runs, current = [], 0
    for i in ids:
        if i == tok.image_token_id:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    assert runs == [7 * 3, 5 * 3]
    start = ids.index(tok.fim_prefix_id)
    assert ids[start + 1 : start + 22] == [tok.image_token_id] * 21 and ids[start + 22] == tok.fim_suffix_id


def test_piecewise_tokenization_equals_whole(tok):
    # The official training code tokenizes <|im_start|>, the role, "\n", the body, <|im_end|>, "\n"
    # separately (ARIA_SPEC §5.2); with Aria's tokenizer that must equal tokenizing the string.
    messages = CONVERSATIONS["system-user-assistant"] + CONVERSATIONS["unicode-and-whitespace"]
    pieces = []
    for message in messages:
        body = message["content"] if isinstance(message["content"], str) else message["content"][0]["text"]
        for part in ("<|im_start|>", message["role"], "\n", body, "<|im_end|>", "\n"):
            pieces += tok.encode(part)
    assert pieces == encode_prompt(tok, messages, add_generation_prompt=False)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "user", "content": [{"type": "video"}]}], "type 'video'"),
        ([{"role": "user", "content": [{"type": "text", "text": None}]}], "not a string"),
        ([{"role": "user", "content": "see <|img|> here"}], "reserved marker"),
        ([{"content": "no role"}], "no role"),
        ([{"role": "user", "content": 42}], "content must be"),
        ("just a string", "list of messages"),
        (["not a dict"], "not an object"),
    ],
)
def test_bad_messages(tok, messages, match):
    with pytest.raises(InputError, match=match) as info:
        encode_prompt(tok, messages)
    assert "\n" not in str(info.value)


def test_image_count_mismatch(tok):
    with pytest.raises(InputError, match="1 image"):
        encode_prompt(tok, CONVERSATIONS["one-image"], [3, 3])
    with pytest.raises(InputError, match="1 image"):
        encode_prompt(tok, CONVERSATIONS["one-image"])
