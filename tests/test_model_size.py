"""The real Aria config instantiated on the meta device has exactly the published parameter count."""

from runtime.config import AriaConfig
from runtime.known_configs import aria_config_dict
from runtime.model import parameter_count

# ARIA_SPEC §1.5, computed by hand from the tensor shapes (original layout, no post_layernorm).
ARIA_PARAMETERS = 25_307_308_912


def test_real_aria_parameter_count_hub_flavour():
    assert parameter_count(AriaConfig.from_dict(aria_config_dict())) == ARIA_PARAMETERS


def test_real_aria_parameter_count_original_flavour():
    raw = aria_config_dict()
    text = raw["text_config"]
    # Remote-code config: real expert width in moe_intermediate_size, a stale 13568 beside it (P1).
    text.update(model_type="aria_moe_lm", moe_intermediate_size=1664, intermediate_size=13568)
    raw["vision_config"] = {
        "model_type": "aria_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
        "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 980, "patch_size": 14,
    }
    config = AriaConfig.from_dict(raw)
    assert config.flavour == "original"
    assert config.text.moe_intermediate_size == 1664
    assert parameter_count(config) == ARIA_PARAMETERS


def test_active_parameters_per_text_token():
    # §1.5: 28 x (attention + 6 experts + shared + router + 2 norms) + final norm = 3,601,349,120.
    c = AriaConfig.from_dict(aria_config_dict()).text
    h, i = c.hidden_size, c.moe_intermediate_size
    per_layer = 4 * h * h + c.moe_topk * (h * 2 * i + i * h) + 3 * h * c.shared_intermediate_size
    per_layer += c.moe_num_experts * h + 2 * h
    assert c.num_hidden_layers * per_layer + h == 3_601_349_120
