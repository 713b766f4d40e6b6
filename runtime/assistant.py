"""The whole question-to-answer path behind `aria ask` and `aria chat`.

`Assistant.open(model_dir, ...)` loads the model and tokenizer once; `assistant.reply(chat,
options)` renders the conversation with Aria's template, preprocesses its pictures, runs the
model on a `Session` (so a follow-up only prefills the new turn) and streams text chunks. The
`Reply` it returns is iterated for the chunks and then carries the tokens, the finish reason and
the timings the CLI prints with --verbose / --json.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from .chat_template import encode_prompt
from .detokenizer import StreamDecoder
from .errors import InputError, UsageError
from .generate import Session
from .image_processing import ProcessedImages, preprocess_images
from .loader import load_model_with_report
from .offload.apply import OffloadEngine, apply_offload
from .offload.stats import PhaseStats
from .placement import Plan
from .sampling import SamplingParams
from .tokenizer import IMAGE_TOKEN, Tokenizer

DEFAULT_MAX_CONTEXT = 8192


@dataclass(frozen=True)
class GenerationOptions:
    max_tokens: int = 512
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_tokens < 1:
            raise UsageError(f"--max-tokens must be at least 1 (got {self.max_tokens})")


@dataclass
class Turn:
    role: str  # "system" | "user" | "assistant"
    text: str
    images: list[Image.Image] = field(default_factory=list)  # in order
    image_sources: list[str] = field(default_factory=list)  # where they came from (for /save)
    interrupted: bool = False  # an assistant answer cut off by Ctrl-C
    # Where each picture stands in `text` (a character offset); empty: all before the text, as
    # `aria ask` and the chat show them. A server request may interleave them (text, picture, text).
    image_offsets: list[int] = field(default_factory=list)

    def content(self) -> list[dict[str, Any]]:
        """The message content in Aria's template items: pictures at their offsets, text between."""
        offsets = self.image_offsets or [0] * len(self.images)
        items: list[dict[str, Any]] = []
        at = 0
        for offset in offsets:
            if offset > at:
                items.append({"type": "text", "text": self.text[at:offset]})
                at = offset
            items.append({"type": "image"})
        if at < len(self.text) or not items or items[-1]["type"] == "image":
            items.append({"type": "text", "text": self.text[at:]})
        return items


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)

    @property
    def system(self) -> str | None:
        return self.turns[0].text if self.turns and self.turns[0].role == "system" else None

    def set_system(self, text: str | None) -> None:
        if text:
            _check_no_marker(text, "system")
        if self.system is not None:
            self.turns.pop(0)
        if text:
            self.turns.insert(0, Turn("system", text))

    def add(self, role: str, text: str, images=(), sources=(), interrupted: bool = False,
            image_offsets=()) -> Turn:
        """Raises InputError, adding nothing, if `text` holds the picture marker: every later
        prompt would be refused (runtime.chat_template), so it never enters the conversation.
        `image_offsets`: where each picture stands in `text` (none given: all before it)."""
        _check_no_marker(text, role)
        images, offsets = list(images), list(image_offsets)
        if offsets and (len(offsets) != len(images) or offsets != sorted(offsets)
                        or not 0 <= offsets[0] <= offsets[-1] <= len(text)):
            raise ValueError("image_offsets must be one ascending offset into the text per picture")
        turn = Turn(role, text, images, list(sources), interrupted, offsets)
        self.turns.append(turn)
        return turn

    def messages(self) -> list[dict[str, Any]]:
        return [{"role": turn.role, "content": turn.content()} for turn in self.turns]

    def images(self) -> list[Image.Image]:
        return [image for turn in self.turns for image in turn.images]


def _check_no_marker(text: str, role: str) -> None:
    if IMAGE_TOKEN in text:
        what = {"system": "the system prompt", "user": "the message", "assistant": "the answer"}.get(role, role)
        raise InputError(f"{what} contains {IMAGE_TOKEN}, the marker that stands for a picture; remove it "
                         "(add pictures with /image or a path)")


@dataclass
class ReplyStats:
    load_s: float = 0.0
    ttft_s: float = 0.0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    completion_tokens: int = 0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    peak_host_bytes: int = 0
    peak_device_bytes: int = 0
    experts: dict[str, float] = field(default_factory=lambda: {"hit_rate": 0.0, "fetched": 0, "cpu_computed": 0})


class Reply:
    """Iterate for text chunks; afterwards `text`, `tokens`, `finish_reason` and `stats` are set."""

    def __init__(self, chunks: Iterator[str]):
        self._chunks = chunks
        self.text = ""
        self.tokens: list[int] = []
        self.finish_reason = "stop"  # "stop" | "length" | "interrupted"
        self.context_full = False  # "length" because the context filled, not the token limit
        self.stats = ReplyStats()

    def __iter__(self) -> Iterator[str]:
        try:
            for chunk in self._chunks:
                self.text += chunk
                yield chunk
        except KeyboardInterrupt:
            self.finish_reason = "interrupted"
            raise
        finally:
            self._chunks.close()

    def interrupt(self) -> None:
        """Stop generating (Ctrl-C): what was produced stays, and so does the cache behind it."""
        self.finish_reason = "interrupted"
        self._chunks.close()

    def read(self) -> str:
        """Consume the whole reply and return its text."""
        for _ in self:
            pass
        return self.text


class Assistant:
    def __init__(self, model, tokenizer: Tokenizer, name: str, load_s: float = 0.0,
                 max_context: int = DEFAULT_MAX_CONTEXT, crop_size: int = 980, split_image: bool = False,
                 compile: bool | str = False, offload: OffloadEngine | None = None, cuda_graphs: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.load_s = load_s
        self.crop_size = crop_size
        self.split_image = split_image
        self.session = Session(model, min(max_context, model.config.text.max_position_embeddings), compile=compile,
                               cuda_graphs=cuda_graphs)
        self.offload = offload  # the expert offload engine, when a plan put experts in host memory
        # Per picture object of the current conversation: its content key and pixels, computed
        # once. The picture is kept with them: were it freed, a new picture could get its id()
        # and be answered with the old one's pixels. Pictures that leave the conversation are
        # dropped (a server answering request after request must not grow).
        self._pictures: dict[int, tuple[Image.Image, bytes, ProcessedImages]] = {}
        # Content keys of the pictures whose tokens the cache may hold, in prompt order. Every
        # picture's tokens are the same id, so a prompt whose text matches the cache's tokens
        # but shows another picture must not reuse that picture's keys and values.
        self._cached_pictures: list[bytes] = []
        self.config = model.config
        self.config.tokens_per_crop(crop_size)  # refuse an unsupported crop size before any question

    @classmethod
    def open(cls, model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu",
             quant: str | None = None, name: str | None = None, plan: Plan | None = None,
             quant_lm_head: bool = False, **options) -> Assistant:
        """`plan`: a placement (runtime.placement) to follow; when it offloads experts the
        weights are loaded into host memory first and `apply_offload` moves the rest to `device`."""
        started = time.perf_counter()
        offloaded = plan is not None and plan.offloaded
        model, _ = load_model_with_report(model_dir, dtype=dtype, device="cpu" if offloaded else device, quant=quant,
                                          quant_lm_head=quant_lm_head, staged=offloaded)
        engine = apply_offload(model, plan, device) if offloaded else None
        tokenizer = Tokenizer.from_dir(model_dir, model.config)
        graphs = plan is None or plan.graph_bytes > 0  # a plan that left no room for them says no
        return cls(model, tokenizer, name or str(model_dir), time.perf_counter() - started, offload=engine,
                   cuda_graphs=graphs, **options)

    def _pixels(self, images: list[Image.Image]) -> ProcessedImages:
        pictures = {}
        for image in images:
            known = self._pictures.get(id(image))
            if known is None:
                processed = preprocess_images([image], self.crop_size, self.split_image)
                known = (image, processed.key(), processed)
            pictures[id(image)] = known
        self._pictures = pictures
        self._forget_changed_pictures([pictures[id(image)][1] for image in images])
        parts = [pictures[id(image)][2] for image in images]
        if not parts:
            return preprocess_images([], self.crop_size)
        return ProcessedImages(
            torch.cat([p.pixel_values for p in parts]),
            torch.cat([p.pixel_mask for p in parts]),
            tuple(c for p in parts for c in p.crops_per_image),
            self.crop_size,
        )

    def prompt_ids(self, conversation: Conversation) -> tuple[list[int], ProcessedImages]:
        images = conversation.images()
        # Each picture takes at least one crop's tokens: a conversation whose pictures alone
        # overflow the context is refused before they are decoded (tens of MB of pixels each).
        per_crop = self.config.tokens_per_crop(self.crop_size)
        self.session.cache.check_room(0, len(images) * per_crop)
        pixels = self._pixels(images)
        counts = pixels.image_token_counts(per_crop)
        return encode_prompt(self.tokenizer, conversation.messages(), counts), pixels

    def _forget_changed_pictures(self, keys: list[bytes]) -> None:
        """Cut the cache before the first picture that is not the one it was computed with."""
        same = 0
        for old, new in zip(self._cached_pictures, keys):
            if old != new:
                break
            same += 1
        if same < len(self._cached_pictures):
            self.session.forget_from_picture(same)
        self._cached_pictures = keys

    def reply(self, conversation: Conversation, options: GenerationOptions | None = None,
              cancel: Cancel | None = None) -> Reply:
        """`cancel`: checked after every token; once set, the reply ends there as "interrupted"
        (a server's client went away), keeping what was generated, as Ctrl-C does."""
        options = options or GenerationOptions()
        ids, pixels = self.prompt_ids(conversation)
        reply = Reply(iter(()))
        reply._chunks = self._stream(reply, ids, pixels, options, cancel)
        return reply

    def _stream(self, reply: Reply, ids: list[int], pixels: ProcessedImages,
                options: GenerationOptions, cancel: Cancel | None) -> Iterator[str]:
        stats = reply.stats
        stats.load_s = self.load_s
        decoder = StreamDecoder(self.tokenizer, options.stop)
        stop_ids = self.tokenizer.stop_ids
        has_pixels = pixels.num_crops > 0
        experts_before = self.offload.stats.total() if self.offload is not None else None
        started = time.perf_counter()
        first_at = None
        tokens = self.session.generate(
            ids,
            pixels.pixel_values if has_pixels else None,
            pixels.pixel_mask if has_pixels else None,
            max_new_tokens=options.max_tokens,
            sampling=options.sampling,
            stop_ids=stop_ids,
        )
        hit_stop = False
        try:
            for token in tokens:
                if first_at is None:
                    first_at = time.perf_counter()
                    stats.prompt_tokens = len(ids)
                    stats.prefilled_tokens = self.session.stats.prefilled_tokens
                reply.tokens.append(token)
                chunk = decoder.push(token)
                if chunk:
                    yield chunk
                if decoder.stopped:  # a user stop string: the rest is not wanted
                    hit_stop = True
                    break
                if cancel is not None and cancel.is_set():
                    reply.finish_reason = "interrupted"
                    break
            else:
                # The generator ended by itself: a stop token, or the token / context limit.
                hit_stop = len(reply.tokens) < options.max_tokens and not self._context_full()
            tail = decoder.finish()
            if tail:
                yield tail
        finally:
            tokens.close()
            ended = time.perf_counter()
            if first_at is None:  # stopped before any token: the prefill was the whole work
                first_at = ended
                stats.prompt_tokens = len(ids)
                stats.prefilled_tokens = self.session.stats.prefilled_tokens
            stats.ttft_s = first_at - started
            stats.completion_tokens = len(reply.tokens)
            stats.prefill_tokens_per_s = stats.prefilled_tokens / max(stats.ttft_s, 1e-9)
            if len(reply.tokens) > 1:
                stats.decode_tokens_per_s = (len(reply.tokens) - 1) / max(ended - first_at, 1e-9)
            stats.peak_host_bytes = _peak_rss_bytes()
            if torch.cuda.is_available() and self.model.device.type == "cuda":
                stats.peak_device_bytes = torch.cuda.max_memory_allocated(self.model.device)
            if experts_before is not None:
                stats.experts = _expert_counts(experts_before, self.offload.stats.total())
            if reply.finish_reason != "interrupted":
                reply.finish_reason = "stop" if hit_stop else "length"
                reply.context_full = not hit_stop and self._context_full()

    def _context_full(self) -> bool:
        return len(self.session.cached) + 1 >= self.session.max_len

    @property
    def context_at_model_max(self) -> bool:
        return self.session.cache.at_model_max  # (kv_cache: the rule its own error message follows)

    def reset(self) -> None:
        """Forget the cached conversation (the next reply prefills from scratch)."""
        self.session.reset()

    def forget_pictures(self) -> None:
        """Drop the preprocessed pixels kept for the pictures of the last conversation (about
        11 MB each at 980), e.g. between unrelated one-question conversations."""
        self._pictures.clear()


class Cancel(Protocol):
    """What `Assistant.reply` polls to stop early: a threading.Event fits."""

    def is_set(self) -> bool: ...


def _expert_counts(before: PhaseStats, after: PhaseStats) -> dict[str, float]:
    """This reply's share of the offload counters (they run for the whole session)."""
    hits, misses = after.hits - before.hits, after.misses - before.misses
    return {
        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "fetched": after.fetched - before.fetched,
        "cpu_computed": after.cpu_computed - before.cpu_computed,
    }


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
