"""Plan what lives on the GPU before any weight is loaded, from the memory budget.

Order of claims on the budget: dense weights (everything but the routed experts), the KV cache
for the context length, a workspace for activations, then routed experts. If every routed
expert fits, all stay resident. Otherwise each layer gets the same number of device *slots*
(a cache over that layer's experts, which all live in host memory) plus two shared stream
buffers through which misses are fetched when a layer has fewer slots than it needs.
`--cpu-moe` / `--n-cpu-moe N` pin the experts of all / the first N layers to the host, where
they are computed (llama.cpp's flags). The result is a `Plan`, a plain data object the loader
(`runtime.offload.apply_offload`) follows and `aria plan` prints (`runtime.plan_table`).

Byte counts of weights are exact (runtime.weight_bytes); the workspace is an estimate with its
terms written out below; the decode speed is a bandwidth bound, not a measurement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from quant import Scheme, get_scheme

from .config import AriaConfig, TextConfig
from .errors import PlacementError, UsageError
from .kv_cache import KVCache
from .quant_targets import QUANTIZED_FAMILIES
from .sizes import human_size
from .weight_bytes import WeightBytes, weight_bytes

DEFAULT_CONTEXT = 8192
# Prompts are prefilled in chunks of at most this many tokens; the workspace is sized for one.
DEFAULT_PREFILL_CHUNK = 2048
# Image crops run through the vision tower at once that the workspace is sized for.
DEFAULT_IMAGE_CROPS = 4
# CUDA context leftovers, allocator fragmentation, cuBLAS/SDPA workspaces.
RUNTIME_RESERVE = 512 * 2**20
# A device slot holds one expert's tensors, each starting on this boundary.
SLOT_ALIGN = 256
# Payload tensors of one expert a slot has alignment headroom for (fc1 + fc2, up to 4 each).
MAX_PAYLOAD_TENSORS = 8
# Device buffers that stream misses not kept in a slot (two, so one fills while one computes).
STREAM_BUFFERS = 2
MISS_POLICIES = ("auto", "fetch", "cpu")
CARD_SIZES_GIB = (16, 24, 48, 80)

DEVICE, CACHE, HOST = "device", "cache", "host"


@dataclass(frozen=True)
class Bandwidths:
    """GB/s (1e9 bytes/s) for the decode-speed bound. Defaults: a current 24 GB card, PCIe 4.0
    x16 from pinned memory, a dual-channel DDR5 desktop. Override with measured numbers."""

    device: float = 900.0
    pcie: float = 25.0
    cpu: float = 50.0


@dataclass(frozen=True)
class LayerPlacement:
    """Where one layer's routed experts live.

    device: all resident on the device. cache: all in host memory, `slots` of them cached on
    the device. host: all in host memory and computed there.
    """

    layer: int
    where: str
    slots: int


def computes_on_host(where: str, miss_policy: str) -> bool:
    """Whether a layer placed `where` ever runs an expert on the host: always for "host", on a
    cache miss unless the policy only fetches; never for a resident layer."""
    return where == HOST or (where == CACHE and miss_policy != "fetch")


@dataclass(frozen=True)
class Plan:
    scheme: str  # "bf16", "int4", ... (the routed experts' format)
    dtype: torch.dtype  # compute dtype, also of the KV cache and non-quantized weights
    context: int
    budget: int  # device bytes the plan may use
    weights: WeightBytes = field(repr=False)
    kv_bytes: int
    workspace_bytes: int
    slot_bytes: int  # one device slot / stream buffer
    stream_buffers: int
    layers: tuple[LayerPlacement, ...]
    num_experts: int
    top_k: int
    prefill_chunk: int
    miss_policy: str = "auto"
    bandwidth: Bandwidths = Bandwidths()
    graph_bytes: int = 0  # compiled decode's CUDA graphs (graph_pool_bytes), when it has them

    # ----- device and host bytes ---------------------------------------------------------------

    @property
    def dense_bytes(self) -> int:
        return self.weights.dense

    @property
    def expert_bytes(self) -> int:
        return self.weights.expert

    @property
    def resident_expert_bytes(self) -> int:
        return sum(1 for lp in self.layers if lp.where == DEVICE) * self.num_experts * self.expert_bytes

    @property
    def slot_total_bytes(self) -> int:
        return sum(lp.slots for lp in self.layers if lp.where == CACHE) * self.slot_bytes

    @property
    def stream_bytes(self) -> int:
        return self.stream_buffers * self.slot_bytes

    @property
    def device_bytes(self) -> int:
        return (self.dense_bytes + self.kv_bytes + self.workspace_bytes + self.graph_bytes
                + self.resident_expert_bytes + self.slot_total_bytes + self.stream_bytes)

    @property
    def host_store_bytes(self) -> int:
        """The expert store's rows, one per offloaded expert (pinned on CUDA machines)."""
        offloaded = sum(1 for lp in self.layers if lp.where != DEVICE)
        return offloaded * self.num_experts * self.expert_bytes

    @property
    def host_layout_copy_bytes(self) -> int:
        """A cached layer whose misses may run on the host, with a scheme whose CPU kernels want
        another layout than the device's (int4, nf4), keeps a second row per expert in that layout
        (about the same size; runtime.offload.host_store). A host-only layer keeps that layout alone."""
        scheme = resolve_scheme(self.scheme)
        if scheme is None or scheme.same_layout_on_every_device:
            return 0
        both = sum(1 for lp in self.layers if lp.where == CACHE and computes_on_host(lp.where, self.miss_policy))
        return both * self.num_experts * self.expert_bytes

    @property
    def host_bytes(self) -> int:
        return self.host_store_bytes + self.host_layout_copy_bytes

    @property
    def offloaded(self) -> bool:
        return any(lp.where != DEVICE for lp in self.layers)

    @property
    def experts_on_device_fraction(self) -> float:
        on = sum(self.num_experts if lp.where == DEVICE else lp.slots for lp in self.layers)
        return on / (len(self.layers) * self.num_experts)

    # ----- the bandwidth model -----------------------------------------------------------------

    def decode_seconds(self, position: int) -> float:
        """Lower bound on one decode step at `position` tokens of context, batch 1.

        Device: every active dense byte, the KV cache so far and each expert found on the device
        are read once at device bandwidth. A layer with S of E experts cached finds a routed
        expert there with probability S/E (uniform routing; skewed real routing does better).
        Each miss is served by the cheaper of a PCIe fetch and a CPU pass over its weights;
        host layers compute all their experts on the CPU. Misses are serial at batch 1.
        """
        bw = self.bandwidth
        ctx_bytes = self.kv_bytes * min(position, self.context) // self.context
        device_reads = self.weights.active_dense + ctx_bytes
        miss_time = 0.0
        fetch = self.slot_bytes / (bw.pcie * 1e9)
        cpu = self.expert_bytes / (bw.cpu * 1e9)
        for lp in self.layers:
            if lp.where == DEVICE:
                device_reads += self.top_k * self.expert_bytes
            elif lp.where == HOST:
                miss_time += self.top_k * cpu
            else:
                hit = min(lp.slots, self.num_experts) / self.num_experts
                device_reads += self.top_k * hit * self.expert_bytes
                miss = min(fetch, cpu) if self.miss_policy == "auto" else (fetch if self.miss_policy == "fetch" else cpu)
                miss_time += self.top_k * (1 - hit) * miss
        return device_reads / (bw.device * 1e9) + miss_time

    def decode_tokens_per_second(self, position: int) -> float:
        return 1.0 / self.decode_seconds(position)

    def to_dict(self) -> dict:
        """Plain JSON-ready numbers (for --json)."""
        return {
            "scheme": self.scheme,
            "dtype": str(self.dtype).removeprefix("torch."),
            "context": self.context,
            "budget_bytes": self.budget,
            "device_bytes": self.device_bytes,
            "dense_bytes": self.dense_bytes,
            "kv_bytes": self.kv_bytes,
            "workspace_bytes": self.workspace_bytes,
            "graph_bytes": self.graph_bytes,
            "resident_expert_bytes": self.resident_expert_bytes,
            "slot_bytes": self.slot_bytes,
            "slot_total_bytes": self.slot_total_bytes,
            "stream_buffers": self.stream_buffers,
            "host_bytes": self.host_bytes,
            "expert_bytes": self.expert_bytes,
            "layers": [asdict(lp) for lp in self.layers],
            "miss_policy": self.miss_policy,
            "bandwidth_gbps": asdict(self.bandwidth),
            "decode_tokens_per_second": {
                "short_context": self.decode_tokens_per_second(0),
                "full_context": self.decode_tokens_per_second(self.context),
            },
        }


def scheme_label(scheme: Scheme | None, dtype: torch.dtype) -> str:
    if scheme is not None:
        return scheme.name
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def workspace_bytes(
    config: AriaConfig, context: int, dtype: torch.dtype, prefill_chunk: int, image_crops: int
) -> int:
    """Peak activation memory of a prefill chunk or an image batch, plus the runtime reserve.

    Text, per chunk token: the residual and its normed copy, q/k/v, their rotated copies and the
    attention output (10 x hidden); per routed choice the gathered input, gate|up, SwiGLU and
    weighted output (2 x hidden + 3 x expert width); the shared expert's gate, up and product;
    router logits (fp32) and the dispatch's sort indices (int64). Plus the causal mask
    (chunk x context bools) and the last position's logits. Vision, per crop and patch: about
    eight hidden-wide tensors and two MLP-wide ones. The two phases do not overlap; through both
    the whole prompt's embeddings are held (context x hidden).
    """
    t: TextConfig = config.text
    v = config.vision
    e = dtype.itemsize
    chunk = min(context, prefill_chunk)
    per_token = e * (10 * t.hidden_size + t.moe_topk * (2 * t.hidden_size + 3 * t.moe_intermediate_size)
                     + 3 * t.shared_intermediate_size)
    per_token += 4 * t.moe_num_experts + 4 * 8 * t.moe_topk
    text = chunk * per_token + chunk * context + t.vocab_size * (e + 4)
    patches = (v.image_size // v.patch_size) ** 2
    vision = image_crops * patches * e * (8 * v.hidden_size + 2 * v.intermediate_size)
    prompt = context * t.hidden_size * e
    return max(text, vision) + prompt + RUNTIME_RESERVE


def graph_pool_bytes(t: TextConfig, weights: WeightBytes) -> int:
    """Memory of compiled decode's CUDA graphs, on top of the workspace: a graph keeps its own
    pool, which eager work cannot reuse, and a step there copies each layer's chosen experts out
    (runtime.moe, gathering on the device); two layers' copies may be alive at once."""
    return 2 * t.moe_topk * weights.expert


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def resolve_scheme(scheme: str | Scheme | None) -> Scheme | None:
    if scheme is None or isinstance(scheme, Scheme):
        return scheme
    if scheme in ("none", "bf16", "fp16", "fp32"):
        return None
    try:
        return get_scheme(scheme)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def plan_placement(
    config: AriaConfig,
    budget: int,
    *,
    context: int = DEFAULT_CONTEXT,
    scheme: str | Scheme | None = None,
    dtype: torch.dtype = torch.bfloat16,
    cpu_moe: bool = False,
    n_cpu_moe: int = 0,
    expert_slots: int | None = None,
    miss_policy: str = "auto",
    bandwidth: Bandwidths = Bandwidths(),
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    image_crops: int = DEFAULT_IMAGE_CROPS,
    quantized: tuple[str, ...] = QUANTIZED_FAMILIES,
    compiled: bool = False,
) -> Plan:
    """Decide where everything lives on a device with `budget` bytes (raises PlacementError if
    nothing fits, UsageError for flags out of range). `scheme` None = float weights in `dtype`;
    `quantized`: the families it packs (runtime.quant_targets); `compiled`: decode runs compiled,
    which with every expert resident means CUDA graphs (see graph_pool_bytes) where there is room
    for them (Plan.graph_bytes > 0)."""
    t = config.text
    n_layers, n_experts = t.num_hidden_layers, t.moe_num_experts
    _check_flags(t, budget, context, n_cpu_moe, expert_slots, miss_policy)
    scheme = resolve_scheme(scheme)
    label = scheme_label(scheme, dtype)
    n_host = n_layers if cpu_moe else n_cpu_moe
    n_gpu = n_layers - n_host
    footprint = _Footprint(config, dtype, quantized, prefill_chunk, image_crops, STREAM_BUFFERS if n_gpu else 0)
    weights, kv, work, slot = footprint.parts(scheme, context)
    fixed = weights.dense + kv + work

    def make(where_slots: list[tuple[str, int]], stream: int, graphs: int = 0) -> Plan:
        host = [LayerPlacement(i, HOST, 0) for i in range(n_host)]
        rest = [LayerPlacement(n_host + i, w, s) for i, (w, s) in enumerate(where_slots)]
        return Plan(label, dtype, context, budget, weights, kv, work, slot, stream, tuple(host + rest),
                    n_experts, t.moe_topk, min(context, prefill_chunk), miss_policy, bandwidth, graphs)

    all_resident = n_gpu * n_experts * weights.expert
    if expert_slots in (None, n_experts) and fixed + all_resident <= budget:
        # Compiled, the experts' graphs need room too; without it decode compiles without graphs,
        # still far better than offloading experts that fit.
        graphs = graph_pool_bytes(t, weights) if compiled and not n_host else 0
        return make([(DEVICE, n_experts)] * n_gpu, 0, graphs if fixed + graphs + all_resident <= budget else 0)
    stream = footprint.streams
    room = budget - fixed - stream * slot
    if room < 0:
        raise PlacementError(_too_small_message(footprint, budget, context, scheme, label, n_gpu, cpu_moe))
    if expert_slots is not None:
        need = expert_slots * slot * n_gpu
        if need > room:
            fit = room // (slot * n_gpu)
            raise PlacementError(
                f"--expert-slots {expert_slots} needs {human_size(fixed + stream * slot + need)} at {label} with "
                f"{context} tokens of context but the budget is {human_size(budget)}; at most {fit} slots per "
                "layer fit (or try --cpu-moe)"
            )
        per_layer = [expert_slots] * n_gpu
    else:
        total = room // slot
        per_layer = [min(n_experts, total // n_gpu + (1 if i < total % n_gpu else 0)) for i in range(n_gpu)]
    return make([(CACHE, s) for s in per_layer], stream)


def _check_flags(t: TextConfig, budget: int, context: int, n_cpu_moe: int, expert_slots: int | None,
                 miss_policy: str) -> None:
    if budget <= 0:
        raise UsageError("--gpu-memory must be more than 0")
    if not 1 <= context <= t.max_position_embeddings:
        raise UsageError(f"the context must be 1 to {t.max_position_embeddings} tokens, got {context}")
    if not 0 <= n_cpu_moe <= t.num_hidden_layers:
        raise UsageError(f"--n-cpu-moe must be 0 to {t.num_hidden_layers} (the model's layers), got {n_cpu_moe}")
    if expert_slots is not None and not 0 <= expert_slots <= t.moe_num_experts:
        raise UsageError(f"--expert-slots must be 0 to {t.moe_num_experts} (experts per layer), got {expert_slots}")
    if miss_policy not in MISS_POLICIES:
        raise UsageError(f"the miss policy must be one of {', '.join(MISS_POLICIES)}, got {miss_policy!r}")


@dataclass(frozen=True)
class _Footprint:
    """What the device bytes depend on besides the scheme and the context, so that the plan and a
    refusal's hints (another context, another scheme) count them one way."""

    config: AriaConfig
    dtype: torch.dtype
    quantized: tuple[str, ...]
    prefill_chunk: int
    image_crops: int
    streams: int  # expert copy buffers (none when every layer's experts are on the host)

    def parts(self, scheme: Scheme | None, context: int) -> tuple[WeightBytes, int, int, int]:
        """(weights, KV cache bytes, workspace bytes, bytes of one expert slot)."""
        weights = weight_bytes(self.config, scheme, self.dtype, self.quantized)
        kv = KVCache.bytes_needed(self.config.text, context, self.dtype)
        work = workspace_bytes(self.config, context, self.dtype, self.prefill_chunk, self.image_crops)
        slot = _round_up(weights.expert, SLOT_ALIGN) + SLOT_ALIGN * MAX_PAYLOAD_TENSORS
        return weights, kv, work + weights.dequant_scratch, slot

    def minimum(self, scheme: Scheme | None, context: int) -> int:
        """The least the device holds: dense weights, KV cache, workspace, copy buffers, no slot."""
        weights, kv, work, slot = self.parts(scheme, context)
        return weights.dense + kv + work + self.streams * slot

    def largest_context(self, budget: int, scheme: Scheme | None, context: int) -> int:
        """Largest multiple of 1024 tokens (below `context`) that fits with no expert slots, or 0."""
        best, n = 0, 1024
        while n < context and self.minimum(scheme, n) <= budget:
            best, n = n, n + 1024
        return best

    def smaller_scheme(self, budget: int, scheme: Scheme | None, context: int) -> list[str]:
        """"try --quant X" for the most precise smaller scheme that fits (with "--max-context N"
        where only a shorter context does); none for a checkpoint already quantized (its scheme
        is fixed)."""
        if self.config.quantization is not None:
            return []
        dense = self.parts(scheme, context)[0].dense
        smaller = []
        for name in ("int8", "int4"):
            try:
                if self.parts(get_scheme(name), context)[0].dense < dense:
                    smaller.append(get_scheme(name))
            except UsageError:  # a (test) model whose shapes the scheme cannot take
                pass
        for candidate in smaller:
            if self.minimum(candidate, context) <= budget:
                return [f"try --quant {candidate.name}"]
        for candidate in smaller:
            fits = self.largest_context(budget, candidate, context)
            if fits:
                return [f"try --quant {candidate.name} --max-context {fits}"]
        return []


def _too_small_message(footprint: _Footprint, budget: int, context: int, scheme: Scheme | None, label: str,
                       n_gpu: int, cpu_moe: bool) -> str:
    """One line: what the minimum is made of, and the nearest thing that would fit."""
    weights, kv, work, _ = footprint.parts(scheme, context)
    need = footprint.minimum(scheme, context)
    message = (f"Aria needs at least {human_size(need)} of GPU memory at {label} with {context} tokens of context "
               f"(weights {human_size(weights.dense)}, KV cache {human_size(kv)}, workspace {human_size(work)}) but the budget is "
               f"{human_size(budget)}")
    hints = []
    if n_gpu and not cpu_moe and weights.dense + kv + work <= budget:
        hints.append("try --cpu-moe")
    fits = footprint.largest_context(budget, scheme, context)
    if fits:
        hints.append(f"try --max-context {fits}")
    hints += footprint.smaller_scheme(budget, scheme, context)
    return message + ("; " + " or ".join(hints) if hints else f"; use a GPU with more memory, or {SEVERAL_GPUS}")


# Where a model that no single GPU here can hold still runs: vLLM implements Aria and splits the
# original checkpoint over several GPUs (the README's "Beyond one GPU"; the same OpenAI clients
# that talk to `aria serve` talk to it).
SEVERAL_GPUS = ("several GPUs with vLLM: vllm serve rhymes-ai/Aria --tokenizer-mode slow --trust-remote-code "
                "--tensor-parallel-size 2 (see the README, Beyond one GPU)")


def card_plans(
    config: AriaConfig,
    cards_gib: tuple[int, ...] = CARD_SIZES_GIB,
    schemes: tuple[str, ...] = ("bf16", "int8", "int4"),
    **options,
) -> list[tuple[int, str, Plan | PlacementError]]:
    """A plan (or the reason there is none) for each card size and scheme, for `aria plan`'s overview."""
    results: list[tuple[int, str, Plan | PlacementError]] = []
    for card in cards_gib:
        for name in schemes:
            try:
                results.append((card, name, plan_placement(config, card * 2**30, scheme=name, **options)))
            except PlacementError as exc:
                results.append((card, name, exc))
    return results
