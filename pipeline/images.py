"""Reading photos and turning them into model input, one rule for everything.

Training, scoring, the dashboard and the exported model's sidecar all use the
functions here, so the preprocessing cannot drift between them:

1. decode the file with Pillow, refusing decompression bombs;
2. apply the EXIF orientation tag;
3. convert to 8-bit RGB (`to_rgb`: alpha is composited on white, 16-bit
   greyscale is scaled down, CMYK and palette images are converted);
4. resize so the shorter side is `size` pixels (bilinear, antialiased);
5. crop the centre `size` x `size` square;
6. scale to [-1, 1] as `(x / 255 - 0.5) / 0.5`, channels RGB, layout NCHW.
"""

import hashlib
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

IMAGE_SIZE = 224
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
RESAMPLE = Image.Resampling.BILINEAR

# EXIF Orientation value -> the transpose that shows the photo upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class BadImageError(ValueError):
    """A file that cannot be used as a photo; the message says why."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB by one fixed rule.

    Transparent pixels become white; 16- and 32-bit greyscale is scaled to
    0-255 by its full range (not clipped); everything else uses Pillow's own
    conversion.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(array.max(), 1.0)
        if image.mode == "I" and array.max() <= 65535:
            top = 65535.0 if array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def apply_orientation(image: Image.Image) -> Image.Image:
    """Turn `image` upright by its EXIF Orientation tag (1 or none: as stored).

    Unlike `ImageOps.exif_transpose`, this never writes the EXIF block back,
    which fails on phone files whose other tags are malformed.
    """
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(method)


def upright_rgb(image: Image.Image) -> Image.Image:
    """Steps 2 and 3 for an image already decoded, such as an upload."""
    return to_rgb(apply_orientation(image))


def _check_pixel_count(image: Image.Image) -> None:
    """Refuse what Pillow would only warn about, before any pixel is decoded.

    `catch_warnings` swaps a process-wide filter list, so a thread leaving it
    can drop the filter set by another thread still inside: the warning then
    goes by and a huge image gets decoded. This check does not depend on it.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise Image.DecompressionBombError(
            f"{image.width} x {image.height} = {image.width * image.height} pixels, "
            f"over the limit of {limit}"
        )


def load_rgb(path: str | Path) -> Image.Image:
    """Decode `path` fully, upright and as RGB.

    Raises:
        BadImageError: empty, not an image, truncated, or too large to decode
            safely; the message names the file and the reason.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; treat the
            # warning as the error it is here, without lifting the limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_pixel_count(image)
                image.load()
                return upright_rgb(image).copy()
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(
            f"{path}: too many pixels to decode safely ({error})"
        ) from None
    except UnidentifiedImageError:
        raise BadImageError(f"{path}: not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImageError(f"{path}: cannot decode image ({error})") from None
    except Exception as error:
        # Pillow's parsers can fail on a malformed file with almost any
        # exception; one bad file must not stop an import of thousands.
        raise BadImageError(
            f"{path}: cannot decode image ({type(error).__name__}: {error})"
        ) from None


def resize_short(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """Resize so the shorter side is `size` pixels, keeping the aspect ratio."""
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new_size, RESAMPLE, reducing_gap=None)


def center_crop(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def crop_seed(sha256: str) -> int:
    """The seed of a photo's random crops: its content hash, not its place."""
    return int(sha256[:16], 16)


def random_crop(
    image: Image.Image, size: int, rng: np.random.Generator, min_area: float = 0.35
) -> Image.Image:
    """A random part of `image` resized to `size` x `size`, mirrored half the time.

    The part covers between `min_area` and all of the image's area, with a
    width-to-height ratio between 3:4 and 4:3; when ten draws do not fit, the
    centre square is used. For training only: inference uses `preprocess`.
    """
    width, height = image.size
    for _ in range(10):
        area = width * height * rng.uniform(min_area, 1.0)
        ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        crop_w = round((area * ratio) ** 0.5)
        crop_h = round((area / ratio) ** 0.5)
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            break
    else:
        crop_w = crop_h = min(width, height)
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
    part = image.crop((left, top, left + crop_w, top + crop_h))
    part = part.resize((size, size), RESAMPLE, reducing_gap=None)
    if rng.random() < 0.5:
        part = part.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return part


def to_array(image: Image.Image) -> np.ndarray:
    """An RGB image of side `size` as a normalised float32 array (3, H, W)."""
    array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    array = (array - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def preprocess(image: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """An upright RGB image as model input: (3, size, size) float32 in [-1, 1]."""
    return to_array(center_crop(resize_short(image, size), size))


def preprocess_file(path: str | Path, size: int = IMAGE_SIZE) -> np.ndarray:
    return preprocess(load_rgb(path), size)


def preprocessing_spec(size: int = IMAGE_SIZE) -> dict:
    """The preprocessing above, stated for a reader outside this project."""
    return {
        "decode": "any format Pillow reads; refuse images over Pillow's "
        "default decompression-bomb limit",
        "exif_orientation": "apply the EXIF Orientation tag before anything else",
        "color": "convert to 8-bit RGB; composite transparency on white "
        "(255, 255, 255); scale 16-bit greyscale by 255/65535",
        "resize": {
            "rule": "shorter side to size, keep aspect ratio, round other side",
            "size": size,
            "interpolation": "bilinear, antialiased (Pillow Image.BILINEAR)",
        },
        "crop": {
            "rule": "centre",
            "width": size,
            "height": size,
            "offset": "left = (width - size) // 2, top = (height - size) // 2",
        },
        "scale": {
            "formula": "(pixel / 255 - mean) / std",
            "mean": list(MEAN),
            "std": list(STD),
        },
        "channel_order": "RGB",
        "layout": "NCHW float32, batch size 1",
    }


def dhash(image: Image.Image, bits: int = 8) -> str:
    """Difference hash: one bit per horizontally adjacent pixel pair of a
    (bits+1) x bits greyscale thumbnail, as hex. Robust to resizing and
    recompression, not to crops or rotations."""
    small = image.convert("L").resize((bits + 1, bits), Image.Resampling.BILINEAR)
    pixels = np.asarray(small, dtype=np.int16)
    differences = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    value = int("".join("1" if d else "0" for d in differences), 2)
    return f"{value:0{bits * bits // 4}x}"


def hamming(a: str, b: str) -> int:
    """Number of differing bits between two hex hashes of equal length."""
    return (int(a, 16) ^ int(b, 16)).bit_count()
