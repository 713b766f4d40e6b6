"""Guess the next layer's experts from the current hidden state and start copying them early.

Layer l's MoE input is x = RMSNorm(h) * w_l, with h the residual stream after l's attention.
Layer l+1 will route RMSNorm(h') * w_{l+1}, where h' = h + (l's MoE and l+1's attention
outputs). The residual stream changes little from one layer to the next, so h' ~ h and the
next router's input is guessed as x * (w_{l+1} / w_l), computed here for the cost of one router
matmul. A wrong guess costs a copy, never a wrong answer: the next layer routes for real.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..host_calls import HostCalled, called
from ..moe import MoEBlock
from .experts import OffloadedExperts


class NextLayerGuess(HostCalled):
    def __init__(self, next_block: MoEBlock, this_norm: Tensor, next_norm: Tensor, target: OffloadedExperts):
        self.router = next_block.router
        self.top_k = next_block.top_k
        this = this_norm.detach().float()
        # Where this layer's norm weight is ~0 the input carries no information about h.
        ratio = torch.where(this.abs() > 1e-6, next_norm.detach().float() / this, torch.zeros_like(this))
        self.ratio = ratio.to(self.router.weight.device, self.router.weight.dtype)
        self.target = target
        self._register()

    def __call__(self, x: Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat * self.ratio.to(flat.dtype))
        guess = torch.topk(logits, self.top_k, dim=-1).indices.reshape(-1)
        counts = torch.bincount(guess, minlength=self.target.num_experts).tolist()
        self.target.prefetch({e: c for e, c in enumerate(counts) if c}, flat.shape[0])

    def hook(self, module, args) -> tuple | None:
        """As a forward pre-hook on a resident layer's MoE block. In a compiled step the guess is
        one opaque op (runtime.host_calls); the block then reads the op's copy of its input, so
        the op is ordered before it and never dropped as unused."""
        if torch.compiler.is_compiling():
            return (_guess_op(args[0], self.host_key), *args[1:])
        self(args[0])
        return None


@torch.library.custom_op("aria::next_layer_guess", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _guess_op(x: Tensor, guess: Tensor) -> Tensor:
    called(guess)(x)
    return x.clone(memory_format=torch.contiguous_format)  # an op's output may not be its input


@_guess_op.register_fake
def _(x, guess):
    return x.new_empty(x.shape)
