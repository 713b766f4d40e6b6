"""Every checkpoint layout (a, b, c1, c2, c3) against independent references.

- c1: the file transformers itself saves (ground truth for key names and shapes);
- c3: the key names of transformers' in-memory v5 model;
- a: the HF converter's substring renames (ARIA_SPEC §3.3), re-applied here by hand;
- b: the per-expert formulas (ARIA_SPEC §3.2): gate = fc1[e][:, :I].T, up = fc1[e][:, I:].T, down = fc2[e].T.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.checkpoint import open_checkpoint
from runtime.checkpoint_layouts import LAYOUTS, detect_layout, get_layout
from runtime.checkpoint_writer import layout_tensors, write_checkpoint
from runtime.config import AriaConfig
from runtime.errors import CheckpointError
from runtime.known_configs import aria_config_dict
from runtime.model import build_model
from runtime.safetensors_io import INDEX_FILE, SINGLE_FILE
from runtime.tiny_checkpoint import tiny_config

EXPERT_WIDTH = 32


def _all_stored(directory) -> dict[str, torch.Tensor]:
    if (directory / SINGLE_FILE).exists():
        return load_file(directory / SINGLE_FILE)
    out = {}
    for shard in set(json.loads((directory / INDEX_FILE).read_text())["weight_map"].values()):
        out.update(load_file(directory / shard))
    return out


def _write(tmp_path, canonical, layout, shard=None):
    return write_checkpoint(tmp_path / layout, canonical, tiny_config(), layout, max_shard_bytes=shard)


def test_transformers_saved_file_is_read_as_c1_and_drops_post_layernorm(reference, canonical):
    ckpt = open_checkpoint(reference[0])
    assert ckpt.layout == "c1"
    assert sorted(ckpt.names()) == sorted(canonical)
    for name, tensor in canonical.items():
        assert ckpt.shape(name) == tuple(tensor.shape)
        assert torch.equal(ckpt.get(name), tensor)


def test_c1_output_has_exactly_the_keys_transformers_saves(reference, canonical, tmp_path):
    ours = _all_stored(_write(tmp_path, canonical, "c1"))
    theirs = load_file(reference[0] / SINGLE_FILE)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        if "post_layernorm" in key:
            assert torch.count_nonzero(ours[key]) == 0  # the hub file's all-zero post-LN (P3)
        else:
            assert torch.equal(ours[key], theirs[key]), key


def test_c3_output_has_the_key_names_of_the_transformers_v5_model(reference, canonical, tmp_path):
    ours = _all_stored(_write(tmp_path, canonical, "c3"))
    in_memory = reference[1].state_dict()
    assert sorted(ours) == sorted(in_memory)
    for key, tensor in in_memory.items():
        if "post_layernorm" not in key:
            assert torch.equal(ours[key], tensor), key


def _hf_converter_renames(key: str) -> str:
    """convert_aria_weights_to_hf.py: substring renames applied in this order, (a) -> (c1)."""
    for old, new in [("vision_tower.vision_model", "vision_tower"), ("ln_ffn", "layer_norm"),
                     ("ffn", "feed_forward"), ("ln_kv", "layer_norm_kv")]:
        key = key.replace(old, new)
    return key


def test_a_output_converts_to_c1_with_the_hf_converter_renames(canonical, tmp_path):
    ours = _all_stored(_write(tmp_path, canonical, "a"))
    assert any(k.startswith("vision_tower.vision_model.") for k in ours)
    assert {"multi_modal_projector.ln_ffn.weight", "multi_modal_projector.cross_attn.ln_kv.bias",
            "multi_modal_projector.ffn.linear_in.weight"} <= set(ours)
    converted = {_hf_converter_renames(k): v for k, v in ours.items()}
    assert sorted(converted) == sorted(canonical)
    assert all(torch.equal(converted[k], canonical[k]) for k in canonical)


def test_b_output_holds_per_expert_linears_by_the_published_formula(canonical, tmp_path):
    ours = _all_stored(_write(tmp_path, canonical, "b"))
    for layer in range(2):
        fc1 = canonical[f"language_model.model.layers.{layer}.mlp.experts.fc1.weight"]
        fc2 = canonical[f"language_model.model.layers.{layer}.mlp.experts.fc2.weight"]
        assert f"language_model.model.layers.{layer}.mlp.experts.fc1.weight" not in ours
        for e in range(8):
            prefix = f"language_model.model.layers.{layer}.mlp.experts.experts.{e}."
            assert torch.equal(ours[prefix + "gate_proj.weight"], fc1[e][:, :EXPERT_WIDTH].T)
            assert torch.equal(ours[prefix + "up_proj.weight"], fc1[e][:, EXPERT_WIDTH:].T)
            assert torch.equal(ours[prefix + "down_proj.weight"], fc2[e].T)
    # Everything but the routed experts is named as in layout a.
    a_keys = set(_all_stored(_write(tmp_path, canonical, "a")))
    assert {k for k in ours if ".experts.experts." not in k} == {k for k in a_keys if ".experts.fc" not in k}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shard", [None, 60_000])
def test_every_layout_reads_back_bit_exact(canonical, tmp_path, layout, shard):
    directory = _write(tmp_path, canonical, layout, shard)
    assert (directory / INDEX_FILE).exists() == (shard is not None)
    ckpt = open_checkpoint(directory)
    assert ckpt.layout == layout
    assert sorted(ckpt.names()) == sorted(canonical)
    for name, tensor in canonical.items():
        assert ckpt.shape(name) == tuple(tensor.shape) and ckpt.dtype(name) == tensor.dtype
        got = ckpt.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    assert ckpt.get(next(iter(canonical)), torch.bfloat16).dtype == torch.bfloat16


def test_b_with_unconfirmed_expert_naming_reads_the_same(canonical, tmp_path):
    stored = _all_stored(_write(tmp_path, canonical, "b"))
    alt = tmp_path / "b_alt"
    alt.mkdir()
    save_file({k.replace(".experts.experts.", ".experts."): v for k, v in stored.items()}, alt / SINGLE_FILE)
    ckpt = open_checkpoint(alt)
    assert ckpt.layout == "b"
    assert all(torch.equal(ckpt.get(k), canonical[k]) for k in canonical)


def _resave(directory, tensors):
    for f in directory.glob("*.safetensors*"):
        f.unlink()
    save_file(tensors, directory / SINGLE_FILE)


def test_rotary_inv_freq_keys_are_ignored(canonical, tmp_path):
    directory = _write(tmp_path, canonical, "a")
    stored = _all_stored(directory)
    stored["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    _resave(directory, stored)
    assert sorted(open_checkpoint(directory).names()) == sorted(canonical)


@pytest.mark.parametrize(
    "layout, bad_key",
    [
        ("c1", "language_model.model.layers.0.mlp.gate.weight"),  # not an Aria weight
        ("c1", "something_else.weight"),
        ("a", "vision_tower.embeddings.position_embedding.weight"),  # c1 name inside an (a) checkpoint
        ("c3", "model.language_model.layers.1.mlp.experts.fc1.weight"),  # c2 expert name inside (c3)
    ],
)
def test_unknown_or_foreign_key_is_an_error_naming_it(canonical, tmp_path, layout, bad_key):
    directory = _write(tmp_path, canonical, layout)
    stored = _all_stored(directory)
    stored[bad_key] = torch.zeros(1)
    _resave(directory, stored)
    with pytest.raises(CheckpointError, match=bad_key.replace(".", r"\.")):
        open_checkpoint(directory)


def test_b_missing_one_expert_is_an_error(canonical, tmp_path):
    directory = _write(tmp_path, canonical, "b")
    stored = _all_stored(directory)
    del stored["language_model.model.layers.1.mlp.experts.experts.5.up_proj.weight"]
    _resave(directory, stored)
    with pytest.raises(CheckpointError, match=r"expert 5") as err:
        open_checkpoint(directory)
    assert "layers.1.mlp.experts.fc1.weight" in str(err.value)


def test_b_with_grouped_and_per_expert_copies_of_one_tensor_is_an_error(canonical, tmp_path):
    directory = _write(tmp_path, canonical, "b")
    stored = _all_stored(directory)
    name = "language_model.model.layers.0.mlp.experts.fc2.weight"
    stored[name] = canonical[name]
    _resave(directory, stored)
    with pytest.raises(CheckpointError, match="twice|clashes"):
        open_checkpoint(directory)


def test_detect_layout_from_key_names(reference):
    hf_keys = list(reference[1].state_dict())
    assert detect_layout(hf_keys) == "c3"
    c2_keys = [k.replace("experts.gate_up_proj", "experts.fc1.weight").replace("experts.down_proj", "experts.fc2.weight")
               for k in hf_keys]
    assert detect_layout(c2_keys) == "c2"
    with pytest.raises(CheckpointError, match="not look like an Aria"):
        detect_layout(["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(CheckpointError, match="no weights"):
        detect_layout([])


def test_rename_table_is_a_bijection_on_canonical_names(canonical):
    for layout in ("a", "c1", "c2", "c3"):
        spec = get_layout(layout)
        stored = [spec.from_canonical(n) for n in canonical]
        assert len(set(stored)) == len(stored)
        assert [spec.to_canonical(k) for k in stored] == list(canonical)
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        get_layout("d")


@pytest.mark.parametrize("layout, total", [("a", 25_307_308_912), ("b", 25_307_308_912), ("c1", 25_307_311_216),
                                           ("c2", 25_307_311_216), ("c3", 25_307_311_216)])
def test_real_aria_key_audit(layout, total):
    # The real model's names on the meta device, renamed into each layout: parameter totals and
    # shapes are the published ones (ARIA_SPEC §1.5, §3.1, §3.2), and every key reads back.
    config = AriaConfig.from_dict(aria_config_dict())
    names = build_model(config).state_dict()
    stored = {k: tuple(t.shape) for k, t in layout_tensors(names.items(), config, layout)}
    assert sum(math.prod(s) for s in stored.values()) == total
    assert detect_layout(list(stored)) == layout
    spec = get_layout(layout)
    if layout == "b":
        per_expert = [k for k in stored if ".experts.experts." in k]
        assert len(per_expert) == 28 * 64 * 3
        assert stored["language_model.model.layers.27.mlp.experts.experts.63.gate_proj.weight"] == (1664, 2560)
        assert stored["language_model.model.layers.0.mlp.experts.experts.0.down_proj.weight"] == (2560, 1664)
    else:
        fc1 = spec.from_canonical("language_model.model.layers.27.mlp.experts.fc1.weight")
        assert stored[fc1] == (64, 2560, 3328)
    back = set()
    for key in stored:
        part = spec.expert_part(key)
        name = part[1] if part else spec.to_canonical(key)
        if name is not None:
            back.add(name)
    assert back == set(names)
