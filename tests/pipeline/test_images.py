import numpy as np
import pytest
from PIL import Image

from pipeline.images import (
    BadImageError,
    center_crop,
    load_rgb,
    preprocess,
    preprocess_file,
    random_crop,
    resize_short,
    to_rgb,
)
from tests.conftest import real_photos


def test_preprocess_gives_normalised_rgb_nchw():
    photo = real_photos("train", "hot_dog", 1)[0]
    array = preprocess_file(photo, 96)
    assert array.shape == (3, 96, 96) and array.dtype == np.float32
    assert -1.0 <= array.min() < -0.5 and 0.5 < array.max() <= 1.0
    # Channel 0 is red: a pure red image gives (1, -1, -1).
    red = preprocess(Image.new("RGB", (50, 80), (255, 0, 0)), 32)
    assert np.allclose(red[:, 0, 0], [1.0, -1.0, -1.0])


@pytest.mark.parametrize(
    ("size", "expected"), [((640, 480), (299, 224)), ((300, 900), (224, 672))]
)
def test_resize_short_keeps_aspect_then_centre_crop(size, expected):
    resized = resize_short(Image.new("RGB", size), 224)
    assert resized.size == expected
    assert center_crop(resized, 224).size == (224, 224)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] + [0] * 765)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    image = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert image.mode.startswith("I;16")
    assert to_rgb(image).getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_becomes_rgb():
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0))).getpixel((0, 0)) == (
        255,
        0,
        0,
    )


def test_exif_orientation_is_applied(tmp_path):
    upright = Image.new("RGB", (40, 20), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 20, 20))  # red on the left half
    # Stored rotated by 90 degrees; Orientation 6 says "rotate 90 CW to view".
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    loaded = load_rgb(path)
    assert loaded.size == (40, 20)
    assert loaded.getpixel((5, 10))[0] > 200 and loaded.getpixel((35, 10))[2] > 200


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"<html><body>not a photo</body></html>", "not an image"),
    ],
)
def test_unreadable_files_raise_with_the_file_name(tmp_path, content, reason):
    path = tmp_path / "broken photo.jpg"
    path.write_bytes(content)
    with pytest.raises(BadImageError, match=reason) as caught:
        load_rgb(path)
    assert "broken photo.jpg" in str(caught.value)


def test_truncated_jpeg_is_refused(tmp_path):
    data = real_photos("train", "hot_dog", 1)[0].read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="cut.jpg"):
        load_rgb(path)


def _striped(width: int, height: int) -> Image.Image:
    """An image whose pixel (x, y) is (x, y, 0) scaled to 0-255: crops show where."""
    xs = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    pixels = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).round().astype(np.uint8)
    return Image.fromarray(pixels)


def test_random_crops_are_reproducible_sized_and_vary():
    image = _striped(400, 300)
    first = [random_crop(image, 64, rng) for rng in [np.random.default_rng(5)] * 4]
    again = [random_crop(image, 64, rng) for rng in [np.random.default_rng(5)] * 4]
    assert all(c.size == (64, 64) for c in first)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # Four draws from one generator are four different parts of the image.
    means = {
        tuple(np.asarray(c, dtype=float).mean(axis=(0, 1)).round(1)) for c in first
    }
    assert len(means) == 4


def test_random_crop_covers_at_least_the_minimum_area():
    image = _striped(400, 400)
    rng = np.random.default_rng(0)
    for _ in range(20):
        crop = np.asarray(random_crop(image, 32, rng, min_area=0.5), dtype=float)
        # The red channel runs 0-255 across the full width: a crop spanning at
        # least sqrt(0.5 * 3/4) of it shows a range of at least that share.
        span = crop[..., 0].max() - crop[..., 0].min()
        assert span >= 255 * (0.5 * 3 / 4) ** 0.5 * 0.9


def test_random_crop_of_a_tiny_image_still_has_the_asked_size():
    crop = random_crop(_striped(3, 2), 16, np.random.default_rng(1))
    assert crop.size == (16, 16)
