"""split_image: the original Aria tiling, checked against hand-worked grids and hand-cut tiles."""

import numpy as np
import pytest
from PIL import Image

from runtime.image_processing import preprocess_images
from runtime.image_split import select_grid


def _noise(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# (width, height, crop) -> (w_tiles, h_tiles), worked out by hand from the rule in ARIA_SPEC §4.3:
# the closest w/h ratio wins; on an exact tie a later grid wins if w*h > 0.5 * crop^2 * tiles.
GRID_CASES = [
    ((1024, 768, 490), (3, 2)),  # 1.333: 3/2 is 0.167 away, 1 is 0.333 away (the spec's example)
    ((768, 1024, 490), (2, 3)),  # 0.75: 2/3 is 0.083 away
    ((800, 800, 490), (2, 2)),
    ((100, 800, 490), (1, 8)),
    ((1000, 500, 490), (2, 1)),  # exactly 2: ties with 4x2, but 500000 <= 0.5*490^2*8 = 960400
    ((2000, 1000, 490), (4, 2)),  # same tie, 2000000 > 960400: the later 4x2 wins
    ((1000, 400, 490), (3, 1)),  # 2.5: 2x1, 3x1 and 4x2 all 0.5 away; 400000 > 360150 (3x1) only
    ((500, 200, 490), (2, 1)),  # same tie, 100000 is too small for either later grid
    ((1024, 768, 980), (3, 2)),
    ((4000, 3000, 980), (3, 2)),
]


@pytest.mark.parametrize(("size", "grid"), GRID_CASES, ids=[f"{w}x{h}@{c}" for (w, h, c), _ in GRID_CASES])
def test_grid_choice(size, grid):
    assert select_grid(*size) == grid


def test_crops_are_global_view_then_row_major_tiles():
    picture = _noise(1024, 768, seed=5)
    out = preprocess_images([picture], 490, split=True)
    assert out.crops_per_image == (7,)  # 3x2 tiles + the global view
    assert out.pixel_values.shape == (7, 3, 490, 490)

    whole = preprocess_images([picture], 490)  # crop 0 = the untouched picture through §4.1
    assert np.array_equal(out.pixel_values[0].numpy(), whole.pixel_values[0].numpy())
    assert np.array_equal(out.pixel_mask[0].numpy(), whole.pixel_mask[0].numpy())

    stretched = np.asarray(picture.resize((3 * 490, 2 * 490), Image.Resampling.BICUBIC), dtype=np.float64)
    for index in range(6):
        row, col = divmod(index, 3)
        tile = stretched[row * 490 : (row + 1) * 490, col * 490 : (col + 1) * 490]
        expected = (tile / 255 - 0.5) / 0.5
        got = out.pixel_values[1 + index].permute(1, 2, 0).numpy()
        assert np.abs(got - expected).max() <= 1e-6, index
        assert out.pixel_mask[1 + index].all()


def test_token_counts_are_per_image():
    # Pictures that tile differently in one prompt (the reference processor would give every
    # one of them the same, largest count: P6).
    pictures = [_noise(1024, 768), _noise(800, 800), _noise(1000, 500), _noise(300, 300)]
    out = preprocess_images(pictures, 490, split=True)
    assert out.crops_per_image == (7, 5, 3, 5)
    assert out.num_crops == 20
    assert out.image_token_counts(128) == [896, 640, 384, 640]


def test_split_is_off_by_default():
    assert preprocess_images([_noise(2000, 1000)], 490).crops_per_image == (1,)
