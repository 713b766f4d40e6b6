"""`aria plan`: where weights, KV cache and experts would live, without loading any weight.

Only the model's config.json is needed. For the published Aria repos (and the aria, aria-int4,
aria-int8 aliases) the config is built in, so `aria plan` works before anything is downloaded;
another Hub model has only its config.json fetched. With a budget (`--gpu-memory`, or the free
memory of the GPU) it prints one plan; with neither, a summary for common card sizes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated

import torch
import typer

from runtime.config import AriaConfig, load_config
from runtime.errors import ModelNotFoundError, PlacementError, UsageError
from runtime.known_configs import KNOWN_REPOS, aria_config_dict
from runtime.placement import Bandwidths, card_plans, plan_placement, scheme_label
from runtime.plan_table import PLAN_COLUMNS, SUMMARY_COLUMNS, plan_rows, summary_rows
from runtime.quant_targets import families_to_load

from . import console
from .assistant_loader import checkpoint_scheme, context_length, pick_device
from .hub import hub_cache_dir, hub_endpoint, hub_errors
from .models import QUANTIZED_ALIASES, cached_snapshot, not_downloaded, parse_model, resolve_model_dir
from .options import PlacementOptions, with_options
from .settings import format_size

_DTYPES = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DEFAULT_BW = Bandwidths()


def plan_config(name: str, offline: bool) -> tuple[AriaConfig, str]:
    """The config of model `name` and where it came from, downloading at most config.json."""
    ref = parse_model(name)
    if ref.kind == "managed" and name in QUANTIZED_ALIASES and not (ref.path and ref.path.is_dir()):
        # aria-int4 / aria-int8 before they are made: the real Aria at that scheme.
        scheme = name.removeprefix("aria-")
        config = AriaConfig.from_dict(aria_config_dict())
        return dataclasses.replace(config, quantization={"scheme": scheme}), f"built-in Aria config at {scheme}"
    if ref.kind != "hub":
        path = resolve_model_dir(name, offline=offline)
        return load_config(path), str(path)
    assert ref.repo_id is not None
    snapshot = cached_snapshot(ref.repo_id)
    if snapshot is not None and (snapshot / "config.json").is_file():
        return load_config(snapshot), f"{ref.repo_id}, downloaded"
    if ref.repo_id in KNOWN_REPOS:
        return AriaConfig.from_dict(aria_config_dict()), f"{ref.repo_id}, built-in config"
    if offline:
        raise not_downloaded(name)
    from huggingface_hub import HfApi, hf_hub_download

    with hub_errors(ref.repo_id, lookup=True):
        # Looked up first, as `aria download` does: one API call fails at once without a network,
        # where hf_hub_download retries for half a minute (printing every attempt).
        info = HfApi(endpoint=hub_endpoint()).model_info(ref.repo_id, revision="main")
    if "config.json" not in {sibling.rfilename for sibling in info.siblings or []}:
        raise ModelNotFoundError(f"{ref.repo_id} has no config.json on {hub_endpoint()}: it is not an Aria "
                                 "model; check the name")
    with hub_errors(ref.repo_id, lookup=True):
        path = hf_hub_download(ref.repo_id, "config.json", cache_dir=hub_cache_dir(), endpoint=hub_endpoint())
    return load_config(path), f"{ref.repo_id}, config.json from the Hub"


def _scheme(opts: PlacementOptions, scheme_flag: str | None, config: AriaConfig) -> tuple[str | None, bool]:
    """The experts' format to plan for (None = float), and whether the user or the model fixed it."""
    quant = opts.quant
    if scheme_flag is not None:
        if scheme_flag not in ("none", "int4", "int8", "nf4"):
            raise UsageError(f"--scheme must be one of none, int4, int8, nf4 (got {scheme_flag})")
        if quant not in ("none", scheme_flag):
            raise UsageError(f"--scheme {scheme_flag} and --quant {quant} disagree; give one of them")
        quant = scheme_flag
    fixed = scheme_flag is not None or quant != "none" or config.quantization is not None
    return checkpoint_scheme(config, quant), fixed


@with_options(PlacementOptions)
def plan(
    scheme: Annotated[str | None, typer.Option(
        "--scheme", metavar="none|int4|int8|nf4", show_default=False,
        help="Weight format to plan for; the same as --quant (default: the model's own, else all of bf16, "
             "int8, int4 in the summary).")] = None,
    gpu_bandwidth: Annotated[float, typer.Option(
        "--gpu-bandwidth", metavar="GB/s", help="GPU memory bandwidth for the speed bound.")]
    = _DEFAULT_BW.device,
    pcie_bandwidth: Annotated[float, typer.Option(
        "--pcie-bandwidth", metavar="GB/s", help="Host-to-GPU copy bandwidth (pinned memory).")]
    = _DEFAULT_BW.pcie,
    cpu_bandwidth: Annotated[float, typer.Option(
        "--cpu-bandwidth", metavar="GB/s", help="CPU memory bandwidth, for experts computed there.")]
    = _DEFAULT_BW.cpu,
    *,
    opts: PlacementOptions,
) -> None:
    """Show where the model's weights, KV cache and experts would live on a GPU, and the
    decode speed that placement allows, without loading any weight.

    With --gpu-memory (or a GPU whose free memory can be read) it prints one plan; otherwise one
    line per common card size and weight format. Works for rhymes-ai/Aria before downloading it.
    """
    config, source = plan_config(opts.model, opts.offline)
    chosen, fixed = _scheme(opts, scheme, config)
    dtype = _DTYPES[opts.dtype]
    context = context_length(opts.max_context, config)
    for flag, value in (("--gpu-bandwidth", gpu_bandwidth), ("--pcie-bandwidth", pcie_bandwidth),
                        ("--cpu-bandwidth", cpu_bandwidth)):
        if not 0 < value < math.inf:  # nan and inf too (JSON has no Infinity)
            raise UsageError(f"{flag} must be a number of GB/s more than 0 (got {value:g})")
    bandwidth = Bandwidths(device=gpu_bandwidth, pcie=pcie_bandwidth, cpu=cpu_bandwidth)
    placement = {"context": context, "dtype": dtype, "cpu_moe": opts.cpu_moe, "n_cpu_moe": opts.n_cpu_moe,
                 "expert_slots": opts.expert_slots, "bandwidth": bandwidth,
                 "quantized": families_to_load(config.quantization, opts.quant_lm_head), "compiled": opts.compile}
    budget = opts.gpu_memory
    if budget is None:
        from runtime.device import free_memory

        budget = free_memory(pick_device(opts.device))
    if budget is None:
        shown = (chosen or scheme_label(None, dtype),) if fixed else None
        _print_summary(opts, source, card_plans(config, **({"schemes": shown} if shown else {}), **placement),
                       context)
        return
    result = plan_placement(config, budget, scheme=chosen, **placement)
    origin = "--gpu-memory" if opts.gpu_memory else "free on the GPU"
    console.info(f"{opts.model} ({source}): {result.scheme} weights, {str(dtype).removeprefix('torch.')} compute, "
                 f"{context} tokens of context, {format_size(budget)} GPU memory ({origin})")
    if opts.json:
        console.emit_json({"model": opts.model, "config": source, **result.to_dict()})
        return
    console.emit_table([c.upper() for c in PLAN_COLUMNS], plan_rows(result))


def _print_summary(opts: PlacementOptions, source: str, results: list, context: int) -> None:
    console.info(f"{opts.model} ({source}), {context} tokens of context; no GPU budget known, so "
                 "plans for common cards follow (pass --gpu-memory SIZE for one)")
    if opts.json:
        console.emit_json({"model": opts.model, "config": source, "cards": [
            {"gpu_gib": card, "scheme": name,
             "plan": None if isinstance(p, PlacementError) else p.to_dict(),
             "error": str(p) if isinstance(p, PlacementError) else None}
            for card, name, p in results
        ]})
        return
    console.emit_table([c.upper() for c in SUMMARY_COLUMNS], summary_rows(results))
