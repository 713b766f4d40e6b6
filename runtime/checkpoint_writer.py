"""Write canonical Aria weights as a checkpoint directory in any layout, with its config files.

The config.json follows the flavour that layout has on the Hub, so other tools read our output
the way they read the real thing:
- layouts a and b (remote code): `model_type aria`, text `aria_moe_lm` whose real expert width is
  `moe_intermediate_size` next to a stale, different `intermediate_size` (pitfall P1), vision
  `aria_vision_model` with every key spelled out (its class defaults are not Aria's);
- layouts c1, c2, c3 (transformers-native): text `aria_text` with `intermediate_size` = expert
  width and `rope_parameters`, vision `idefics3_vision`; the weights include the all-zero vision
  `post_layernorm` these checkpoints carry.
`runtime.config.load_config` reads either back to the same AriaConfig (flavour aside).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint_layouts import get_layout, is_canonical
from .config import AriaConfig
from .safetensors_io import ShardedWriter, write_json_atomic

ORIGINAL_LAYOUTS = ("a", "b")
# What the remote-code configs on the Hub carry as `intermediate_size` (unused by the model).
_STALE_INTERMEDIATE_SIZE = 13568

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def flavour_of(layout: str) -> str:
    get_layout(layout)
    return "original" if layout in ORIGINAL_LAYOUTS else "hub"


def config_to_json(config: AriaConfig, flavour: str, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The config.json dict of `config` in the "original" (remote code) or "hub" flavour."""
    if flavour not in ("original", "hub"):
        raise ValueError(f"unknown config flavour '{flavour}'")
    t, v = config.text, config.vision
    dtype_name = _DTYPE_NAMES.get(dtype, "bfloat16")
    text: dict[str, Any] = {
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "moe_num_experts": t.moe_num_experts,
        "moe_topk": t.moe_topk,
        "moe_num_shared_experts": t.moe_num_shared_experts,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
    }
    vision: dict[str, Any] = {
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "layer_norm_eps": v.layer_norm_eps,
        "num_channels": v.num_channels,
        "hidden_act": "gelu_pytorch_tanh",
    }
    top: dict[str, Any] = {"architectures": ["AriaForConditionalGeneration"], "model_type": "aria"}
    if flavour == "original":
        stale = _STALE_INTERMEDIATE_SIZE
        if stale == t.moe_intermediate_size:
            stale *= 2  # must differ, or the file would not exercise P1
        text.update(
            model_type="aria_moe_lm",
            intermediate_size=stale,
            moe_intermediate_size=t.moe_intermediate_size,
            num_experts_per_tok=t.moe_topk,
            rope_theta=t.rope_theta,
            torch_dtype=dtype_name,
        )
        vision.update(model_type="aria_vision_model", torch_dtype=dtype_name)
        top["auto_map"] = {
            "AutoConfig": "configuration_aria.AriaConfig",
            "AutoModelForCausalLM": "modeling_aria.AriaForConditionalGeneration",
        }
    else:
        text.update(
            model_type="aria_text",
            intermediate_size=t.moe_intermediate_size,
            rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        )
        vision.update(model_type="idefics3_vision")
        top["vision_feature_layer"] = -1
    top.update(
        text_config=dict(sorted(text.items())),
        vision_config=dict(sorted(vision.items())),
        projector_patch_to_query_dict={str(k): q for k, q in config.patch_to_query.items()},
        image_token_index=config.image_token_index,
        pad_token_id=t.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype=dtype_name,
    )
    if config.quantization is not None:
        top["quantization"] = dict(config.quantization)
    return top


def generation_config_json(config: AriaConfig) -> dict[str, Any]:
    t = config.text
    return {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id}


def layout_tensors(
    canonical: Iterable[tuple[str, torch.Tensor]], config: AriaConfig, layout: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename (and for layout b split) canonical tensors into `layout`'s stored keys, lazily."""
    spec = get_layout(layout)
    post_ln_dtype = None
    for name, tensor in canonical:
        if not is_canonical(name):
            raise ValueError(f"'{name}' is not a canonical Aria weight name")
        if name.startswith("vision_tower."):
            post_ln_dtype = tensor.dtype
        split = spec.split_for(name)
        if split is None:
            yield spec.from_canonical(name), tensor
            continue
        layer = split.canonical.match(name)["L"]
        for part, weights in zip(split.parts, split.split(tensor)):
            for e, weight in enumerate(weights):
                yield part.format(L=layer, e=e), weight
    if spec.zero_post_layernorm:
        zeros = torch.zeros(config.vision.hidden_size, dtype=post_ln_dtype or torch.float32)
        yield f"{spec.zero_post_layernorm}.weight", zeros
        yield f"{spec.zero_post_layernorm}.bias", zeros.clone()


def write_checkpoint(
    out_dir: str | Path,
    canonical_state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    config: AriaConfig,
    layout: str = "c1",
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write weights (canonical names) + config.json + generation_config.json to `out_dir`.

    `dtype` converts floating-point tensors (None = keep). `max_shard_bytes` None writes one
    `model.safetensors`; otherwise shards of at most that size (a bigger tensor alone) + index.
    """
    out_dir = Path(out_dir)
    items = canonical_state_dict.items() if isinstance(canonical_state_dict, Mapping) else canonical_state_dict
    first_dtype: list[torch.dtype] = []

    def converted() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in items:
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if not first_dtype and tensor.is_floating_point():
                first_dtype.append(tensor.dtype)
            yield name, tensor

    with ShardedWriter(out_dir, max_shard_bytes, overwrite=overwrite) as writer:
        for key, tensor in layout_tensors(converted(), config, layout):
            writer.add(key, tensor)
        stored_dtype = first_dtype[0] if first_dtype else torch.bfloat16
        # Configs before the weights' final names: the weights (index last) mark completion.
        write_json_atomic(out_dir / "config.json", config_to_json(config, flavour_of(layout), stored_dtype))
        write_json_atomic(out_dir / "generation_config.json", generation_config_json(config))
        writer.close()
    return out_dir
