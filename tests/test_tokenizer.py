"""Tokenizer: the tiny Aria-shaped model, id parity with the slow reference transformers builds
from the same tokenizer.model, round trips, the documented fast-tokenizer difference, and errors."""

import json
import random

import pytest
import sentencepiece as spm
import transformers
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from runtime.config import AriaConfig
from runtime.errors import CheckpointError
from runtime.tiny_tokenizer import train_tiny_tokenizer
from runtime.tokenizer import CHAT_PIECES, Tokenizer

# rhymes-ai/Aria's tokenizer_config.json (ARIA_SPEC §5.1), without the chat template.
ARIA_TOKENIZER_CONFIG = {
    "add_bos_token": False,
    "add_eos_token": False,
    "add_prefix_space": True,
    "added_tokens_decoder": {
        "0": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False,
              "single_word": False, "special": True}
    },
    "bos_token": None,
    "clean_up_tokenization_spaces": False,
    "eos_token": None,
    "legacy": True,
    "pad_token": "<unk>",
    "sp_model_kwargs": {},
    "spaces_between_special_tokens": False,
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
    "use_default_system_prompt": False,
}

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\n<fim_prefix><|img|><|img|><|img|><fim_suffix>What is this?<|im_end|>\n",
    "  leading spaces and trailing   ",
    "tabs\tand\t\tnewlines\n\n\nand\r\nwindows",
    "multiple     spaces      everywhere",
    "中文字符和日本語のテキスト、한국어",
    "emoji 😀🎉 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "accents: café naïve Ærøskøbing, combining e\u0301",
    "Ελληνικά и русский текст",
    "مرحبا بالعالم",
    "zero\u200bwidth and nbsp\u00a0here",
    "math ∑ ∫ √ ≤ ≥ ≠ ∞",
    "code: def f(x):\n    return x ** 2  # square\n",
    "numbers 3.14159 2,718 -42 1e10",
    "literal <unk> in the middle and at the end <unk>",
    "<unk>",
    "▁ a literal lower one eighth block",
    "<|im_end|><|im_end|>",
    "a<fim_prefix>b<fim_suffix>c",
    "unseen chars: ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    train_tiny_tokenizer(directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps(ARIA_TOKENIZER_CONFIG))
    return directory


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def sp(model_dir):
    return spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def slow_reference(model_dir):
    # transformers 5's port of the slow SentencePiece path with Aria's settings (legacy, no bos/eos).
    return SentencePieceBackend(
        vocab_file=str(model_dir / "tokenizer.model"), unk_token="<unk>", bos_token=None, eos_token=None, legacy=True
    )


@pytest.fixture(scope="module")
def fast_reference(model_dir):
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


# ---------------------------------------------------------------- tiny tokenizer file


def test_tiny_tokenizer_layout(tok, sp):
    assert tok.vocab_size == 512
    assert (sp.id_to_piece(0), sp.id_to_piece(1), sp.id_to_piece(2)) == ("<unk>", "<s>", "</s>")
    assert tok.unk_id == 0 and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.image_token_id == 9 == sp.piece_to_id("<|img|>")
    ids = {tok.im_start_id, tok.im_end_id, tok.fim_prefix_id, tok.fim_suffix_id, tok.image_token_id}
    assert len(ids) == 5 and all(0 < i < 512 for i in ids)
    for piece in CHAT_PIECES:
        assert len(sp.encode(piece)) == 1 and sp.id_to_piece(sp.encode(piece)[0]) == piece
    assert tok.stop_ids == {sp.piece_to_id("<|im_end|>"), 2}
    assert tok.pad_id == 0


def test_tiny_tokenizer_is_deterministic(tmp_path):
    a = train_tiny_tokenizer(tmp_path / "a" / "tokenizer.model").read_bytes()
    b = train_tiny_tokenizer(tmp_path / "b" / "tokenizer.model").read_bytes()
    assert a == b


def test_tiny_tokenizer_custom_corpus(tmp_path):
    corpus = [f"sentence number {i} about apples and pears" for i in range(50)]
    path = train_tiny_tokenizer(tmp_path / "tokenizer.model", corpus=corpus, vocab_size=320)
    custom = Tokenizer(path)
    assert custom.vocab_size <= 320 and custom.image_token_id == 9
    assert custom.decode(custom.encode("apples 🍎")) == "apples 🍎"


# ---------------------------------------------------------------- encode parity


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_slow_reference(tok, slow_reference, text):
    assert tok.encode(text) == slow_reference.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", [t for t in CORPUS if "<s>" not in t and "</s>" not in t])
def test_ids_match_fast_reference_without_prefix_space(model_dir, tok, text):
    fast = transformers.AutoTokenizer.from_pretrained(str(model_dir), add_prefix_space=False)
    assert tok.encode(text) == fast.encode(text, add_special_tokens=False)


def test_documented_difference_from_fast_default(tok, fast_reference):
    # transformers 5's fast tokenizer with Aria's add_prefix_space=true prepends "▁" at the
    # start and after special pieces; the slow tokenizer the official code forced does not.
    text = "<|im_start|>user\nHi<|im_end|>\n"
    fast_pieces = fast_reference.convert_ids_to_tokens(fast_reference.encode(text, add_special_tokens=False))
    ours = [tok.id_to_piece(i) for i in tok.encode(text)]
    assert fast_pieces[:3] == ["<|im_start|>", "▁", "us"] and ours[:2] == ["<|im_start|>", "us"]
    assert [p for p in fast_pieces if p != "▁"] == ours


def test_no_bos_and_plain_sentencepiece(tok, sp):
    for text in CORPUS:
        if "<unk>" not in text:
            assert tok.encode(text) == sp.encode(text)
    assert tok.encode("<unk>x<unk>") == [0, *sp.encode("x"), 0]


def test_encode_pad_never_out_of_range(model_dir, tmp_path):
    # The HF-native repo's added_tokens.json maps "<pad>" one past the table (P7); we ignore it.
    (model_dir / "added_tokens.json").write_text(json.dumps({"<pad>": 512}))
    try:
        tok = Tokenizer.from_dir(model_dir)
        ids = tok.encode("<pad> padded <pad>")
        assert ids and max(ids) < tok.vocab_size
        assert tok.pad_id == 0
    finally:
        (model_dir / "added_tokens.json").unlink()


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("text", CORPUS)
def test_round_trip(tok, text):
    expected = text.replace("<unk>", "").replace("▁", " ")  # unk is skipped; "▁" is sentencepiece's space
    if expected.startswith(" "):  # the slow tokenizer drops the first piece's space
        pieces = [tok.id_to_piece(i) for i in tok.encode(text) if i != 0]
        assert pieces[0].startswith("▁")
        expected = expected[1:]
    assert tok.decode(tok.encode(text)) == expected


def test_decode_matches_sentencepiece_by_hand(tok, sp):
    # Reference: SentencePiece's own decode, minus the first piece's leading space (what the slow
    # Llama tokenizer strips), on random ids including byte pieces, broken UTF-8 and controls.
    rng = random.Random(0)
    for _ in range(3000):
        ids = [rng.randrange(1, tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        expected = sp.decode(ids)
        if sp.id_to_piece(ids[0]).startswith("▁"):
            expected = expected[1:]
        assert tok.decode(ids) == expected, ids


def test_unused_pieces_decode_as_sentencepiece_decodes_them(model_dir, tmp_path):
    """A piece typed UNUSED still has its text (SentencePiece and the slow Llama tokenizer print it)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
    original = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    unused = [original.piece_to_id(piece) for piece in ("▁the", "▁a", "er")]
    for token_id in unused:
        proto.pieces[token_id].type = model_pb2.ModelProto.SentencePiece.UNUSED
    path = tmp_path / "tokenizer.model"
    path.write_bytes(proto.SerializeToString())
    retyped, sp_retyped = Tokenizer(path), spm.SentencePieceProcessor(model_file=str(path))
    assert all(sp_retyped.is_unused(token_id) for token_id in unused)
    rng = random.Random(1)
    for _ in range(500):
        ids = [rng.choice(unused) if rng.random() < 0.3 else rng.randrange(1, retyped.vocab_size)
               for _ in range(rng.randrange(1, 10))]
        expected = sp_retyped.decode(ids)
        if sp_retyped.id_to_piece(ids[0]).startswith("▁"):
            expected = expected[1:]
        assert retyped.decode(ids) == expected, ids


def test_decode_matches_fast_reference(tok, fast_reference):
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.decode(ids) == fast_reference.decode(ids, skip_special_tokens=True), text


# ---------------------------------------------------------------- errors


def test_missing_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.model"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"this is not a model")
    with pytest.raises(CheckpointError, match="not a SentencePiece model") as info:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(info.value)


def test_tokenizer_without_chat_pieces(tmp_path):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["plain text without any chat markers"] * 20), model_prefix=str(tmp_path / "plain"),
        vocab_size=40, model_type="bpe", hard_vocab_limit=False, minloglevel=2,
    )
    with pytest.raises(CheckpointError, match="not an Aria tokenizer"):
        Tokenizer(tmp_path / "plain.model")


def _config(image_token_index=9, vocab_size=512):
    return AriaConfig.from_dict({
        "image_token_index": image_token_index,
        "text_config": {"vocab_size": vocab_size, "hidden_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 4, "moe_num_experts": 4, "moe_topk": 2,
                        "intermediate_size": 32},
        "vision_config": {"hidden_size": 32, "num_attention_heads": 2},
    })


def test_checked_against_config(model_dir):
    assert Tokenizer.from_dir(model_dir, _config()).image_token_id == 9
    with pytest.raises(CheckpointError, match="image_token_index 10"):
        Tokenizer.from_dir(model_dir, _config(image_token_index=10))
    with pytest.raises(CheckpointError, match="embeds only 256"):
        Tokenizer.from_dir(model_dir, _config(vocab_size=256))
