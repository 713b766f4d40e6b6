"""Generation speed, side by side: our runtime vs transformers' AriaForConditionalGeneration.generate.

    python bench/generation_speed.py                      # mid-size random Aria, CPU
    python bench/generation_speed.py --config demo        # demo-model size: per-step overhead dominates
    python bench/generation_speed.py --checkpoint runtime/demo_model --dtypes bfloat16   # a real checkpoint
    python bench/generation_speed.py --dtypes float32 --rounds 3 --compile   # adds compiled-decode rows

One random checkpoint (hub layout, float32) is written once; every row loads it in its own fresh
subprocess (peak RSS is per process, and Linux carries ru_maxrss across fork/exec, so this parent
imports nothing heavy). Each row: batch 1, a prompt of `--prompt-tokens` text tokens around one
image, `--new-tokens` greedy tokens, one warm-up generation (pages the mmap'd weights in, builds
kernels, compiles) then `--repeats` timed ones. The whole list of rows runs `--rounds` times,
interleaved, and each figure keeps its best round: the machine is shared, so noise only ever
slows a run down. Before each row the parent waits (up to --quiet-wait s) for the CPUs to be idle.

Figures: time to first token (prefill incl. vision tower + first sample), prefill tokens/s (prompt
tokens / TTFT), decode tokens/s (the other tokens / their time), peak RSS; for float rows also the
"roofline": a plain loop of matmuls over exactly the weights one decoded token reads (the active
experts of each layer drawn at random every pass, as routing does), same dtype, nothing else.
int8/int4 rows quantize while loading (runtime.loader `quant=`), computing in `--quant-dtype`;
a "+head" row (`--quant int4 int4+head`) quantizes the lm_head too (`--quant-lm-head`).
Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Aria's shape, shrunk: hidden 1024, 8 layers, 32 experts top-6, 32000 vocabulary; a vision tower
# whose 980-pixel crop gives 784 patches -> 64 image tokens.
CONFIGS = {
    "mid": {
        "hidden_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 8, "num_hidden_layers": 8,
        "vocab_size": 32000,
        "moe_intermediate_size": 512, "moe_num_experts": 32, "moe_topk": 6, "max_position_embeddings": 4096,
        "vision_hidden_size": 384, "vision_intermediate_size": 1536, "vision_num_attention_heads": 6,
        "vision_num_hidden_layers": 6, "vision_patch_size": 35, "patch_to_query": {784: 64, 196: 32},
    },
    # The size of the demo model shipped in runtime/demo_model (random weights here).
    "demo": {
        "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 3,
        "vocab_size": 400, "moe_intermediate_size": 128, "moe_num_experts": 8, "moe_topk": 2,
        "max_position_embeddings": 4096, "vision_hidden_size": 96, "vision_intermediate_size": 192,
        "vision_num_attention_heads": 3, "vision_num_hidden_layers": 2,
    },
    "tiny": {},  # runtime.tiny_checkpoint's test model as it is
}
TARGETS = "decode >= 75% of roofline; vs reference: decode >= 1.5x (demo: 3x), prefill >= 1x, TTFT and RSS <= 1x"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _memory(device: str, baseline: float) -> dict:
    import torch

    out = {"peak_rss_mb": _peak_rss_mb(), "baseline_rss_mb": baseline}
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


class Clock:
    """Seconds between marks, on the host's clock.

    On a GPU too: the host reads every generated token (waiting for it), so between token marks
    the host clock sees what the user sees. A CUDA event recorded after our first token would
    also hold the decode step queued ahead of that read, charging it to the time to first token.
    `mark(sync=True)` first waits for the device's queued work (the start, and the end of a bare
    loop of products that reads nothing back).

    kind "thread": CPU time of the calling thread, with torch on one thread. On a machine shared
    with other work, wall time measures the neighbours; one thread's CPU time measures our work.
    """

    def __init__(self, device: str, kind: str = "wall"):
        import torch

        self.device = device
        self.cuda = device.startswith("cuda")
        self.torch = torch
        self.now = time.thread_time if kind == "thread" else time.perf_counter
        if kind == "thread":
            torch.set_num_threads(1)

    def mark(self, sync: bool = False) -> float:
        if sync and self.cuda:
            self.torch.cuda.synchronize(self.device)
        return self.now()

    @staticmethod
    def seconds(a: float, b: float) -> float:
        return b - a


# ----- worker side ---------------------------------------------------------------------------------


def bench_inputs(config, text_tokens: int, device: str = "cpu"):
    """Prompt ids (text | one 980 crop's image tokens | text), its pixels and mask; seeded."""
    import torch

    gen = torch.Generator().manual_seed(0)
    head = torch.randint(10, config.text.vocab_size, (text_tokens // 2,), generator=gen).tolist()
    tail = torch.randint(10, config.text.vocab_size, (text_tokens - len(head),), generator=gen).tolist()
    size = config.vision.image_size
    ids = head + [config.image_token_index] * config.tokens_per_crop(size) + tail
    pixels = (torch.rand(1, 3, size, size, generator=gen) * 2 - 1).to(device)
    mask = torch.ones(1, size, size, dtype=torch.bool, device=device)
    return ids, pixels, mask


def _summary(runs, n_prompt: int) -> dict:
    """runs: (ttft_s, rest_s, tokens) of the timed generations -> best figures."""
    ttft = min(r[0] for r in runs)
    decode = max((len(r[2]) - 1) / r[1] for r in runs)
    return {"ttft_ms": 1000 * ttft, "prefill_tps": n_prompt / ttft, "decode_tps": decode, "tokens": runs[-1][2]}


def worker_ours(args) -> dict:
    import torch

    from runtime.generate import Session
    from runtime.loader import load_model

    baseline = _peak_rss_mb()
    dtype = getattr(torch, args.quant_dtype if args.quant else args.dtype)
    started = time.perf_counter()
    scheme, _, head = (args.quant or "").partition("+")  # "int4+head": the lm_head quantized too
    model = load_model(args.ckpt, dtype=dtype, device=args.device, quant=scheme or None, quant_lm_head=bool(head))
    load_s = time.perf_counter() - started
    ids, pixels, mask = bench_inputs(model.config, args.prompt_tokens, args.device)
    session = Session(model, len(ids) + args.new_tokens + 1, compile=args.compile)
    clock = Clock(args.device, args.clock)
    runs = []
    for _ in range(args.repeats + 1):
        session.reset()
        t0 = clock.mark(sync=True)
        tokens = session.generate(ids, pixels.to(model.vision_dtype), mask, max_new_tokens=args.new_tokens)
        first = [next(tokens)]
        t1 = clock.mark()
        rest = list(tokens)
        t2 = clock.mark()
        runs.append((clock.seconds(t0, t1), clock.seconds(t1, t2), first + rest))
    out = _summary(runs[1:], len(ids))
    out.update(_memory(args.device, baseline), load_s=load_s, compile_s=session.compile_seconds)
    if args.compile:
        from torch._dynamo.utils import counters

        # Inductor drops CUDA graphs with only a log line when something in the step cannot be captured.
        out["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
        out["cuda_graphs"] = session.cuda_graphs
    if not args.quant:
        out.update(roofline(model, clock, args.repeats))
    return out


def roofline(model, clock, repeats: int) -> dict:
    """Best time of a plain loop of products over one decoded token's active weights.

    Two plain loops, and the faster counts: gemm (F.linear, x @ W, as stored) and gemv (torch.mv
    on the [out, in] view of each weight, which is contiguous for nn.Linear and for re-laid experts;
    small bf16 weights on PyTorch's own kernel rather than oneDNN, see runtime.decode_kernels).
    """
    import torch
    import torch.nn.functional as F

    from runtime.decode_kernels import gemv

    lm = model.language_model
    linears, experts = [lm.lm_head.weight], []
    for layer in lm.model.layers:
        attn, moe = layer.self_attn, layer.mlp
        linears += [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
                    moe.router.weight, moe.shared_experts.gate_proj.weight, moe.shared_experts.up_proj.weight,
                    moe.shared_experts.down_proj.weight]
        experts.append((moe.experts.fc1.weight, moe.experts.fc2.weight))
    k = lm.model.config.moe_topk
    dims = {w.shape[1] for w in linears} | {w.shape[1] for pair in experts for w in pair}
    vec = {d: torch.randn(1, d, dtype=model.dtype, device=model.device) for d in dims}
    gen = torch.Generator().manual_seed(1)
    nbytes = sum(w.numel() * w.element_size() for w in linears)
    nbytes += sum(k * (a[0].numel() * a.element_size() + b[0].numel() * b.element_size()) for a, b in experts)

    def gemm_token():
        for w in linears:
            F.linear(vec[w.shape[1]], w)
        for fc1, fc2 in experts:
            for e in torch.randperm(fc1.shape[0], generator=gen)[:k].tolist():
                vec[fc1.shape[1]] @ fc1[e]
                vec[fc2.shape[1]] @ fc2[e]

    def gemv_token():
        for w in linears:
            gemv(w, vec[w.shape[1]][0])
        for fc1, fc2 in experts:
            for e in torch.randperm(fc1.shape[0], generator=gen)[:k].tolist():
                gemv(fc1[e].T, vec[fc1.shape[1]][0])
                gemv(fc2[e].T, vec[fc2.shape[1]][0])

    best = {"gemm": float("inf"), "gemv": float("inf")}
    with torch.inference_mode():
        for _ in range(2 + 3 * repeats):
            for name, one_token in (("gemm", gemm_token), ("gemv", gemv_token)):
                t0 = clock.mark(sync=True)
                for _ in range(8):
                    one_token()
                t1 = clock.mark(sync=True)
                best[name] = min(best[name], clock.seconds(t0, t1) / 8)
    kind = min(best, key=best.get)
    return {"roofline_tps": 1 / best[kind], "active_mb": nbytes / 2**20, "roofline_gbps": nbytes / best[kind] / 1e9,
            "roofline_kind": kind}


class _Stamps:
    """A transformers streamer that only notes when each put() arrives (the first is the prompt)."""

    def __init__(self, clock):
        self.clock, self.marks, self.tokens = clock, [], []

    def put(self, value):
        ids = value.view(-1).tolist()  # on a GPU this waits for the token: it exists when marked
        self.marks.append(self.clock.mark())
        if len(self.marks) > 1:
            self.tokens += ids

    def end(self):
        pass


def worker_reference(args) -> dict:
    import torch
    from transformers import AriaForConditionalGeneration

    from runtime.config import load_config

    baseline = _peak_rss_mb()
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    model = AriaForConditionalGeneration.from_pretrained(args.ckpt, dtype=dtype).to(args.device).eval()
    load_s = time.perf_counter() - started
    model.generation_config.eos_token_id = None  # exactly --new-tokens tokens, like ours
    ids, pixels, mask = bench_inputs(load_config(args.ckpt), args.prompt_tokens, args.device)
    input_ids = torch.tensor([ids], device=args.device)
    clock = Clock(args.device, args.clock)
    runs = []
    for _ in range(args.repeats + 1):
        stamps = _Stamps(clock)
        t0 = clock.mark(sync=True)
        with torch.inference_mode():
            model.generate(input_ids=input_ids, pixel_values=pixels.to(dtype), pixel_mask=mask,
                           max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0, streamer=stamps)
        t2 = clock.mark()
        t1 = stamps.marks[1]
        runs.append((clock.seconds(t0, t1), clock.seconds(t1, t2), stamps.tokens))
    out = _summary(runs[1:], len(ids))
    out.update(_memory(args.device, baseline), load_s=load_s)
    return out


def write_checkpoint(path: str, config_name: str) -> None:
    from runtime.tiny_checkpoint import tiny_config, write_tiny_checkpoint

    write_tiny_checkpoint(path, "c1", seed=0, config=tiny_config(**CONFIGS[config_name]))


# ----- parent side ---------------------------------------------------------------------------------


def _cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over `seconds` (from /proc/stat), to spot other people's work."""

    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def _wait_for_quiet(max_wait: float) -> float:
    """Wait (up to max_wait s) until the CPUs are nearly idle; return the busy share seen last."""
    deadline = time.monotonic() + max_wait
    busy = _cpu_busy_fraction()
    while busy > 0.1 and time.monotonic() < deadline:
        busy = _cpu_busy_fraction(2.0)
    return busy


def _run_worker(args, ckpt: str, runtime: str, dtype: str, quant: str | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", runtime, "--ckpt", ckpt, "--dtype", dtype,
           "--quant-dtype", args.quant_dtype, "--device", args.device, "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--clock", args.clock]
    if quant:
        cmd += ["--worker-quant", quant]
    if runtime == "compiled":
        cmd[cmd.index("--worker") + 1] = "ours"
        cmd += ["--compile"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _merge(best: dict | None, new: dict) -> dict:
    if best is None or "error" in best:
        return new
    if "error" in new:
        return best
    for key, pick in (("ttft_ms", min), ("prefill_tps", max), ("decode_tps", max), ("roofline_tps", max),
                      ("roofline_gbps", max), ("peak_rss_mb", min), ("peak_gpu_mb", min), ("compile_s", min)):
        if key in new:
            best[key] = pick(best[key], new[key])
    best["tokens_vary"] = best.get("tokens_vary", False) or best["tokens"] != new["tokens"]
    return best


def _same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _report(rows: dict, args) -> None:
    clock = "wall time" if args.clock == "wall" else "CPU time of one thread"
    print(f"\nconfig {args.config}, batch 1, {args.prompt_tokens} text tokens + image, {args.new_tokens} new tokens, "
          f"best of {args.rounds} rounds x {args.repeats} runs, device {args.device}, {clock}")
    head = f"{'runtime':<10}{'weights':<10}{'TTFT ms':>9}{'prefill t/s':>13}{'decode t/s':>12}{'peak RSS MB':>13}" \
           f"{'roofline t/s':>14}{'of roofline':>13}{'compile s':>11}"
    print(head)
    print("-" * len(head))
    for (runtime, weights), r in rows.items():
        if "error" in r:
            print(f"{runtime:<10}{weights:<10}  failed: {r['error']}")
            continue
        roof, comp = r.get("roofline_tps"), r.get("compile_s")
        share = f"{r['decode_tps'] / roof:.0%}" if roof else "-"
        print(f"{runtime:<10}{weights:<10}{r['ttft_ms']:>9.0f}{r['prefill_tps']:>13.0f}{r['decode_tps']:>12.1f}"
              f"{r['peak_rss_mb']:>13.0f}{f'{roof:.1f}' if roof else '-':>14}{share:>13}"
              f"{f'{comp:.1f}' if comp else '-':>11}"
              + (f"   GPU peak {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else ""))
    print(f"\nratios ours / reference (targets: {TARGETS})")
    for dtype in args.dtypes:
        ours, ref = rows.get(("ours", dtype)), rows.get(("reference", dtype))
        if not ours or not ref or "error" in ours or "error" in ref:
            continue
        same, n = _same_prefix(ours["tokens"], ref["tokens"]), len(ref["tokens"])
        agree = "same" if same == n else f"first {same} of {n} same"
        ref32 = rows.get(("reference", "float32"))
        if same < n and dtype != "float32" and ref32 and "error" not in ref32:
            # How far a reduced precision carries greedy decoding of random weights at all.
            agree += f" (the reference's own {dtype} vs float32: first {_same_prefix(ref['tokens'], ref32['tokens'])})"
        print(f"  {dtype:<9} decode x{ours['decode_tps'] / ref['decode_tps']:.2f}   "
              f"prefill x{ours['prefill_tps'] / ref['prefill_tps']:.2f}   "
              f"TTFT x{ours['ttft_ms'] / ref['ttft_ms']:.2f}   peak RSS x{ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}   "
              f"greedy tokens: {agree}")
        print(f"  {'':<9} roofline: {ours['active_mb']:.1f} MB of weights per token at "
              f"{ours['roofline_gbps']:.1f} GB/s ({ours['roofline_kind']} loop)")
        compiled = rows.get(("compiled", dtype))
        if compiled and "error" not in compiled:
            print(f"  {'':<9} compiled decode x{compiled['decode_tps'] / ref['decode_tps']:.2f} of the reference "
                  f"(compile {compiled['compile_s']:.1f} s, once per session{_graph_note(compiled, args)})")
    bf16 = rows.get(("ours", "bfloat16"))
    for quant in args.quant:
        q = rows.get(("ours", quant))
        if q and "error" not in q and bf16 and "error" not in bf16:
            print(f"  {quant} decode / our bfloat16 decode: x{q['decode_tps'] / bf16['decode_tps']:.2f} (int4 target >= 2)")
        compiled = rows.get(("compiled", quant))
        if q and "error" not in q and compiled and "error" not in compiled:
            print(f"  {quant} compiled decode / eager: x{compiled['decode_tps'] / q['decode_tps']:.2f} "
                  f"(compile {compiled['compile_s']:.1f} s{_graph_note(compiled, args)})")
    if not args.quant:
        print("  (no int8/int4 rows: pass --quant int8 int4)")


def _graph_note(row: dict, args) -> str:
    if not args.device.startswith("cuda"):
        return ""
    if not row.get("cuda_graphs"):
        return "; no CUDA graphs (the model or its placement did not allow them)"
    skips = row.get("cudagraph_skips", 0)
    return f"; CUDA graphs skipped {skips} time(s): see TORCH_LOGS=perf_hints" if skips else "; in CUDA graphs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    parser.add_argument("--checkpoint", help="bench this checkpoint directory instead of a random --config one")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--quant", nargs="*", default=["int8", "int4"],
                        help="quantized rows of ours, e.g. int8 int4 int4+head (none: empty)")
    parser.add_argument("--quant-dtype", default="bfloat16", help="compute dtype of the quantized rows")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="thread: one torch thread, timed by its CPU time (robust on a shared machine)")
    parser.add_argument("--compile", action="store_true", help="add rows of ours with compiled decode")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="before each row wait up to this many seconds for other work to leave the CPUs "
                             "(default 120 with --clock wall, 0 with --clock thread)")
    parser.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--worker-quant", help=argparse.SUPPRESS)
    parser.add_argument("--write-checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "ours":
            args.quant = args.worker_quant
            print(json.dumps(worker_ours(args)))
        else:
            print(json.dumps(worker_reference(args)))
        return
    if args.write_checkpoint:
        write_checkpoint(args.write_checkpoint, args.config)
        return

    if args.quiet_wait is None:
        args.quiet_wait = 120.0 if args.clock == "wall" else 0.0
    jobs = [("ours", d, None) for d in args.dtypes]
    jobs += [("compiled", d, None) for d in args.dtypes] if args.compile else []
    jobs += [] if args.no_reference else [("reference", d, None) for d in args.dtypes]
    jobs += [("ours", q, q) for q in args.quant]
    jobs += [("compiled", q, q) for q in args.quant] if args.compile else []
    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            tmp = str(Path(args.checkpoint).resolve())
            args.config = tmp
        else:
            subprocess.run([sys.executable, __file__, "--config", args.config, "--write-checkpoint", tmp],
                           check=True, cwd=REPO)
        for rnd in range(args.rounds):
            for runtime, weights, quant in jobs:
                busy = _wait_for_quiet(args.quiet_wait) if args.quiet_wait else None
                result = _run_worker(args, tmp, runtime, weights if not quant else args.quant_dtype, quant)
                rows[(runtime, weights)] = _merge(rows.get((runtime, weights)), result)
                shown = "failed" if "error" in result else f"decode {result['decode_tps']:.1f} t/s, TTFT {result['ttft_ms']:.0f} ms"
                noise = "" if busy is None else f" (CPUs {busy:.0%} busy before)"
                print(f"round {rnd + 1}: {runtime} {weights}: {shown}{noise}", file=sys.stderr, flush=True)
    _report(rows, args)


if __name__ == "__main__":
    main()
