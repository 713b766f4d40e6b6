"""Single-row bfloat16 products for decode on the CPU: gemv, on weights whose rows are the outputs.

A batch-1 decode step multiplies one activation row by every active weight, so its speed is how
fast those weights stream through the cores. In bfloat16 on the CPU, PyTorch's gemm for one row
(F.linear, x @ W) is much slower than its gemv (torch.mv) on an [out, in] matrix: ~1.3x against
nn.Linear's [out, in] weights, ~1.8x against the checkpoints' [in, out] expert layout; a whole
mid-size decode step went from 16 to 26 tokens/s (one thread). In float32 the two are equal, so
float32 keeps the ordinary ops. Hence:
- `linear(module, x)` and `row_matmul(x, w)` take torch.mv for a single bf16 CPU row;
- `use_gemv_layout(model)` stores bf16 routed experts as [E, out, in] memory, still *viewed* as
  [E, in, out]: names, shapes, the state dict and every other code path see the same tensors.
Small bf16 weights (under ~2^17 elements, e.g. the demo model's) skip oneDNN: its fixed cost per
product (~20 us on this CPU) is several times the whole product on PyTorch's own kernel.
GPU decode is unaffected (its gemm handles one row well and the layout is left alone there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Measured crossover (bf16 gemv, one thread): 128x128 3.6x faster without oneDNN, 512x256 even,
# 1024x1024 1.8x slower without it.
_ONEDNN_MIN_WEIGHTS = 1 << 17


def gemv(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch.mv(w, v), on PyTorch's own kernel for a small w (see _ONEDNN_MIN_WEIGHTS)."""
    if torch.compiler.is_compiling():
        return _gemv_op(w, v)
    return _gemv(w, v)


def _gemv(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if w.numel() >= _ONEDNN_MIN_WEIGHTS or not torch.backends.mkldnn.enabled:
        return torch.mv(w, v)
    torch.backends.mkldnn.enabled = False
    try:
        return torch.mv(w, v)
    finally:
        torch.backends.mkldnn.enabled = True


# Compiled, the gemv stays this kernel: inductor would turn torch.mv into a reduction of its own
# code, fused with what comes before (the final norm before the lm_head: 4x slower than the
# kernel, a mid-size compiled step 1.6x slower than eager), and could not honour the switch above.
@torch.library.custom_op("aria::gemv", mutates_args=())
def _gemv_op(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _gemv(w, v)


@_gemv_op.register_fake
def _(w, v):
    return v.new_empty(w.shape[0])


def _one_cpu_row(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1]


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), as a gemv when x is one bf16 row on the CPU and module a plain bias-free nn.Linear.

    A module without hooks (nn.Linear, or its quantized stand-in) is applied directly: the module
    call machinery costs as much as the product itself in a small decode step. A hooked module is
    called as usual, so its hooks see every input.
    """
    if module._forward_hooks or module._forward_pre_hooks:
        return module(x)
    if type(module) is not nn.Linear:
        return module.forward(x)
    if module.bias is None and _one_cpu_row(x):
        return gemv(module.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
    return F.linear(x, module.weight, module.bias)


def row_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ w [in, out]; a gemv on w's [out, in] memory when that is how w is stored."""
    if _one_cpu_row(x) and w.stride(0) == 1 and w.stride(1) == w.shape[0]:
        return gemv(w.T, x.reshape(-1)).view(1, -1)
    return x @ w


@torch.no_grad()
def use_gemv_layout(model: nn.Module, release: Callable[[str], None] | None = None) -> int:
    """Re-lay every bf16 CPU routed-expert weight [E, in, out] as [E, out, in] memory (same view).

    One tensor at a time; `release(name)` then drops its source (e.g. the checkpoint's mapped
    pages) so memory stays near one copy. Returns the bytes re-laid; other weights are left as are.
    """
    from .moe import RoutedExperts  # here: moe imports this module

    moved = 0
    for prefix, module in model.named_modules():
        if not isinstance(module, RoutedExperts):
            continue
        for part in ("fc1", "fc2"):
            param = getattr(module, part).weight
            if param.dtype != torch.bfloat16 or param.device.type != "cpu" or param.transpose(1, 2).is_contiguous():
                continue
            param.data = param.transpose(1, 2).contiguous().transpose(1, 2)
            moved += param.numel() * param.element_size()
            if release is not None:
                release(f"{prefix}.{part}.weight")
    return moved
