"""Prefill and decode on the static cache, with multi-turn reuse of what the cache already holds.

A `Session` remembers which token ids sit in its cache. Each new prompt is the whole
conversation so far; only the part after the longest common prefix is prefilled, so a second
turn costs its new tokens, not the history. Images: the caller passes the crops of every image
in the conversation, in prompt order; the session feeds the model only the crops whose image
tokens fall in the part being prefilled.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .model import AriaForConditionalGeneration
from .sampling import Sampler, SamplingParams


@dataclass
class StepStats:
    prompt_tokens: int = 0  # tokens in the prompt
    prefilled_tokens: int = 0  # of those, the ones actually run (the rest came from the cache)
    generated_tokens: int = 0


class Session:
    def __init__(self, model: AriaForConditionalGeneration, max_len: int):
        self.model = model
        self.max_len = max_len
        self.cache = model.new_cache(max_len)
        self.cached: list[int] = []  # token ids whose keys/values are in the cache, positions 0..n-1
        self.stats = StepStats()

    def reset(self) -> None:
        self.cached = []

    def _reuse_point(self, prompt: list[int]) -> int:
        n = 0
        limit = min(len(self.cached), len(prompt) - 1)  # always run >= 1 token to get logits
        while n < limit and self.cached[n] == prompt[n]:
            n += 1
        # Never start inside a run of image tokens: the crop's features are computed whole.
        image_id = self.model.config.image_token_index
        while n > 0 and prompt[n] == image_id and prompt[n - 1] == image_id:
            n -= 1
        return n

    @torch.inference_mode()
    def prefill(
        self,
        prompt: list[int],
        pixel_values: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bring the cache to `prompt` and return the logits [1, V] of its last token."""
        start = self._reuse_point(prompt)
        new = prompt[start:]
        self.cache.check_room(start, len(new))
        # Forget what is about to be overwritten first: if this prefill is interrupted (Ctrl-C),
        # positions >= start may hold a mix of old and new keys and must not be reused.
        del self.cached[start:]
        image_id = self.model.config.image_token_index
        n_image_tokens = sum(1 for t in new if t == image_id)
        if pixel_values is not None and n_image_tokens:
            per_crop = self.model.config.tokens_per_crop(pixel_values.shape[-1])
            n_crops = n_image_tokens // per_crop
            pixel_values, pixel_mask = pixel_values[-n_crops:], pixel_mask[-n_crops:]
        elif not n_image_tokens:
            pixel_values = pixel_mask = None
        ids = torch.tensor([new], dtype=torch.long, device=self.model.device)
        logits = self.model(ids, self.cache, start, pixel_values, pixel_mask)
        self.cached = list(prompt)
        self.stats = StepStats(prompt_tokens=len(prompt), prefilled_tokens=len(new))
        return logits

    @torch.inference_mode()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """Append one token [1] and return the next logits [1, V]."""
        start = len(self.cached)
        logits = self.model(token.view(1, 1), self.cache, start)
        self.cached.append(int(token))
        return logits

    def generate(
        self,
        prompt: list[int],
        pixel_values: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        max_new_tokens: int = 256,
        sampling: SamplingParams | None = None,
        stop_ids: Iterable[int] = (),
    ) -> Iterator[int]:
        """Yield generated token ids until a stop id (not yielded), `max_new_tokens`, or the context end.

        The caller may stop early by closing the iterator; the cache then holds exactly the
        tokens yielded so far, so the next turn reuses them.
        """
        stop = set(stop_ids)
        sampler = Sampler(sampling or SamplingParams(), device=self.model.device)
        logits = self.prefill(prompt, pixel_values, pixel_mask)
        room = self.max_len - len(self.cached)
        for _ in range(min(max_new_tokens, room)):
            token = sampler(logits)
            tid = int(token)
            if tid in stop:
                return
            self.stats.generated_tokens += 1
            yield tid
            if self.stats.generated_tokens == max_new_tokens or len(self.cached) >= self.max_len:
                return
            logits = self.decode(token)
