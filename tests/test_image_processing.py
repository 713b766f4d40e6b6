"""Per-crop preprocessing vs transformers' PIL-backend AriaImageProcessor (the reference)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.aria.image_processing_pil_aria import AriaImageProcessorPil

from runtime.errors import ImageError, UsageError
from runtime.image_processing import preprocess_images, to_rgb
from runtime.image_sources import load_image


@pytest.fixture(scope="module")
def reference():
    return AriaImageProcessorPil()


def _noise(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 4), dtype=np.uint8)


def _image(mode, width, height, seed=0):
    rgba = Image.fromarray(_noise(width, height, seed), "RGBA")
    if mode == "RGBA":
        return rgba
    if mode == "P+transparency":
        image = rgba.convert("RGB").quantize(16)
        image.info["transparency"] = 3
        return image
    if mode == "P":
        return rgba.convert("RGB").quantize(64)
    if mode == "I":
        return Image.fromarray(np.asarray(rgba.convert("L")).astype(np.int32))
    return rgba.convert(mode)


def _assert_matches_reference(reference, images, crop_size):
    expected = reference(images, max_image_size=crop_size, return_tensors="np")
    ours = preprocess_images(images, crop_size)
    assert ours.pixel_values.dtype == torch.float32 and ours.pixel_mask.dtype == torch.bool
    assert ours.pixel_values.shape == expected["pixel_values"].shape
    diff = np.abs(ours.pixel_values.numpy() - expected["pixel_values"]).max()
    assert diff <= 1e-6, diff
    assert np.array_equal(ours.pixel_mask.numpy(), expected["pixel_mask"])
    return ours


SIZES = [(1024, 768), (768, 1024), (300, 200), (2000, 150), (150, 2000), (981, 980), (1, 1), (7, 3)]


@pytest.mark.parametrize("crop_size", [490, 980])
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_rgb_sizes_match_reference(reference, size, crop_size):
    ours = _assert_matches_reference(reference, [_image("RGB", *size)], crop_size)
    assert ours.crops_per_image == (1,)


MODES = ["RGBA", "L", "LA", "P", "P+transparency", "1", "CMYK", "YCbCr", "I", "RGBX", "PA"]


@pytest.mark.parametrize("crop_size", [490, 980])
@pytest.mark.parametrize("mode", MODES)
def test_modes_match_reference(reference, mode, crop_size):
    _assert_matches_reference(reference, [_image(mode, 640, 360, seed=1)], crop_size)


def test_several_images_in_one_call(reference):
    images = [_image("RGB", 500, 300, 2), _image("RGBA", 200, 700, 3), _image("L", 90, 90, 4)]
    ours = _assert_matches_reference(reference, images, 490)
    assert ours.crops_per_image == (1, 1, 1)
    assert ours.image_token_counts(128) == [128, 128, 128]


def test_mask_and_padding_by_hand():
    # 1024x768 at 980: scale 980/1024, height int(768 * 0.957...) = 735 -> 735 valid rows.
    ours = preprocess_images([Image.new("RGB", (1024, 768), (255, 0, 128))], 980)
    mask = ours.pixel_mask[0]
    assert mask[:735, :].all() and not mask[735:, :].any()
    pixels = ours.pixel_values[0]
    assert torch.allclose(pixels[:, 734, 979], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-6)
    assert (pixels[:, 735:, :] == -1).all()


def test_transparency_goes_on_white():
    clear = Image.new("RGBA", (50, 40), (10, 200, 30, 0))
    pixels = preprocess_images([clear], 490).pixel_values[0]
    mask = preprocess_images([clear], 490).pixel_mask[0]
    assert (pixels[:, mask] == 1.0).all()


def test_animated_gif_uses_first_frame(reference):
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    loaded = load_image(buffer.getvalue())
    first = Image.open(io.BytesIO(buffer.getvalue()))
    first.seek(0)
    first = first.convert("RGB")
    expected = reference([first], max_image_size=490, return_tensors="np")["pixel_values"]
    ours = preprocess_images([loaded], 490).pixel_values.numpy()
    assert np.abs(ours - expected).max() <= 1e-6
    assert ours[0, 0, 0, 0] == 1.0 and ours[0, 2, 0, 0] == -1.0  # red, not blue


def test_sixteen_bit_grey_is_scaled_not_clipped(reference):
    # Deliberate difference: the reference clips 16-bit samples at 255 (a white sheet);
    # we keep the high byte. Expected = reference on the hand-scaled 8-bit picture.
    ramp = (np.arange(96 * 64, dtype=np.uint32).reshape(64, 96) * 10).astype(np.uint16)
    sixteen = Image.fromarray(ramp)
    assert sixteen.mode == "I;16"
    eight = Image.fromarray((ramp >> 8).astype(np.uint8))
    expected = reference([eight], max_image_size=490, return_tensors="np")["pixel_values"]
    ours = preprocess_images([sixteen], 490).pixel_values.numpy()
    assert np.abs(ours - expected).max() <= 1e-6
    clipped = reference([sixteen], max_image_size=490, return_tensors="np")["pixel_values"]
    assert np.abs(clipped - expected).max() > 0.5
    assert to_rgb(sixteen).getpixel((95, 63)) == ((6143 * 10) >> 8,) * 3  # last sample: index 96*64-1


def test_no_images_gives_empty_batch():
    out = preprocess_images([], 490)
    assert out.pixel_values.shape == (0, 3, 490, 490) and out.crops_per_image == ()


def test_zero_size_picture_is_an_image_error():
    with pytest.raises(ImageError, match="zero size"):
        preprocess_images([Image.new("RGB", (0, 5))], 490)


def test_bad_crop_size_is_a_usage_error():
    with pytest.raises(UsageError, match="image size"):
        preprocess_images([Image.new("RGB", (5, 5))], 0)


def test_tiny_crop_size_for_test_models():
    out = preprocess_images([Image.new("RGB", (100, 50), (1, 2, 3))], 28)
    assert out.pixel_values.shape == (1, 3, 28, 28)
    # The short-side floor (336 in Aria) cannot exceed the crop: 14 rows become 28.
    assert out.pixel_mask.all()


def test_keyed_transparency_of_wide_grey_pictures_goes_on_white(reference):
    # Mode I with a transparency key (8-bit values): exactly the reference, which composites the
    # keyed samples on white. A 16-bit PNG with tRNS: the same, on the hand-scaled 8-bit picture.
    samples = np.random.default_rng(0).integers(0, 256, (40, 60)).astype(np.int32)
    keyed = Image.fromarray(samples)
    keyed.info["transparency"] = int(samples[3, 5])
    assert keyed.mode == "I"
    _assert_matches_reference(reference, [keyed], 490)
    assert to_rgb(keyed).getpixel((5, 3)) == (255, 255, 255)

    ramp = (np.arange(40 * 60, dtype=np.uint32).reshape(40, 60) * 27).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "PNG", transparency=int(ramp[2, 7]))
    sixteen = load_image(buffer.getvalue())
    assert sixteen.mode.startswith("I") and "transparency" in sixteen.info
    eight = Image.fromarray((ramp >> 8).astype(np.uint8)).convert("RGBA")
    eight.putpixel((7, 2), (0, 0, 0, 0))
    expected = reference([eight], max_image_size=490, return_tensors="np")["pixel_values"]
    assert np.abs(preprocess_images([sixteen], 490).pixel_values.numpy() - expected).max() <= 1e-6
