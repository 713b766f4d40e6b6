"""Aria's tokenizer: the checkpoint's SentencePiece `tokenizer.model`, used exactly the way the
official code used it (the SLOW `LlamaTokenizer`, `use_fast=False`, `legacy=True`).

What the slow tokenizer does with Aria's tokenizer_config (add_bos/eos false, bos/eos null,
legacy true, add_prefix_space true), and therefore what this class does (ARIA_SPEC §5.1):
- encode = plain `SentencePieceProcessor.encode` of the text. Nothing is prepended: no BOS and no
  "▁" prefix space, also not after `<|im_start|>` and friends (they are user-defined pieces of the
  model, matched atomically by SentencePiece, not HF "added tokens"). The one HF addition: a
  literal "<unk>" in the text is the registered special token, so it becomes the unk id.
- decode = SentencePiece decode with the unk id skipped (`skip_special_tokens=True`, as every
  official example decodes) and the "▁" of the first piece removed (the slow Llama tokenizer
  strips it "since we manually add the prefix space"; for a first piece of several "▁" HF's
  trimmed string is no longer a piece and SentencePiece prints it raw, we print the spaces).
  User-defined pieces such as `<|im_end|>` are NOT special for HF and decode to their text.

Where transformers 5 differs: it builds a `tokenizers` (fast) LlamaTokenizer from a bare
tokenizer.model, whose Metaspace pre-tokenizer (prepend_scheme "always" when add_prefix_space
is true) puts "▁" before the text and before every segment after a special piece, e.g.
"<|im_start|>user" -> [<|im_start|>, ▁, user]. It also splits the literal strings "<s>"/"</s>".
Neither happened with the slow tokenizer the model was trained and evaluated with, so we do not
copy them (tests/test_tokenizer.py pins both the agreement and these differences).

The HF-native repo's added_tokens.json (`<pad>` = 100352, one past the embedding table, P7) is
never read: every id we produce is below the model's piece count.
"""

from __future__ import annotations

import codecs
from functools import lru_cache
from pathlib import Path

from .errors import CheckpointError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<|img|>"
FIM_PREFIX = "<fim_prefix>"
FIM_SUFFIX = "<fim_suffix>"
# Pieces the prompt format needs as single tokens (ids are read from the file).
CHAT_PIECES = (IM_START, IM_END, IMAGE_TOKEN, FIM_PREFIX, FIM_SUFFIX)
UNK_TEXT = "<unk>"  # the only HF special token of the slow tokenizer that is matched in text

TOKENIZER_FILE = "tokenizer.model"

# SentencePiece shows every byte of a malformed UTF-8 sequence as its own U+FFFD; Python's
# "replace" uses one per maximal invalid run. This handler makes our decode match SentencePiece.
UTF8_ERRORS = "aria-replace-per-byte"
codecs.register_error(UTF8_ERRORS, lambda err: ("\ufffd" * (err.end - err.start), err.end))


class Tokenizer:
    """SentencePiece tokenizer of an Aria checkpoint (see module docstring for the exact rules)."""

    def __init__(self, model_file: str | Path, image_token_index: int = 9, embedding_size: int | None = None):
        import sentencepiece as spm

        model_file = Path(model_file)
        if not model_file.is_file():
            raise CheckpointError(f"no {TOKENIZER_FILE} at {model_file}; re-download the model")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(model_file))
        except (OSError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{model_file} is not a SentencePiece model ({reason}); re-download the model") from None
        self._sp = sp
        self.path = model_file
        self.vocab_size = sp.get_piece_size()
        self.unk_id = sp.unk_id()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None

        ids = {piece: self._single_piece_id(piece) for piece in CHAT_PIECES}
        self.im_start_id = ids[IM_START]
        self.im_end_id = ids[IM_END]
        self.image_token_id = ids[IMAGE_TOKEN]
        self.fim_prefix_id = ids[FIM_PREFIX]
        self.fim_suffix_id = ids[FIM_SUFFIX]
        if self.image_token_id != image_token_index:
            raise CheckpointError(
                f"{model_file} has {IMAGE_TOKEN} at id {self.image_token_id} but config.json says "
                f"image_token_index {image_token_index}; the tokenizer does not belong to this model"
            )
        if embedding_size is not None and self.vocab_size > embedding_size:
            raise CheckpointError(
                f"{model_file} has {self.vocab_size} pieces but the model embeds only {embedding_size}; "
                "the tokenizer does not belong to this model"
            )
        # The original processor pads with unk (id 0); never with the out-of-range HF `<pad>`.
        self.pad_id = self.unk_id
        self._piece_bytes = lru_cache(maxsize=None)(self._compute_piece_bytes)

    @classmethod
    def from_dir(cls, path: str | Path, config=None) -> Tokenizer:
        """Load `tokenizer.model` from a checkpoint directory, checked against its AriaConfig."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if config is None:
            return cls(file)
        return cls(file, image_token_index=config.image_token_index, embedding_size=config.text.vocab_size)

    def _single_piece_id(self, piece: str) -> int:
        pid = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(pid) != piece or self._sp.encode(piece) != [pid]:
            raise CheckpointError(
                f"{self.path} does not encode {piece} as one token; this is not an Aria tokenizer"
            )
        return pid

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end an answer: `<|im_end|>` (not the configured eos, P8) and eos."""
        return frozenset(i for i in (self.im_end_id, self.eos_id) if i is not None)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with nothing added (no BOS, no prefix space)."""
        ids: list[int] = []
        for i, chunk in enumerate(text.split(UNK_TEXT)):
            if i:
                ids.append(self.unk_id)
            if chunk:
                ids.extend(self._sp.encode(chunk))
        return ids

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def piece_bytes(self, token_id: int, first: bool = False) -> bytes:
        """UTF-8 bytes one id contributes to decoded text. `first`: it is the first shown piece,
        whose leading "▁" the slow tokenizer drops. Byte-fallback pieces give single raw bytes,
        so callers join bytes before decoding UTF-8."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._piece_bytes(token_id, first)

    def _compute_piece_bytes(self, token_id: int, first: bool) -> bytes:
        sp = self._sp
        if token_id == self.unk_id or sp.is_control(token_id):
            return b""
        if sp.is_byte(token_id):
            return bytes([int(sp.id_to_piece(token_id)[3:5], 16)])  # "<0xAB>"
        # UNUSED pieces fall through: SentencePiece (and so the reference) prints their text.
        piece = sp.id_to_piece(token_id)
        if first and piece.startswith("▁"):
            piece = piece[1:]
        return piece.replace("▁", " ").encode("utf-8")

    def ends_byte_run(self, token_id: int) -> bool:
        """Control pieces (<s>, </s>) show nothing but, as in SentencePiece, end a run of byte
        pieces: bytes before and after them are not joined into one character."""
        return 0 <= token_id < self.vocab_size and self._sp.is_control(token_id)

    def decode(self, ids) -> str:
        """Text of `ids` the way the official code decodes an answer (skip_special_tokens=True)."""
        text, run = [], bytearray()
        first = True
        for token_id in ids:
            token_id = int(token_id)
            if self.ends_byte_run(token_id):
                text.append(run.decode("utf-8", errors=UTF8_ERRORS))
                run = bytearray()
            run += self.piece_bytes(token_id, first=first)
            # Only the skipped unk leaves the "first piece" slot open (HF skips it before stripping).
            first = first and token_id == self.unk_id
        text.append(run.decode("utf-8", errors=UTF8_ERRORS))
        return "".join(text)
