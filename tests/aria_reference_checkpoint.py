"""A tiny Aria saved by transformers itself: the ground truth for hub (c1) key names and shapes.

The sizes mirror runtime.tiny_checkpoint.tiny_config() but are written out here by hand, so the
oracle does not depend on our config code.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

TINY_HF_CONFIG = {
    "text_config": {
        "model_type": "aria_text", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 512, "moe_num_experts": 8, "moe_topk": 2, "intermediate_size": 32,
        "moe_num_shared_experts": 2, "max_position_embeddings": 1024,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e6},
    },
    "vision_config": {
        "model_type": "idefics3_vision", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 48, "image_size": 980, "patch_size": 70,
    },
    "projector_patch_to_query_dict": {49: 8, 196: 16},
    "image_token_index": 9,
}


def save_reference(out_dir, seed: int = 0):
    """transformers' tiny AriaForConditionalGeneration with random weights, save_pretrained'ed."""
    from transformers import AriaConfig, AriaForConditionalGeneration

    torch.manual_seed(seed)
    model = AriaForConditionalGeneration(AriaConfig(**TINY_HF_CONFIG)).eval()
    model.save_pretrained(out_dir)
    return model


def canonical_from_saved(out_dir) -> dict[str, torch.Tensor]:
    """Canonical weights = the saved c1 file without the vision post_layernorm (ARIA_SPEC §3.4)."""
    saved = load_file(f"{out_dir}/model.safetensors")
    return {k: v for k, v in saved.items() if not k.startswith("vision_tower.post_layernorm.")}
