"""Accuracy of the demo model on held-out shapes questions, for each way the runtime can load it.

    python scripts/eval_demo.py                          # every load option, 500 questions each
    python scripts/eval_demo.py --only float32 bfloat16 --questions 200
    python scripts/eval_demo.py --model /tmp/demo --json results.json

Each question goes through the same path as `aria ask --model demo PICTURE QUESTION`
(runtime.assistant: chat template, 980-pixel preprocessing, greedy generation up to <|im_end|>);
an answer counts when it equals the task's answer exactly. The held-out questions start at index
HELDOUT_START of the "heldout" split, which training never sees (its progress lines use indices
below 256 of that split, and only for printing).

A load option is one entry of LOAD_OPTIONS: keyword arguments for `Assistant.open` (dtype,
quant) or a placement plan, built from the model's config, that offloads routed experts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from runtime.assistant import Assistant
from runtime.config import load_config
from runtime.demo import DEMO_MODEL_DIR, answer_demo
from runtime.placement import plan_placement
from runtime.shapes_task import QUESTION_KINDS, example

HELDOUT_START = 10_000


def offload_plan(model_dir: Path):
    """Layer 0's experts computed on the host, the other layers with 2 of 8 expert slots each
    ("device" is the CPU here; the expert cache, its misses and the host path are all real)."""
    return plan_placement(load_config(model_dir), 2**30, context=1024, dtype=torch.float32, n_cpu_moe=1,
                          expert_slots=2)


# name -> (description, keyword arguments for Assistant.open; a callable gets the model directory)
LOAD_OPTIONS = {
    "float32": ("float32 weights and compute", {"dtype": torch.float32}),
    "bfloat16": ("bfloat16 weights and compute", {"dtype": torch.bfloat16}),
    "int8": ("int8 per-channel routed experts and linears, float32 compute", {"dtype": torch.float32, "quant": "int8"}),
    "int4": ("int4 group-affine, float32 compute", {"dtype": torch.float32, "quant": "int4"}),
    "nf4": ("nf4, float32 compute", {"dtype": torch.float32, "quant": "nf4"}),
    "offload": ("float32, experts offloaded (layer 0 on host, 2 slots per other layer)",
                {"dtype": torch.float32, "plan": offload_plan}),
}


def heldout(n: int) -> list:
    return [example("heldout", HELDOUT_START + i) for i in range(n)]


def evaluate(model_dir: Path, name: str, examples: list, pictures: list) -> dict:
    _, kwargs = LOAD_OPTIONS[name]
    kwargs = {k: (v(model_dir) if callable(v) else v) for k, v in kwargs.items()}
    started = time.perf_counter()
    assistant = Assistant.open(model_dir, device="cpu", name=f"demo-{name}", **kwargs)
    answers, right, per_kind = [], 0, Counter()
    for ex, picture in zip(examples, pictures):
        answer = answer_demo(picture, ex.question, assistant=assistant)
        answers.append(answer)
        if answer == ex.answer:
            right += 1
            per_kind[ex.kind] += 1
    asked = Counter(ex.kind for ex in examples)
    return {
        "option": name,
        "accuracy": right / len(examples),
        "per_kind": {k: per_kind[k] / asked[k] for k in QUESTION_KINDS if asked[k]},
        "seconds": time.perf_counter() - started,
        "answers": answers,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO_MODEL_DIR), help="demo checkpoint directory")
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--only", nargs="+", choices=list(LOAD_OPTIONS), help="load options to run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write every answer and score to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    examples = heldout(args.questions)
    pictures = [ex.image() for ex in examples]
    results = []
    print(f"{args.questions} held-out questions, model {model_dir}")
    print(f"{'option':<10} {'accuracy':>8} {'same as f32':>11} {'seconds':>8}  per question kind")
    for name in args.only or list(LOAD_OPTIONS):
        result = evaluate(model_dir, name, examples, pictures)
        if results and results[0]["option"] == "float32":
            same = sum(a == b for a, b in zip(result["answers"], results[0]["answers"])) / len(examples)
            result["same_as_float32"] = same
        results.append(result)
        kinds = "  ".join(f"{k} {v:.3f}" for k, v in result["per_kind"].items())
        same = f"{result['same_as_float32']:.3f}" if "same_as_float32" in result else "-"
        print(f"{name:<10} {result['accuracy']:>8.3f} {same:>11} {result['seconds']:>8.1f}  {kinds}", flush=True)
    if args.json:
        truth = [{"question": ex.question, "answer": ex.answer, "kind": ex.kind} for ex in examples]
        Path(args.json).write_text(json.dumps({"questions": truth, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
