"""The same random weights written in every published layout load to identical logits."""

import pytest
import torch

from runtime.loader import load_model
from runtime.tiny_checkpoint import tiny_config, write_tiny_checkpoint

LAYOUTS = ["a", "b", "c1", "c2", "c3"]


@pytest.fixture(scope="module")
def logits_by_layout(tmp_path_factory):
    config = tiny_config()
    gen = torch.Generator().manual_seed(7)
    q = config.tokens_per_crop(980)
    ids = torch.tensor([[5, 6] + [config.image_token_index] * q + torch.randint(10, 500, (9,), generator=gen).tolist()])
    pixels = torch.rand(1, 3, 980, 980, generator=gen) * 2 - 1
    mask = torch.zeros(1, 980, 980, dtype=torch.bool)
    mask[:, :800, :] = True
    out = {}
    for layout in LAYOUTS:
        path = write_tiny_checkpoint(
            tmp_path_factory.mktemp(layout), layout=layout, seed=11, config=config, max_shard_bytes=400_000
        )
        model = load_model(path, dtype=torch.float32)
        with torch.inference_mode():
            out[layout] = model(ids, None, 0, pixels, mask, all_logits=True)
    return out


@pytest.mark.parametrize("layout", [x for x in LAYOUTS if x != "c1"])
def test_layout_gives_identical_logits(logits_by_layout, layout):
    # Bit-identical: a layout is only a naming (and, for b, a split of the same numbers).
    assert torch.equal(logits_by_layout[layout], logits_by_layout["c1"])
