"""A tiny, deterministic Aria-shaped SentencePiece tokenizer for test checkpoints and demo models.

Layout (the real file's, as far as ARIA_SPEC §5.1 knows): `<unk>` = 0, `<s>` = 1, `</s>` = 2,
then user-defined pieces with `<|img|>` landing at id 9 (= config image_token_index), byte
fallback so any text round-trips, BPE like the real model, no dummy prefix (the official
training code tokenizes "user" and "\\n" separately and decodes them back without a space, which
only works without one), whitespace kept as is.
"""

from __future__ import annotations

import io
from pathlib import Path

from .tokenizer import FIM_PREFIX, FIM_SUFFIX, IM_END, IM_START, IMAGE_TOKEN

IMAGE_TOKEN_INDEX = 9
# Ids 3..8 are filled with other code-model pieces so that <|img|> lands on 9 and the chat
# pieces do not sit on guessable ids (code must read them from the file).
_USER_PIECES = (FIM_PREFIX, "<fim_middle>", FIM_SUFFIX, "<fim_pad>", "<|endoftext|>", "<reponame>",
                IMAGE_TOKEN, IM_START, IM_END)

# Enough varied English (chat turns, numbers, punctuation, a little code) for 512 BPE pieces.
DEFAULT_CORPUS = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>",
    "<|im_start|>user\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\nA cat sitting on a mat.<|im_end|>",
    "<|im_start|>user\n<fim_prefix><|img|><fim_suffix>Describe this picture in one sentence.<|im_end|>",
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "There are two dogs and three cats playing in the garden near the old house.",
    "The red car is parked next to a blue bicycle on the street.",
    "A small boat is sailing across the lake under a bright blue sky.",
    "Please answer the question about the photo: how many people can you see?",
    "I can see four people standing in front of a large building with many windows.",
    "The chart shows that sales increased from 120 in January to 450 in December.",
    "What color is the bird on the branch? The bird is yellow with black wings.",
    "Mixture of experts models route every token to a few experts out of many.",
    "The weather is sunny and warm, with a light wind from the west.",
    "She opened the book, read the first page, and smiled at the picture of a mountain.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2024 3.14 -7 +8 = 15%",
    "Punctuation: , . ; : ! ? ' \" ( ) [ ] { } < > / \\ | - _ * & ^ % $ # @ ~ `",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)",
    "The green tree stands alone in the middle of a wide field of yellow flowers.",
    "A woman is holding an umbrella while walking her dog in the rain.",
    "The kitchen has a white table, four chairs, and a bowl of fresh fruit.",
    "Children are playing football on the beach while their parents watch.",
    "This document explains how to install the program and run the first example.",
    "The train leaves the station at seven o'clock and arrives at noon.",
    "Answer: yes. Answer: no. Maybe, but I am not sure about that.",
    "Question: where was this photo taken? It looks like a city park in spring.",
    "The man in the black jacket is reading a newspaper on the bench.",
    "Two horses are eating grass on a farm with a wooden fence.",
    "Thank you for your help! You are welcome, have a nice day.",
)


def train_tiny_tokenizer(out_path: str | Path, corpus=None, vocab_size: int = 512) -> Path:
    """Train the tiny tokenizer and write it to `out_path` (a file, e.g. `<dir>/tokenizer.model`).

    Deterministic: the same corpus and vocab_size give byte-identical files. `corpus` is an
    iterable of strings (default: a built-in English chat corpus). 256 byte pieces, 3 control
    pieces and 9 user pieces are always present, so vocab_size must be at least 300.
    """
    import sentencepiece as spm

    if vocab_size < 300:
        raise ValueError("vocab_size must be at least 300 (bytes + control + chat pieces + a few merges)")
    lines = [line for line in (DEFAULT_CORPUS if corpus is None else corpus) if line]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not support every merge; fewer ids is fine
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=list(_USER_PIECES),
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        split_digits=True,
        num_threads=1,  # determinism
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    if sp.piece_to_id(IMAGE_TOKEN) != IMAGE_TOKEN_INDEX:  # a sentencepiece layout change, not user error
        raise RuntimeError(f"{IMAGE_TOKEN} landed at id {sp.piece_to_id(IMAGE_TOKEN)}, expected {IMAGE_TOKEN_INDEX}")
    return out_path
