"""What a shapes picture shows, read from its pixels alone (no use of the generator's tables).

Background = the most common colour; shapes = connected regions of pixels far from it; colour =
the hue of a region's mean colour, named by hand-set hue ranges; shape = how much of its bounding
box a region fills (square ~1, circle ~pi/4, triangle and diamond ~1/2) and, for the last two,
whether its widest row is at the bottom (triangle) or in the middle (diamond).
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

# Hue (degrees) ranges of the colour words, set by hand from the usual colour wheel.
HUES = {"red": (345, 15), "orange": (15, 40), "yellow": (40, 70), "green": (90, 160), "blue": (200, 250),
        "purple": (260, 320)}


def _hue_name(rgb) -> str:
    h, _, _ = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    deg = h * 360
    for name, (lo, hi) in HUES.items():
        if (lo <= deg < hi) if lo < hi else (deg >= lo or deg < hi):
            return name
    return f"hue {deg:.0f}"


def regions(image: Image.Image, min_pixels: int = 30) -> list[np.ndarray]:
    """Boolean masks of the connected non-background regions."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    packed = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    common = int(np.bincount(packed.ravel()).argmax())
    background = np.array([common >> 16, (common >> 8) & 255, common & 255])
    foreground = np.abs(pixels - background).sum(axis=2) > 90
    # copy(): an image made by fromarray may share the array's read-only memory, and floodfill
    # would then change nothing.
    marks = Image.fromarray(np.where(foreground, 255, 0).astype(np.uint8)).copy()
    found = []
    while True:
        todo = np.argwhere(np.asarray(marks) == 255)
        if not len(todo):
            return found
        y, x = todo[0]
        ImageDraw.floodfill(marks, (int(x), int(y)), 128)
        region = np.asarray(marks) == 128
        if not region.any():
            raise RuntimeError("floodfill did not mark the region")
        ImageDraw.floodfill(marks, (int(x), int(y)), 0)
        if region.sum() >= min_pixels:  # anti-aliasing specks would not count as shapes
            found.append(region)


def shape_of(region: np.ndarray) -> str:
    ys, xs = np.nonzero(region)
    box = region[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    fill = box.mean()
    if fill > 0.92:
        return "square"
    if fill > 0.7:
        return "circle"
    widths = box.sum(axis=1)
    return "triangle" if widths.argmax() > 0.8 * len(widths) else "diamond"


def read_picture(image: Image.Image) -> tuple[int, str, str]:
    """(count, colour, shape) of a picture with copies of one shape in one colour."""
    found = regions(image)
    pixels = np.asarray(image.convert("RGB"))
    colours = {_hue_name(pixels[r].mean(axis=0)) for r in found}
    shapes = {shape_of(r) for r in found}
    if len(colours) != 1 or len(shapes) != 1:
        raise AssertionError(f"picture mixes colours {colours} or shapes {shapes}")
    return len(found), colours.pop(), shapes.pop()
