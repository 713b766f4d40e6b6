"""config.json of the published Aria checkpoints, so `aria plan` and byte counts need no download.

Values are those of rhymes-ai/Aria (ARIA_SPEC §1); keys as the hub-main (transformers-native)
config.json spells them. Loading a real checkpoint always reads its own config.json instead.
"""

from __future__ import annotations

import copy
from typing import Any

ARIA_HUB_CONFIG: dict[str, Any] = {
    "architectures": ["AriaForConditionalGeneration"],
    "model_type": "aria",
    "image_token_index": 9,
    "pad_token_id": 2,
    "projector_patch_to_query_dict": {"1225": 128, "4900": 256},
    "vision_feature_layer": -1,
    "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "aria_text",
        "vocab_size": 100352,
        "hidden_size": 2560,
        "intermediate_size": 1664,
        "num_hidden_layers": 28,
        "num_attention_heads": 20,
        "num_key_value_heads": 20,
        "max_position_embeddings": 65536,
        "moe_num_experts": 64,
        "moe_topk": 6,
        "moe_num_shared_experts": 2,
        "rope_theta": 5000000,
        "rms_norm_eps": 1e-06,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    },
    "vision_config": {
        "model_type": "idefics3_vision",
        "image_size": 980,
        "patch_size": 14,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "attention_heads": 16,  # a key the reference ignores; the class default (16) applies
    },
}

# Hub repos whose config matches ARIA_HUB_CONFIG in every dimension.
KNOWN_REPOS = ("rhymes-ai/Aria", "rhymes-ai/Aria-sequential_mlp", "rhymes-ai/Aria-Chat")


def aria_config_dict() -> dict[str, Any]:
    return copy.deepcopy(ARIA_HUB_CONFIG)
