"""Next-token selection on the device: greedy, temperature, top-k, top-p, seeded.

No host synchronisation: the result stays a tensor, and random draws use the exponential-race
trick (argmax of p / Exp(1) samples from p), which needs no cumulative search on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(f"temperature must be a finite number >= 0 (got {self.temperature})")
        if self.top_k < 0:
            raise UsageError(f"top-k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top-p must be in (0, 1] (got {self.top_p})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] (float) -> token ids [B] (long), on the logits' device."""
        if self.params.greedy:
            return logits.argmax(dim=-1)
        probs = filtered_probs(logits, self.params)
        race = torch.empty_like(probs).exponential_(1, generator=self.generator)
        return (probs / race).argmax(dim=-1)


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a non-greedy Sampler draws from: softmax(logits / T), top-k, then top-p, renormalised.

    top-k keeps the tokens whose logit is at least the k-th largest (ties with it stay); top-p keeps
    the smallest most-likely-first prefix whose mass reaches top_p (the most likely token always stays).
    """
    # Shifted so the best logit is 0 and divided in float64: a temperature as small as 1e-300
    # still leaves the best token at probability 1 (float32 would make it inf / inf = nan).
    wide = logits.double()
    logits = (wide - wide.amax(dim=-1, keepdim=True)) / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= p.top_p
        drop[..., 0] = False  # the most likely token stays, even for a top-p below any probability
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs.float()
