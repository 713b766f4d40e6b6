"""Loading checkpoints into a meta-built model, strictly and without copies; config files;
transformers (the oracle) loading what our writer produces."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from memory_maps import file_mapped_at
from safetensors.torch import load_file, save_file

from runtime.checkpoint import load_weights, open_checkpoint
from runtime.checkpoint_writer import config_to_json, write_checkpoint
from runtime.config import load_config
from runtime.errors import CheckpointError
from runtime.model import build_model
from runtime.safetensors_io import INDEX_FILE, SINGLE_FILE
from runtime.tiny_checkpoint import tiny_config, write_tiny_checkpoint

# --- transformers reads what we write --------------------------------------------------------


@pytest.mark.parametrize("layout", ["c1", "c2", "c3"])
@pytest.mark.parametrize("shard", [None, 60_000])
def test_transformers_loads_our_hub_layouts(reference, canonical, tmp_path, layout, shard):
    from transformers import AriaForConditionalGeneration

    write_checkpoint(tmp_path, canonical, tiny_config(), layout, max_shard_bytes=shard)
    model, info = AriaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert model.config.text_config.intermediate_size == 32  # P1: expert width in the native flavour
    expected = reference[1].state_dict()
    for key, tensor in model.state_dict().items():
        if "post_layernorm" in key:
            assert torch.count_nonzero(tensor) == 0
        else:
            assert torch.equal(tensor, expected[key]), key


def test_transformers_reads_our_generation_config(tmp_path, canonical):
    from transformers import GenerationConfig

    write_checkpoint(tmp_path, canonical, tiny_config(), "c1")
    gen = GenerationConfig.from_pretrained(tmp_path)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 2)


def test_tiny_config_reads_like_the_transformers_tiny_config(reference):
    assert load_config(reference[0]) == tiny_config()


# --- config.json flavours ----------------------------------------------------------------------


@pytest.mark.parametrize("layout, flavour", [("a", "original"), ("b", "original"), ("c1", "hub"), ("c3", "hub")])
def test_config_round_trips_in_each_flavour(tmp_path, canonical, layout, flavour):
    config = tiny_config(rope_theta=1e5, rms_norm_eps=1e-5, max_position_embeddings=4096, bos_token_id=None,
                         vision_layer_norm_eps=1e-5, image_token_index=7)
    write_checkpoint(tmp_path, canonical, config, layout)
    assert load_config(tmp_path) == dataclasses.replace(config, flavour=flavour)


def test_original_flavour_keeps_a_stale_intermediate_size(tmp_path):
    raw = config_to_json(tiny_config(), "original")
    text, vision = raw["text_config"], raw["vision_config"]
    assert raw["model_type"] == "aria" and text["model_type"] == "aria_moe_lm"
    assert text["moe_intermediate_size"] == 32 and text["intermediate_size"] not in (32, None)  # P1
    assert text["rope_theta"] == 5e6 and "rope_parameters" not in text
    assert vision["model_type"] == "aria_vision_model"
    # The remote-code vision class has SigLIP-style defaults, not Aria's: every size is spelled out.
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "layer_norm_eps", "num_channels"):
        assert key in vision
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_config(tmp_path).text.moe_intermediate_size == 32


def test_hub_flavour_uses_rope_parameters_and_expert_width():
    raw = config_to_json(tiny_config(), "hub")
    assert raw["text_config"]["model_type"] == "aria_text" and raw["vision_config"]["model_type"] == "idefics3_vision"
    assert raw["text_config"]["intermediate_size"] == 32 and "moe_intermediate_size" not in raw["text_config"]
    assert raw["text_config"]["rope_parameters"] == {"rope_type": "default", "rope_theta": 5e6}
    assert raw["projector_patch_to_query_dict"] == {"49": 8, "196": 16}


# --- load_weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["a", "b", "c1", "c2", "c3"])
def test_load_weights_fills_a_meta_model_exactly(canonical, tmp_path, layout):
    write_checkpoint(tmp_path, canonical, tiny_config(), layout, max_shard_bytes=60_000)
    model = build_model(tiny_config())
    load_weights(model, tmp_path)
    state = model.state_dict()
    assert sorted(state) == sorted(canonical)
    assert all(torch.equal(state[k], canonical[k]) for k in canonical)


def test_load_in_stored_dtype_uses_the_mapped_files_without_copies(canonical, tmp_path):
    write_checkpoint(tmp_path, canonical, tiny_config(), "c1", max_shard_bytes=60_000)
    model = build_model(tiny_config())
    load_weights(model, tmp_path)
    shards = {p.resolve() for p in tmp_path.glob("model-*.safetensors")}
    for name, param in model.state_dict().items():
        assert file_mapped_at(param.data_ptr()) in shards, name


def test_load_with_dtype_conversion_copies_and_converts(canonical, tmp_path):
    write_checkpoint(tmp_path, canonical, tiny_config(), "b")
    model = build_model(tiny_config())
    load_weights(model, tmp_path, dtype=torch.bfloat16)
    for name, param in model.state_dict().items():
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, canonical[name].to(torch.bfloat16)), name
        assert file_mapped_at(param.data_ptr()) is None


def test_non_persistent_buffers_are_left_to_the_model(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = torch.nn.Module()
            self.language_model.lm_head = torch.nn.Linear(4, 3, bias=False)
            self.register_buffer("table", torch.ones(5), persistent=False)

    with torch.device("meta"):
        model = Tiny()
    weight = torch.randn(3, 4)
    save_file({"language_model.lm_head.weight": weight}, tmp_path / SINGLE_FILE)
    load_weights(model, tmp_path)
    assert torch.equal(model.language_model.lm_head.weight, weight)
    assert model.table.is_meta


def _resave(directory, tensors):
    for f in directory.glob("*.safetensors*"):
        f.unlink()
    save_file(tensors, directory / SINGLE_FILE)


def test_missing_weight_is_named(canonical, tmp_path):
    write_checkpoint(tmp_path, canonical, tiny_config(), "c1")
    stored = load_file(tmp_path / SINGLE_FILE)
    del stored["language_model.model.layers.1.mlp.router.weight"]
    _resave(tmp_path, stored)
    with pytest.raises(CheckpointError, match=r"1 missing \(language_model\.model\.layers\.1\.mlp\.router\.weight\)"):
        load_weights(build_model(tiny_config()), tmp_path)


def test_unexpected_weights_are_named_and_counted(canonical, tmp_path):
    # A checkpoint with 2 text layers loaded into a model configured with 1.
    write_checkpoint(tmp_path, canonical, tiny_config(), "c1")
    with pytest.raises(CheckpointError) as err:
        load_weights(build_model(tiny_config(num_hidden_layers=1)), tmp_path)
    message = str(err.value)
    assert "12 unexpected (" in message and "language_model.model.layers.1.input_layernorm.weight" in message
    assert "and 7 more" in message and "missing" not in message and "\n" not in message


def test_misshaped_weight_is_named_with_both_shapes(canonical, tmp_path):
    write_checkpoint(tmp_path, canonical, tiny_config(), "c3")
    with pytest.raises(CheckpointError) as err:
        load_weights(build_model(tiny_config(moe_intermediate_size=16)), tmp_path)
    message = str(err.value)
    assert "mis-shaped" in message and "layout c3" in message
    assert "language_model.model.layers.0.mlp.experts.fc1.weight: checkpoint [8, 64, 64] vs model [8, 64, 32]" in message


# --- broken directories ------------------------------------------------------------------------


def _sharded(canonical, tmp_path):
    write_checkpoint(tmp_path, canonical, tiny_config(), "c1", max_shard_bytes=60_000)
    return sorted(tmp_path.glob("model-*.safetensors"))


def test_truncated_shard_is_named(canonical, tmp_path):
    shard = _sharded(canonical, tmp_path)[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=shard.name) as err:
        open_checkpoint(tmp_path)
    assert "download" in str(err.value)


def test_index_pointing_at_a_missing_shard_is_named(canonical, tmp_path):
    shard = _sharded(canonical, tmp_path)[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} is missing"):
        open_checkpoint(tmp_path)


def test_index_listing_a_weight_its_shard_lacks_is_refused(canonical, tmp_path):
    _sharded(canonical, tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    moved = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][moved] = second
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{second} lacks '{moved}'"):
        open_checkpoint(tmp_path)


def test_shards_without_index_and_corrupt_index(canonical, tmp_path):
    _sharded(canonical, tmp_path)
    index = tmp_path / INDEX_FILE
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        open_checkpoint(tmp_path)
    index.unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        open_checkpoint(tmp_path)


def test_directory_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(tmp_path)


# --- tiny checkpoint ---------------------------------------------------------------------------


def test_tiny_checkpoint_is_a_model_transformers_can_load(tmp_path):
    from transformers import AriaForConditionalGeneration

    write_tiny_checkpoint(tmp_path, "c1", seed=3)
    _, info = AriaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values())
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.shape("language_model.model.layers.0.mlp.experts.fc1.weight") == (8, 64, 64)


def test_tiny_config_overrides():
    config = tiny_config(num_hidden_layers=3, vision_num_hidden_layers=1, image_token_index=5)
    assert (config.text.num_hidden_layers, config.vision.num_hidden_layers, config.image_token_index) == (3, 1, 5)
    assert config.tokens_per_crop(980) == 16 and config.tokens_per_crop(490) == 8
    assert tiny_config(hidden_size=128).text.head_dim == 32
    with pytest.raises(TypeError, match="vision_bogus"):
        tiny_config(vision_bogus=1)
