"""A tiny model that never says a stop token, so it talks until it is stopped (Ctrl-C, a client
that leaves, a stop signal): for tests of cutting an answer short."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from runtime.tiny_checkpoint import write_tiny_checkpoint


def write_endless_checkpoint(folder: Path) -> Path:
    path = write_tiny_checkpoint(folder, seed=5)
    weights = load_file(path / "model.safetensors")
    head = weights["language_model.lm_head.weight"].clone()
    head[[2, 11]] = 0  # the output rows of eos and <|im_end|> (the tiny tokenizer's stop ids): never chosen
    weights["language_model.lm_head.weight"] = head
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path
