"""Aria configuration, parsed from a checkpoint's config.json in every flavour that exists.

Flavours (ARIA_SPEC §1, §3, pitfall P1):
- original remote code: `model_type: aria`, text `aria_moe_lm` with `moe_intermediate_size` (the
  real expert width) next to a stale `intermediate_size` (13568), vision `aria_vision_model`
  (a SiglipVisionConfig), `rope_theta` at the top of the text config;
- hub main / transformers: text `aria_text` whose `intermediate_size` is the expert width, vision
  `idefics3_vision`, rope as `rope_theta` or `rope_parameters: {rope_theta: ...}`.

Unknown keys are ignored. A missing required key raises ConfigError naming it, and so does a
value of the wrong kind (sizes and counts are positive integers, epsilons and theta positive
numbers): a broken config.json fails here, in one line, not as a crash or a misleading message
far from it. Missing optional keys take the defaults of the reference class of that flavour, so
both read the same model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# Defaults of the reference vision config classes, keyed by vision model_type.
_SIGLIP_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6, "num_channels": 3,
}
_IDEFICS3_VISION_DEFAULTS = {
    "hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 16,
    "image_size": 224, "patch_size": 32, "layer_norm_eps": 1e-6, "num_channels": 3,
}
_VISION_DEFAULTS = {
    "idefics3_vision": _IDEFICS3_VISION_DEFAULTS,
    "aria_vision_model": _SIGLIP_VISION_DEFAULTS,
    "siglip_vision_model": _SIGLIP_VISION_DEFAULTS,
}
_DEFAULT_ROPE_THETA = 10_000.0  # what the reference uses when a config names no theta


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    moe_intermediate_size: int  # width of one routed expert (1664 in Aria)
    moe_num_experts: int
    moe_topk: int
    moe_num_shared_experts: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = _DEFAULT_ROPE_THETA
    max_position_embeddings: int = 65536
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 2

    @property
    def shared_intermediate_size(self) -> int:
        # The "2 shared experts" are one MLP of twice the expert width (ARIA_SPEC §2.5 step 6).
        return self.moe_intermediate_size * self.moe_num_shared_experts


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 980
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class AriaConfig:
    text: TextConfig
    vision: VisionConfig
    # Number of vision patches of one crop -> number of projector queries (image tokens) for it.
    patch_to_query: dict[int, int] = field(default_factory=lambda: {1225: 128, 4900: 256})
    image_token_index: int = 9
    flavour: str = "hub"  # "original" (remote code) or "hub" (transformers-native)
    # Present in checkpoints written by `aria quantize`: the scheme's metadata (scheme name,
    # group/block size) and which module families are quantized. None for float checkpoints.
    quantization: dict[str, Any] | None = None

    @property
    def max_queries(self) -> int:
        return max(self.patch_to_query.values())

    def tokens_per_crop(self, crop_size: int) -> int:
        """Image tokens one crop of `crop_size` pixels becomes (256 for 980, 128 for 490 in Aria)."""
        patches = (crop_size // self.vision.patch_size) ** 2
        if patches not in self.patch_to_query:
            sizes = sorted(round(p**0.5) * self.vision.patch_size for p in self.patch_to_query)
            raise ConfigError(
                f"crop size {crop_size} is not supported by this model; use one of {sizes}"
            )
        return self.patch_to_query[patches]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AriaConfig:
        return _parse(raw)

    @classmethod
    def from_dir(cls, path: str | Path) -> AriaConfig:
        return load_config(path)


def load_config(path: str | Path) -> AriaConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no config.json in {path}; point --model at a checkpoint directory")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {file}: {exc}; re-download the model") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file} is not a JSON object; re-download the model")
    return _parse(raw, source=str(file))


def _require(raw: dict[str, Any], key: str, where: str, source: str) -> Any:
    if key not in raw or raw[key] is None:
        raise ConfigError(f"{source}: required key '{where}{key}' is missing")
    return raw[key]


def _bad(source: str, key: str, need: str, value: Any) -> ConfigError:
    return ConfigError(f"{source}: '{key}' must be {need} (got {json.dumps(value)}); fix it or download the "
                       "model again")


def _count(value: Any, key: str, source: str, minimum: int = 1) -> int:
    """A size or count: an integer (4096.0 too) of at least `minimum`."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(source, key, "a positive integer" if minimum == 1 else f"an integer >= {minimum}", value)
    return value


def _positive(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise _bad(source, key, "a positive number", value)
    return float(value)


def _parse(raw: dict[str, Any], source: str = "config.json") -> AriaConfig:
    text_raw = raw.get("text_config")
    vision_raw = raw.get("vision_config")
    if not isinstance(text_raw, dict):
        raise ConfigError(f"{source}: required key 'text_config' is missing (is this an Aria checkpoint?)")
    if not isinstance(vision_raw, dict):
        raise ConfigError(f"{source}: required key 'vision_config' is missing (is this an Aria checkpoint?)")
    text = _parse_text(text_raw, source)
    vision = _parse_vision(vision_raw, source)

    patch_to_query = raw.get("projector_patch_to_query_dict") or {1225: 128, 4900: 256}
    try:  # JSON object keys are strings
        patch_to_query = {int(k): _count(v, "projector_patch_to_query_dict", source) for k, v in patch_to_query.items()}
    except (AttributeError, TypeError, ValueError, ConfigError):
        raise ConfigError(f"{source}: 'projector_patch_to_query_dict' must map patch counts to query counts "
                          "(positive integers); fix it or download the model again") from None

    original = text_raw.get("model_type") == "aria_moe_lm" or "moe_intermediate_size" in text_raw
    quantization = raw.get("quantization")
    if quantization is not None and not (isinstance(quantization, dict) and "scheme" in quantization):
        raise ConfigError(f"{source}: 'quantization' must be an object with a 'scheme'; re-run aria quantize")
    return AriaConfig(
        text=text,
        vision=vision,
        patch_to_query=patch_to_query,
        image_token_index=_count(raw.get("image_token_index", raw.get("image_token_id", 9)), "image_token_index",
                                 source, minimum=0),
        flavour="original" if original else "hub",
        quantization=quantization,
    )


def _parse_text(t: dict[str, Any], source: str) -> TextConfig:
    w = "text_config."

    def count(key: str, value: Any = None, minimum: int = 1) -> int:
        return _count(_require(t, key, w, source) if value is None else value, w + key, source, minimum)

    hidden = count("hidden_size")
    heads = count("num_attention_heads")
    # P1: remote-code configs keep a stale intermediate_size (13568); the expert width is
    # moe_intermediate_size whenever it is present.
    if t.get("moe_intermediate_size") is not None:
        expert_width = count("moe_intermediate_size")
    else:
        expert_width = count("intermediate_size")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise ConfigError(f"{source}: rope type '{rope_type}' is not supported (Aria uses default RoPE)")
    theta = t.get("rope_theta")
    if theta is None and isinstance(rope, dict):
        theta = rope.get("rope_theta")
    eos = t.get("eos_token_id", 2)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    kv_heads = count("num_key_value_heads", t.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    experts, topk = count("moe_num_experts"), count("moe_topk")
    if topk > experts:
        raise ConfigError(f"{source}: moe_topk ({topk}) is more than moe_num_experts ({experts}); fix it or "
                          "download the model again")
    return TextConfig(
        vocab_size=count("vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=count("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=count("head_dim", t.get("head_dim") or hidden // heads),
        moe_intermediate_size=expert_width,
        moe_num_experts=experts,
        moe_topk=topk,
        moe_num_shared_experts=count("moe_num_shared_experts", t.get("moe_num_shared_experts", 2)),
        rms_norm_eps=_positive(t.get("rms_norm_eps", 1e-6), w + "rms_norm_eps", source),
        rope_theta=_positive(theta if theta is not None else _DEFAULT_ROPE_THETA, w + "rope_theta", source),
        max_position_embeddings=count("max_position_embeddings", t.get("max_position_embeddings", 65536)),
        bos_token_id=t.get("bos_token_id", 1),
        eos_token_id=eos,
        pad_token_id=t.get("pad_token_id", 2),
    )


def _parse_vision(v: dict[str, Any], source: str) -> VisionConfig:
    defaults = _VISION_DEFAULTS.get(v.get("model_type", "idefics3_vision"), _IDEFICS3_VISION_DEFAULTS)
    # `attention_heads` (seen in the hub-main config) is not a key the reference reads: ignored.
    values = {k: v.get(k, d) for k, d in defaults.items()}
    for key in ("image_size", "patch_size"):
        if isinstance(values[key], (list, tuple)) and values[key]:
            values[key] = values[key][0]
    cfg = VisionConfig(**{
        k: _positive(x, f"vision_config.{k}", source) if k == "layer_norm_eps" else _count(x, f"vision_config.{k}", source)
        for k, x in values.items()
    })
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"{source}: vision hidden_size is not a multiple of num_attention_heads")
    return cfg
