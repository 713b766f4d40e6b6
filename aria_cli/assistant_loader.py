"""From the run flags to a loaded Assistant: which model, device, dtype, context and placement.

`open_assistant(opts)` is what `aria ask` and `aria chat` call. On a CUDA device the placement
is planned from the memory budget (`--gpu-memory`, else the free memory) before any weight is
read, and the loader follows the plan (offloading routed experts when they do not all fit). On
the CPU every weight is already in CPU memory, so nothing is planned or offloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from runtime.assistant import Assistant, GenerationOptions
from runtime.config import AriaConfig, load_config
from runtime.errors import AriaError, PlacementError, UsageError
from runtime.placement import Plan, plan_placement, resolve_scheme
from runtime.plan_table import plan_rows
from runtime.quant_targets import families_to_load
from runtime.sampling import SamplingParams

from . import console
from .models import resolve_model_dir
from .options import PlacementOptions, RunOptions
from .settings import SETTINGS, format_size

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def open_assistant(opts: RunOptions) -> Assistant:
    """Resolve, plan and load the model the flags name (may download it unless --offline)."""
    model_dir = resolve_model_dir(opts.model, offline=opts.offline)
    config = load_config(model_dir)
    device = pick_device(opts.device)
    dtype = pick_dtype(opts.dtype, device)
    context = context_length(opts.max_context, config)
    check_offload_flags(opts, config)
    check_scheme_runs(checkpoint_scheme(config, opts.quant), device, dtype)
    console.detail(f"model: {opts.model} ({model_dir})")
    console.detail(f"device: {device}, dtype: {_dtype_name(dtype) or 'as stored'}, context: {context} tokens")
    plan = plan_for(opts, config, device, dtype, context)
    with busy(f"loading {opts.model}"):
        assistant = Assistant.open(
            model_dir, dtype=dtype, device=str(device), quant=None if opts.quant == "none" else opts.quant,
            quant_lm_head=opts.quant_lm_head, name=opts.model, plan=plan, max_context=context, crop_size=opts.image_size,
            split_image=opts.split_image, compile=opts.compile,
        )
    console.detail(f"loaded in {assistant.load_s:.2f} s")
    return assistant


def generation_options(opts: RunOptions) -> GenerationOptions:
    sampling = SamplingParams(temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, seed=opts.seed)
    return GenerationOptions(max_tokens=opts.max_tokens, sampling=sampling, stop=tuple(opts.stop))


def pick_device(name: str) -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU; asking for a missing GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AriaError(f"--device {name}: no CUDA GPU is available to this torch build; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AriaError(f"--device {name}: there are only {torch.cuda.device_count()} GPU(s); "
                            "use cuda:0 or another index below that")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The compute dtype; None keeps the checkpoint's own (`auto` on the CPU).

    On a GPU: bfloat16 where the chosen GPU computes it natively (Ampere, compute capability 8.0,
    and newer), else float16. (torch.cuda.is_bf16_supported asks the current GPU, not the chosen
    one, and counts emulated bfloat16 as supported.)
    """
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def check_scheme_runs(scheme: str | None, device: torch.device, dtype: torch.dtype | None) -> None:
    """Refuse, before loading, a quantization whose kernels cannot run here (int4 on CUDA needs
    an Ampere or newer GPU computing in bfloat16)."""
    resolved = resolve_scheme(scheme)
    problem = resolved.device_problem(device, dtype) if resolved is not None and dtype is not None else None
    if problem:
        raise UsageError(f"{problem}; use --quant int8 or nf4 (a model stored in int4: quantize the original "
                         "with --scheme int8 or nf4), or --dtype bfloat16 on an Ampere or newer GPU")


def context_length(asked: int, config: AriaConfig) -> int:
    """The KV cache length: `--max-context`, capped by the positions the model was trained for."""
    limit = config.text.max_position_embeddings
    if asked > limit and asked != SETTINGS["max_context"].default:
        console.warn(f"--max-context {asked} is more than the model's {limit} positions; using {limit}")
    return min(asked, limit)


def check_offload_flags(opts: RunOptions | PlacementOptions, config: AriaConfig) -> None:
    """Range checks that need the model's shape (the planner repeats them on a GPU)."""
    t = config.text
    if opts.n_cpu_moe > t.num_hidden_layers:
        raise UsageError(f"--n-cpu-moe must be 0 to {t.num_hidden_layers} (the model's layers), got {opts.n_cpu_moe}")
    if opts.expert_slots is not None and opts.expert_slots > t.moe_num_experts:
        raise UsageError(
            f"--expert-slots must be 0 to {t.moe_num_experts} (experts per layer), got {opts.expert_slots}"
        )


def checkpoint_scheme(config: AriaConfig, quant: str) -> str | None:
    """The routed experts' format: the checkpoint's own scheme, else `--quant`, else None (float)."""
    if config.quantization is not None:
        stored = str(config.quantization.get("scheme"))
        if quant not in ("none", stored):
            raise UsageError(f"this model is already quantized ({stored}); drop --quant {quant}")
        return stored
    return None if quant == "none" else quant


def plan_for(opts: RunOptions, config: AriaConfig, device: torch.device, dtype: torch.dtype | None,
             context: int) -> Plan | None:
    """The placement to load with: planned on a GPU, None on the CPU (nothing to offload to)."""
    if device.type != "cuda":
        if opts.cpu_moe or opts.n_cpu_moe or opts.expert_slots is not None or opts.gpu_memory is not None:
            console.detail("placement: running on the CPU, where every expert already is; "
                           "--cpu-moe, --n-cpu-moe, --expert-slots and --gpu-memory have no effect")
        else:
            console.detail("placement: running on the CPU; nothing is offloaded")
        return None
    from runtime.device import free_memory

    free = free_memory(device)
    if free is None:  # cannot happen on CUDA, but never plan against an unknown budget
        return None
    budget = opts.gpu_memory or free
    if budget > free:  # the CUDA context and other processes already hold the difference
        console.warn(f"--gpu-memory {format_size(budget)} is more than the {format_size(free)} free on {device}; "
                     f"planning for {format_size(free)}")
        budget = free
    assert dtype is not None  # pick_dtype always chooses one on CUDA
    plan = plan_placement(config, budget, context=context, scheme=checkpoint_scheme(config, opts.quant),
                          dtype=dtype, cpu_moe=opts.cpu_moe, n_cpu_moe=opts.n_cpu_moe,
                          expert_slots=opts.expert_slots,
                          quantized=families_to_load(config.quantization, opts.quant_lm_head), compiled=opts.compile)
    problem = host_memory_problem(plan)
    if problem and plan.host_layout_copy_bytes:
        # int4/nf4 keep a second host copy of each cached expert only to compute misses on the
        # CPU; fetching every miss needs one copy (and, if even that does not fit, it is the
        # smaller need the refusal names).
        plan = dataclasses.replace(plan, miss_policy="fetch")
        console.detail("placement: CPU memory holds one copy of the experts, not two: misses are fetched "
                       "to the GPU, never computed on the CPU")
        problem = host_memory_problem(plan)
    if problem:
        raise PlacementError(problem)
    source = "--gpu-memory" if opts.gpu_memory else "free memory"
    console.detail(f"placement for {format_size(budget)} ({source}):")
    for part, where, size in plan_rows(plan):
        console.detail(f"  {part}: {where} {size}".rstrip())
    return plan


def host_memory_problem(plan: Plan) -> str | None:
    """Why the plan's experts do not fit the CPU memory available now, or None when they do.

    The ones the GPU caches are pinned (never swapped) and the others are read every token, so
    such a load would fail after minutes, or every token would wait on the disk. A 1 GiB
    reserve stays for everything else."""
    from runtime.device import available_host_memory
    from runtime.sizes import human_size

    available = available_host_memory()
    if not plan.host_bytes or available is None or plan.host_bytes + 2**30 <= available:
        return None
    smaller = {"bf16": "--quant int8 or int4", "fp16": "--quant int8 or int4", "int8": "--quant int4"}.get(plan.scheme)
    hint = f"use {smaller}, or free some memory" if smaller else "free some memory, or use a GPU with more memory"
    return (f"this placement keeps {human_size(plan.host_bytes)} of experts in CPU memory, but only "
            f"{human_size(available)} is available; {hint}")


@contextlib.contextmanager
def busy(message: str) -> Iterator[None]:
    """A transient spinner on stderr while something slow runs (only on a terminal, never with -q)."""
    if console.is_quiet() or not console.stderr_is_terminal():
        yield
        return
    with console.err.status(message + " ..."):
        yield


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")
