"""Pictures -> the vision tower's input: pixel values, pixel masks, and crops per picture.

Per crop (ARIA_SPEC §4.1, identical to the original `keep_ratio_resize_and_pixel_mask` and to
transformers' PIL-backend `AriaImageProcessor`): the long side becomes `crop_size` and the short
side `int(short * scale)` but at least 336, bicubic; zero padding right and bottom to a square;
mask True on the picture; x/255 then (x - 0.5)/0.5, so padding is -1.

Colour: like the transformers processor, anything with transparency is composited on WHITE
(the original remote code dropped the alpha channel instead), other modes go through Pillow's
RGB conversion. One deliberate difference from both references: 16-bit greyscale ("I;16*",
and "I" holding values above 255) is scaled to 8 bits instead of being clipped at 255, which
turned a 16-bit PNG into a white sheet.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import UsageError
from .image_sources import check_image_size
from .image_split import split_image

MIN_IMAGE_SIZE = 336
DEFAULT_CROP_SIZE = 980
# The official processors accept only these; smaller sizes exist for tiny test models.
ARIA_CROP_SIZES = (490, 980)

# uint8 -> normalised float32, computed the reference's way (float64 x * (1/255), cast to
# float32, then (x - 0.5) / 0.5 in float32) so values are bit-identical to it.
_NORMALISE = ((torch.arange(256, dtype=torch.float64) * (1 / 255)).to(torch.float32) - 0.5) / 0.5


@dataclass(frozen=True)
class ProcessedImages:
    pixel_values: torch.Tensor  # float32 [N_crops, 3, M, M], in [-1, 1]
    pixel_mask: torch.Tensor  # bool [N_crops, M, M], True on picture pixels
    crops_per_image: tuple[int, ...]  # crops of each picture, in order (sum = N_crops)
    crop_size: int  # M

    @property
    def num_crops(self) -> int:
        return int(self.pixel_values.shape[0])

    def key(self) -> bytes:
        """A digest of exactly what the model sees: the crops' pixels and masks. (Hashing these
        costs ~10 ms a crop whatever the photo's size; the decoded picture's own bytes, through
        Pillow's tobytes, took 120 ms for 12 megapixels.)"""
        digest = hashlib.sha256(str((self.crop_size, self.crops_per_image)).encode())
        digest.update(self.pixel_values.contiguous().numpy().data)
        digest.update(self.pixel_mask.contiguous().numpy().data)
        return digest.digest()

    def image_token_counts(self, tokens_per_crop: int) -> list[int]:
        """`<|img|>` tokens each picture needs (crops x tokens per crop, per picture)."""
        return [crops * tokens_per_crop for crops in self.crops_per_image]


def preprocess_images(
    images: Sequence[Image.Image],
    crop_size: int = DEFAULT_CROP_SIZE,
    split: bool = False,
    min_size: int = MIN_IMAGE_SIZE,
) -> ProcessedImages:
    """Turn decoded pictures into model input. `split` enables the original high-res tiling."""
    if not isinstance(crop_size, int) or crop_size < 1:
        raise UsageError(f"image size must be a positive number of pixels (490 or 980 for Aria), got {crop_size!r}")
    values, masks, counts = [], [], []
    for index, image in enumerate(images):
        check_image_size(image.width, image.height, f"#{index + 1}")
        rgb = to_rgb(image)
        crops = split_image(rgb, crop_size) if split else [rgb]
        counts.append(len(crops))
        for crop in crops:
            value, mask = preprocess_crop(crop, crop_size, min_size)
            values.append(value)
            masks.append(mask)
    if values:
        pixel_values, pixel_mask = torch.stack(values), torch.stack(masks)
    else:
        pixel_values = torch.zeros((0, 3, crop_size, crop_size), dtype=torch.float32)
        pixel_mask = torch.zeros((0, crop_size, crop_size), dtype=torch.bool)
    return ProcessedImages(pixel_values, pixel_mask, tuple(counts), crop_size)


def preprocess_crop(image: Image.Image, crop_size: int, min_size: int = MIN_IMAGE_SIZE):
    """One RGB crop -> (float32 [3, M, M], bool [M, M])."""
    min_size = min(min_size, crop_size)  # only matters for tiny test crop sizes
    width, height = image.size
    scale = crop_size / max(width, height)
    if width >= height:
        new_w, new_h = crop_size, max(int(height * scale), min_size)
    else:
        new_w, new_h = max(int(width * scale), min_size), crop_size
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = torch.zeros((crop_size, crop_size, 3), dtype=torch.uint8)
    canvas[:new_h, :new_w] = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())
    mask = torch.zeros((crop_size, crop_size), dtype=torch.bool)
    mask[:new_h, :new_w] = True
    pixels = _NORMALISE[canvas.long()].permute(2, 0, 1).contiguous()
    return pixels, mask


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB (transparency composited on white)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        image = _to_8bit_grey(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    raw = np.asarray(image).astype(np.int64)
    values = raw
    if image.mode.startswith("I;16") or (raw.size and raw.max() > 255):
        values = raw >> 8  # 16-bit samples: keep the high byte
    grey = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))
    key = image.info.get("transparency")
    if isinstance(key, int):  # a transparent sample value (PNG tRNS): an alpha band, as to_rgb expects
        alpha = Image.fromarray(np.where(raw == key, 0, 255).astype(np.uint8))
        return Image.merge("LA", (grey, alpha))
    return grey
