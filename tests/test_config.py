"""config.json parsing: every flavour, unknown keys ignored, required keys named when missing."""

import json

import pytest
from transformers import AriaConfig as ReferenceConfig

from runtime.config import AriaConfig, load_config
from runtime.errors import ConfigError
from runtime.known_configs import aria_config_dict


def write(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return tmp_path


def test_hub_config_matches_what_the_reference_reads():
    raw = aria_config_dict()
    ours = AriaConfig.from_dict(raw)
    ref = ReferenceConfig(**raw)
    t, v = ref.text_config, ref.vision_config
    assert (ours.text.hidden_size, ours.text.moe_intermediate_size, ours.text.num_key_value_heads) == (
        t.hidden_size, t.intermediate_size, t.num_key_value_heads)
    assert ours.text.rope_theta == t.rope_parameters["rope_theta"]
    assert ours.text.rms_norm_eps == t.rms_norm_eps
    # Vision keys the hub config leaves out take the reference class defaults (hidden 1152, 16 heads).
    assert (ours.vision.hidden_size, ours.vision.num_attention_heads, ours.vision.intermediate_size) == (
        v.hidden_size, v.num_attention_heads, v.intermediate_size)
    assert (ours.vision.image_size, ours.vision.patch_size, ours.vision.layer_norm_eps) == (
        v.image_size, v.patch_size, v.layer_norm_eps)
    assert ours.patch_to_query == ref.projector_patch_to_query_dict == {1225: 128, 4900: 256}


def test_rope_parameters_form_and_unknown_keys(tmp_path):
    raw = aria_config_dict()
    del raw["text_config"]["rope_theta"]
    raw["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
    raw["text_config"]["some_future_key"] = [1, 2, 3]
    raw["another_unknown"] = {"x": 1}
    config = load_config(write(tmp_path, raw))
    assert config.text.rope_theta == 100000.0


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size", "moe_num_experts", "moe_topk"])
def test_missing_required_text_key_is_named(tmp_path, key):
    raw = aria_config_dict()
    del raw["text_config"][key]
    with pytest.raises(ConfigError, match=f"text_config.{key}"):
        load_config(write(tmp_path, raw))


def test_missing_expert_width_is_named(tmp_path):
    raw = aria_config_dict()
    del raw["text_config"]["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        load_config(write(tmp_path, raw))


def test_not_an_aria_config(tmp_path):
    with pytest.raises(ConfigError, match="text_config"):
        load_config(write(tmp_path, {"model_type": "llama", "hidden_size": 8}))


def test_unreadable_and_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_unsupported_rope_scaling_is_refused(tmp_path):
    raw = aria_config_dict()
    raw["text_config"]["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ConfigError, match="yarn"):
        load_config(write(tmp_path, raw))


def test_crop_size_must_be_one_the_projector_knows():
    config = AriaConfig.from_dict(aria_config_dict())
    assert config.tokens_per_crop(980) == 256 and config.tokens_per_crop(490) == 128
    with pytest.raises(ConfigError, match="490, 980"):
        config.tokens_per_crop(700)


@pytest.mark.parametrize(
    ("part", "key", "value", "need"),
    [
        ("text_config", "hidden_size", "abc", "a positive integer"),
        ("text_config", "num_hidden_layers", -2, "a positive integer"),
        ("text_config", "num_attention_heads", 0, "a positive integer"),
        ("text_config", "vocab_size", 1.5, "a positive integer"),
        ("text_config", "max_position_embeddings", "65536", "a positive integer"),
        ("text_config", "hidden_size", True, "a positive integer"),
        ("text_config", "rms_norm_eps", "x", "a positive number"),
        ("text_config", "rope_theta", -1, "a positive number"),
        ("vision_config", "num_attention_heads", 0, "a positive integer"),
        ("vision_config", "image_size", [], "a positive integer"),
        ("vision_config", "layer_norm_eps", float("nan"), "a positive number"),
        (None, "image_token_index", "x", "an integer >= 0"),
    ],
)
def test_bad_values_name_the_file_the_field_and_the_value(tmp_path, part, key, value, need):
    raw = aria_config_dict()
    (raw[part] if part else raw)[key] = value
    file = write(tmp_path, raw) / "config.json"
    field = f"{part}.{key}" if part else key
    shown = json.dumps(value)
    with pytest.raises(ConfigError) as caught:
        load_config(file)
    assert str(caught.value) == f"{file}: '{field}' must be {need} (got {shown}); fix it or download the model again"


def test_more_experts_per_token_than_experts_is_refused(tmp_path):
    raw = aria_config_dict()
    raw["text_config"]["moe_topk"] = raw["text_config"]["moe_num_experts"] + 1
    with pytest.raises(ConfigError, match=r"moe_topk \(65\) is more than moe_num_experts \(64\)"):
        load_config(write(tmp_path, raw))


def test_whole_floats_are_integers(tmp_path):
    raw = aria_config_dict()
    raw["text_config"]["max_position_embeddings"] = 4096.0
    config = load_config(write(tmp_path, raw))
    assert config.text.max_position_embeddings == 4096 and isinstance(config.text.max_position_embeddings, int)
