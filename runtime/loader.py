"""Checkpoint directory -> ready model: config, meta-device build, strict mmap load, buffers.

Three kinds of load, one entry point:
- a float checkpoint as it is (any layout; tensors are mmap views when no dtype change is asked);
- a float checkpoint with `quant=` : quantized while loading, each source tensor released as soon
  as it is packed, so memory stays near the quantized size and nothing is written;
- a quantized checkpoint written by `aria quantize` (its config.json says so): packed tensors
  go straight to the kernels, floats never exist for those weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quant import Scheme, get_scheme, scheme_from_metadata

from .checkpoint import Checkpoint, check_fits, load_weights, open_checkpoint
from .config import AriaConfig, load_config
from .decode_kernels import use_gemv_layout
from .errors import CheckpointError, UsageError
from .model import AriaForConditionalGeneration, build_model
from .quant_targets import (
    QUANTIZED_FAMILIES,
    families_to_load,
    is_quantized,
    packed_name,
    stored_shape,
)
from .quantized_model import QuantReport, install_packed, quantize_model


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    quant: str | None = None,
    quant_lm_head: bool = False,
) -> AriaForConditionalGeneration:
    """Load an Aria checkpoint. `dtype=None` keeps the stored dtype; `quant` = int4|int8|nf4|None;
    `quant_lm_head` quantizes the lm_head too (runtime.quant_targets)."""
    model, _ = load_model_with_report(path, dtype, device, quant, quant_lm_head)
    return model


def load_model_with_report(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    quant: str | None = None,
    quant_lm_head: bool = False,
    staged: bool = False,
) -> tuple[AriaForConditionalGeneration, QuantReport | None]:
    """load_model, with the quantization report. `staged`: the weights are loaded into host
    memory for runtime.offload.apply_offload to place, so layouts only the CPU's kernels want
    (bf16 experts re-laid for gemv, quantized experts prepared for the CPU) are not made."""
    config = load_config(path)
    model = build_model(config)  # meta: no memory until the checkpoint's tensors are assigned
    report = None
    if config.quantization is not None:
        if quant not in (None, "none", config.quantization.get("scheme")):
            raise UsageError(
                f"{path} is already quantized ({config.quantization.get('scheme')}); drop --quant {quant}"
            )
        families = families_to_load(config.quantization, quant_lm_head)
        report = _load_quantized(model, config, path, dtype, device, families, staged)
    elif quant not in (None, "none"):
        report = _load_and_quantize(model, path, _scheme(quant), dtype, device, families_to_load(None, quant_lm_head),
                                    staged)
    elif quant_lm_head:
        raise UsageError("--quant-lm-head quantizes with the --quant scheme; add --quant int4, int8 or nf4")
    else:
        ckpt = load_weights(model, path, dtype=dtype, device=device)
        if not staged:
            use_gemv_layout(model, release=ckpt.release)  # bf16 on the CPU: see runtime.decode_kernels
    model.reset_buffers()
    return model.eval(), report


def _scheme(name: str) -> Scheme:
    try:
        return get_scheme(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _compute_dtype(ckpt: Checkpoint, dtype: torch.dtype | None) -> torch.dtype:
    return dtype or ckpt.dtype("language_model.model.embed_tokens.weight")


def _load_and_quantize(model, path, scheme: Scheme, dtype, device, families: tuple[str, ...],
                       staged: bool) -> QuantReport:
    # Load as stored (zero-copy mmap views), pack each target and drop its source pages right
    # away, then convert what stays in floating point.
    ckpt = load_weights(model, path, dtype=None, device="cpu")
    compute = _compute_dtype(ckpt, dtype)
    try:
        report = quantize_model(model, scheme, compute, device, release=ckpt.release, families=families,
                                staged=staged)
    except ValueError as exc:  # a weight shape the scheme's kernels cannot take
        raise UsageError(f"{exc}; choose another --quant") from None
    model.reset_buffers()  # materialise the (meta) RoPE buffer so .to() can move the rest
    model.to(device=device, dtype=compute)
    return report


def expected_quantized_shapes(
    model: torch.nn.Module, scheme: Scheme, families: tuple[str, ...] = QUANTIZED_FAMILIES
) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape a quantized checkpoint of `model` holds (floats + packed parts)."""
    expected = {}
    for name, tensor in model.state_dict().items():
        if is_quantized(name, families):
            for suffix, (shape, _) in scheme.packed_spec(stored_shape(name, tensor.shape)).items():
                expected[packed_name(name, suffix)] = shape
        else:
            expected[name] = tuple(tensor.shape)
    return expected


def _load_quantized(model, config: AriaConfig, path, dtype, device, families: tuple[str, ...],
                    staged: bool) -> QuantReport:
    try:  # the block also lists the quantized families ("modules"), which are not scheme options
        scheme = scheme_from_metadata({k: v for k, v in config.quantization.items() if k != "modules"})
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}; re-run aria quantize") from None
    ckpt = open_checkpoint(path)
    check_fits(ckpt, expected_quantized_shapes(model, scheme, families))
    compute = _compute_dtype(ckpt, dtype)

    def packed(name: str) -> dict[str, torch.Tensor]:
        return {s: ckpt.get(packed_name(name, s)) for s in scheme.suffixes}

    try:
        report = install_packed(model, scheme, packed, compute, device, families=families, staged=staged)
    except ValueError as exc:  # a packed tensor of the wrong dtype or size
        raise CheckpointError(f"{path}: {exc}; re-run aria quantize") from None
    state = {n: ckpt.get(n, compute, device, release_source=True) for n in model.state_dict()}
    model.load_state_dict(state, strict=True, assign=True)
    return report
