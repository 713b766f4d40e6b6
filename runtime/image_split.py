"""High-resolution tiling (`split_image`), the ORIGINAL rhymes-ai/Aria algorithm the model was
trained with (ARIA_SPEC §4.3), not transformers' LLaVA-NeXT-style variant.

- Pick the grid (w_tiles, h_tiles) whose w/h ratio is closest to the picture's. On an exact tie
  of the ratio difference a later candidate replaces the current one only if the picture's area
  exceeds half the grid's pixel area (area = width * height, as in the final original code; an
  earlier revision used height * height, a typo).
- Resize the whole picture, aspect NOT preserved, to (crop * w_tiles, crop * h_tiles) and cut
  crop x crop tiles in row-major order.
- With more than one tile the untouched picture goes first as a global view.

Every crop then gets the ordinary per-crop resize/pad (image_processing). The number of crops is
per picture; nothing is shared across the pictures of one prompt (the transformers processor's
single `num_crops` for all images is wrong, P6).

Difference from the original, on purpose: the picture is already RGB here (image_processing
converts first, transparency on white), so every other mode is tiled from its RGB form: palette
and bilevel pictures are resized bicubically instead of with Pillow's nearest-neighbour default
for "P" and "1", and I/F/CMYK/YCbCr ones at 8-bit RGB precision. The global view is unchanged.
"""

from __future__ import annotations

from PIL import Image

# (w_tiles, h_tiles), in the original order (the order matters for ties).
SPLIT_GRIDS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8), (2, 4), (2, 3), (2, 2),
    (2, 1), (3, 1), (3, 2), (4, 1), (4, 2), (5, 1), (6, 1), (7, 1), (8, 1),
)


def select_grid(width: int, height: int, crop_size: int, grids=SPLIT_GRIDS) -> tuple[int, int]:
    """The (w_tiles, h_tiles) grid the original Aria tiling picks for a width x height picture."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for w_tiles, h_tiles in grids:
        diff = abs(aspect - w_tiles / h_tiles)
        if diff < best_diff:
            best, best_diff = (w_tiles, h_tiles), diff
        elif diff == best_diff and area > 0.5 * crop_size * crop_size * w_tiles * h_tiles:
            best = (w_tiles, h_tiles)
    return best


def split_image(image: Image.Image, crop_size: int) -> list[Image.Image]:
    """Crops of one picture: [global view] + tiles (or just [picture] for a 1x1 grid)."""
    w_tiles, h_tiles = select_grid(image.width, image.height, crop_size)
    resized = image.resize((crop_size * w_tiles, crop_size * h_tiles), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((col * crop_size, row * crop_size, (col + 1) * crop_size, (row + 1) * crop_size))
        for row in range(h_tiles)
        for col in range(w_tiles)
    ]
    return tiles if len(tiles) == 1 else [image, *tiles]
