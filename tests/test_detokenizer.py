"""Streaming detokenizer: the stream concatenates to the full decode, never shows a broken
character, and stops on <|im_end|>, eos and stop strings without printing them."""

import random

import pytest

from runtime.detokenizer import StreamDecoder
from runtime.tiny_tokenizer import train_tiny_tokenizer
from runtime.tokenizer import Tokenizer

TEXTS = [
    "Hello world, this is a streamed answer.",
    " It starts with a space.",
    "中文字符和日本語のテキスト、한국어 and emoji 😀🎉 👨‍👩‍👧‍👦 🇫🇷",
    "accents café naïve, combining e\u0301, math ∑∫√",
    "code:\n    return x ** 2\n\n\ttab  double  space",
    "unseen 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def _stream(tok, ids, **kwargs):
    decoder = StreamDecoder(tok, **kwargs)
    chunks = [decoder.push(i) for i in ids]
    chunks.append(decoder.finish())
    return decoder, chunks


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode_and_never_breaks_a_character(tok, text):
    ids = tok.encode(text)
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids) or text.isascii()
    decoder, chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == decoder.text
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_multibyte_character_appears_only_when_complete(tok):
    ids = tok.encode("😀")
    assert len(ids) == 4  # four byte-fallback pieces in the tiny vocabulary
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in ids] == ["", "", "", "😀"]


def test_random_ids_stream_equals_decode(tok):
    # Any ids at all (broken UTF-8, control pieces, unk): the stream still equals the full decode.
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.randrange(0, tok.vocab_size) for _ in range(rng.randrange(1, 25))]
        _, chunks = _stream(tok, ids, stop_ids=())
        assert "".join(chunks) == tok.decode(ids), ids


def test_stops_on_im_end_without_printing_it(tok):
    ids = tok.encode("Done.<|im_end|>\nnot shown")
    decoder, chunks = _stream(tok, ids)
    assert "".join(chunks) == "Done."
    assert decoder.stopped and decoder.stop_reason == "stop_id" and decoder.stop_token == tok.im_end_id
    assert decoder.push(tok.encode("more")[0]) == ""


def test_stops_on_eos(tok):
    decoder, chunks = _stream(tok, [*tok.encode("Bye"), tok.eos_id, *tok.encode("after")])
    assert "".join(chunks) == "Bye" and decoder.stop_token == tok.eos_id


def test_stop_string_split_across_tokens_is_never_printed(tok):
    stop = "\nUser:"
    text = "The answer is 42.\nUser: ignore this"
    ids = tok.encode(text)
    assert len(tok.encode(stop)) >= 2
    decoder = StreamDecoder(tok, stop_strings=[stop])
    shown = ""
    for i in ids:
        shown += decoder.push(i)
        assert "\nU" not in shown  # not even the start of the stop string leaks early
    shown += decoder.finish()
    assert shown == "The answer is 42."
    assert decoder.stop_reason == "stop_string" and decoder.stop_token == stop


def test_held_back_text_is_released_when_it_is_not_a_stop(tok):
    text = "Line one\nUse the force"
    decoder, chunks = _stream(tok, tok.encode(text), stop_strings=["\nUser:"])
    assert "".join(chunks) == text and not decoder.stop_reason


def test_held_back_text_is_released_on_stop_id(tok):
    decoder, chunks = _stream(tok, [*tok.encode("ends with\nUs"), tok.im_end_id], stop_strings=["\nUser:"])
    assert "".join(chunks) == "ends with\nUs" and decoder.stop_reason == "stop_id"


def test_stop_string_inside_one_token_and_earliest_wins(tok):
    decoder, chunks = _stream(tok, tok.encode("the cat and the dog"), stop_strings=["dog", "he c"])
    assert "".join(chunks) == "t" and decoder.stop_token == "he c"


def test_first_piece_space_is_dropped_like_the_reference(tok):
    ids = tok.encode(" Hello there")
    assert tok.id_to_piece(ids[0]).startswith("▁")
    _, chunks = _stream(tok, ids)
    assert "".join(chunks) == "Hello there"
