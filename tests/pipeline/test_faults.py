"""Files that break importers, next to real photos: each one imported right or
skipped with a reason that names the problem, and the import goes on."""

import os
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from db.engine import session_scope
from db.models import Photo, SkippedFile, TrainingRun
from pipeline.images import BadImageError, load_rgb
from pipeline.ingest import ingest_folder
from tests.conftest import real_photos

UNICODE_NAME = "Hot Dog – Café 日本 #1.jpg"
LATIN1_NAME = b"caf\xe9 menu.jpg"  # not UTF-8, as unzipped from an old archive

# name -> (width, height) as recorded, and (x, y) -> RGB after `load_rgb`.
GOOD = {
    "cmyk.jpg": ((40, 30), {(20, 15): (255, 0, 0)}),
    "grey8.png": ((41, 30), {(20, 15): (77, 77, 77)}),
    "grey16.png": ((42, 30), {(0, 0): (0, 0, 0), (1, 0): (128, 128, 128)}),
    "grey-alpha.png": ((43, 30), {(0, 0): (255, 255, 255), (30, 0): (90, 90, 90)}),
    "palette.png": ((44, 30), {(0, 0): (255, 255, 255), (30, 0): (200, 0, 0)}),
    "rgba.png": (
        (45, 30),
        {(0, 0): (255, 255, 255), (15, 0): (0, 0, 255), (30, 0): (127, 127, 127)},
    ),
    "phone.jpg": ((40, 20), {(5, 10): (255, 0, 0), (35, 10): (0, 0, 255)}),
    "phone-odd-exif.jpg": ((44, 22), {(5, 10): (255, 0, 0), (39, 10): (0, 0, 255)}),
    "photo.webp": ((46, 30), {(20, 15): (0, 200, 0)}),
    "animated.gif": ((47, 30), {(20, 15): (255, 0, 0)}),
    UNICODE_NAME: ((48, 30), {(20, 15): (0, 128, 255)}),
}
LOSSY_TOLERANCE = 8

# name -> what the reason must say.
BAD = {
    "empty.jpg": "empty file",
    "page.jpg": "not an image",
    "notes.jpg": "not an image",
    "cut.jpg": "truncated",
    "bomb.png": "too many pixels",
    "caf\\xe9 menu.jpg": "not valid UTF-8",  # stored with the byte escaped
    "moved.jpg": "No such file",  # a link whose target is gone
}


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming `width` x `height`, no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _sideways(width: int, height: int) -> Image.Image:
    """Red left half, blue right half when upright; stored rotated 90 degrees."""
    upright = Image.new("RGB", (width, height), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, width // 2, height))
    return upright.transpose(Image.Transpose.ROTATE_90)


def _write_good_files(folder: Path) -> None:
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.new("L", (41, 30), 77).save(folder / "grey8.png")
    grey16 = np.full((30, 42), 32768, dtype=np.uint16)
    grey16[:, 0] = 0
    Image.fromarray(grey16).save(folder / "grey16.png")

    grey_alpha = Image.new("LA", (43, 30), (90, 255))
    grey_alpha.paste((0, 0), (0, 0, 20, 30))
    grey_alpha.save(folder / "grey-alpha.png")

    palette = Image.new("P", (44, 30), 1)
    palette.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    palette.paste(0, (0, 0, 20, 30))
    palette.save(folder / "palette.png", transparency=0)

    rgba = Image.new("RGBA", (45, 30), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (10, 0, 20, 30))
    rgba.paste((0, 0, 0, 128), (25, 0, 45, 30))
    rgba.save(folder / "rgba.png")

    # Stored on its side; the Orientation tag (6: rotate 90 CW) makes it upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    _sideways(40, 20).save(folder / "phone.jpg", exif=exif, quality=95)
    # Same, with a text tag whose id says "number", as some phones write:
    # Pillow reads it but cannot write that EXIF block back.
    exif[0x0132] = "2024:01:01 00:00:00"
    odd = exif.tobytes()
    assert odd.count(b"\x01\x32\x00\x02") == 1
    odd = odd.replace(b"\x01\x32\x00\x02", b"\x01\x15\x00\x02")
    _sideways(44, 22).save(folder / "phone-odd-exif.jpg", exif=odd, quality=95)

    Image.new("RGB", (46, 30), (0, 200, 0)).save(folder / "photo.webp", lossless=True)
    frames = [Image.new("RGB", (47, 30), colour) for colour in ("red", "blue")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (48, 30), (0, 128, 255)).save(folder / UNICODE_NAME, quality=95)


def _write_bad_files(folder: Path) -> None:
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "page.jpg").write_text("<!doctype html><html><body>404</body></html>")
    (folder / "notes.jpg").write_text("hot dog, not hot dog\n")
    whole = real_photos("train", "hot_dog", 1)[0].read_bytes()
    (folder / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    (folder / "moved.jpg").symlink_to(folder / "no longer here.jpg")
    with open(os.fsencode(folder) + b"/" + LATIN1_NAME, "wb") as handle:
        Image.new("RGB", (49, 30), (1, 2, 3)).save(handle, "JPEG")


@pytest.fixture
def faulty_set(small_set) -> Path:
    """The small real set, with one file of each awkward kind among hot dogs."""
    folder = small_set / "train" / "hot_dog"
    _write_good_files(folder)
    _write_bad_files(folder)
    return small_set.resolve()


def _photos(engine) -> dict[str, Photo]:
    with session_scope(engine) as session:
        return {Path(p.path).name: p for p in session.scalars(select(Photo))}


def _skipped(engine) -> dict[str, str]:
    with session_scope(engine) as session:
        rows = session.scalars(select(SkippedFile))
        return {row.path.rsplit("/", 1)[-1]: row.reason for row in rows}


def _pixel_errors(path: str, expected: dict) -> list[str]:
    image = load_rgb(path)
    errors = []
    for xy, colour in expected.items():
        got = image.getpixel(xy)
        if max(abs(a - b) for a, b in zip(got, colour, strict=True)) > LOSSY_TOLERANCE:
            errors.append(f"{Path(path).name} {xy}: {got}, expected {colour}")
    return errors


def test_awkward_good_files_are_imported_upright_as_rgb(engine, faulty_set):
    with session_scope(engine) as session:
        ingest_folder(session, faulty_set)
    photos = _photos(engine)

    sizes = {name: (photos[name].width, photos[name].height) for name in GOOD}
    assert sizes == {name: size for name, (size, _) in GOOD.items()}
    assert {photos[name].label for name in GOOD} == {"hot_dog"}
    assert {photos[name].original_label for name in GOOD} == {"hot_dog"}
    errors = [
        e for n, (_, px) in GOOD.items() for e in _pixel_errors(photos[n].path, px)
    ]
    assert errors == []
    assert load_rgb(photos["grey16.png"].path).mode == "RGB"
    stored = photos[UNICODE_NAME].path
    assert stored == str(faulty_set / "train" / "hot_dog" / UNICODE_NAME)
    assert Path(stored).is_file()


def test_bad_files_are_skipped_with_the_reason_and_the_rest_imported(
    engine, faulty_set
):
    with session_scope(engine) as session:
        report = ingest_folder(session, faulty_set)

    skipped = _skipped(engine)
    assert set(skipped) == set(BAD)
    wrong = {n: r for n, r in skipped.items() if BAD[n].lower() not in r.lower()}
    assert wrong == {}
    assert re.search(r"10000000000 pixels", skipped["bomb.png"])
    assert report.added == 20 + len(GOOD) and len(report.skipped) == len(BAD)
    real = {str(p) for p in faulty_set.rglob("*") if p.is_symlink() and p.exists()}
    with session_scope(engine) as session:
        paths = set(session.scalars(select(Photo.path)))
    assert len(real) == 20 and real <= paths


def test_an_unexpected_decoder_error_skips_the_file_not_the_import(
    engine, small_set, monkeypatch
):
    folder = small_set / "train" / "hot_dog"
    Image.new("RGB", (40, 30), "red").save(folder / "odd.png")
    open_image = Image.open

    def open_or_fail(path, *args, **kwargs):
        if Path(path).name == "odd.png":
            raise struct.error("unpack requires a buffer of 4 bytes")
        return open_image(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_or_fail)
    with session_scope(engine) as session:
        report = ingest_folder(session, small_set)

    assert report.added == 20
    assert _skipped(engine) == {
        "odd.png": "cannot decode image (error: unpack requires a buffer of 4 bytes)"
    }


def test_a_truncated_jpeg_fails_only_when_its_pixels_decode(faulty_set):
    cut = faulty_set / "train" / "hot_dog" / "cut.jpg"
    with Image.open(cut) as image:
        assert image.width > 0 and image.format == "JPEG"
    with pytest.raises(BadImageError, match="truncated"):
        load_rgb(cut)


def test_importing_again_with_bad_files_present_changes_nothing(engine, faulty_set):
    with session_scope(engine) as session:
        ingest_folder(session, faulty_set)
    photos_before = {n: (p.id, p.version, p.sha256) for n, p in _photos(engine).items()}
    skipped_before = _skipped(engine)

    with session_scope(engine) as session:
        report = ingest_folder(session, faulty_set)

    assert (report.added, report.already_known) == (0, 20 + len(GOOD))
    photos_after = {n: (p.id, p.version, p.sha256) for n, p in _photos(engine).items()}
    assert photos_after == photos_before
    assert _skipped(engine) == skipped_before


def test_a_fixed_file_imports_and_leaves_the_skipped_list(engine, faulty_set):
    folder = faulty_set / "train" / "hot_dog"
    with session_scope(engine) as session:
        ingest_folder(session, faulty_set)
    (folder / "cut.jpg").write_bytes(
        real_photos("train", "hot_dog", 1, skip=10)[0].read_bytes()
    )
    Image.new("RGB", (50, 30), (9, 9, 9)).save(folder / "empty.jpg", "JPEG")

    with session_scope(engine) as session:
        report = ingest_folder(session, faulty_set)

    assert report.added == 2
    assert set(_skipped(engine)) == set(BAD) - {"cut.jpg", "empty.jpg"}
    photos = _photos(engine)
    assert (photos["empty.jpg"].width, photos["empty.jpg"].height) == (50, 30)
    assert photos["cut.jpg"].label == "hot_dog"


@pytest.fixture
def tiny_pixel_limit(monkeypatch):
    """Pillow's limit lowered to 1000 pixels: it warns above, refuses above 2x."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)


def test_images_over_the_pixel_limit_are_skipped(engine, workspace, tiny_pixel_limit):
    folder = workspace / "photos" / "train" / "hot_dog"
    folder.mkdir(parents=True)
    Image.new("RGB", (30, 30), "red").save(folder / "fits.png")  # 900
    Image.new("RGB", (40, 30), "red").save(folder / "warned.png")  # 1200: 1x-2x
    Image.new("RGB", (50, 50), "red").save(folder / "refused.png")  # 2500: > 2x

    with session_scope(engine) as session:
        report = ingest_folder(session, workspace / "photos")

    assert report.added == 1 and set(_photos(engine)) == {"fits.png"}
    skipped = _skipped(engine)
    assert set(skipped) == {"warned.png", "refused.png"}
    assert all("too many pixels" in reason for reason in skipped.values())


def test_pixel_limit_holds_when_another_thread_resets_warning_filters(
    tmp_path, tiny_pixel_limit, monkeypatch
):
    # A thread leaving `warnings.catch_warnings` restores the filter list it
    # saved, dropping the "error" filter this thread set; simulate that.
    monkeypatch.setattr(warnings, "simplefilter", lambda *args, **kwargs: None)
    path = tmp_path / "warned.png"
    Image.new("RGB", (40, 30), "red").save(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        with pytest.raises(BadImageError, match="too many pixels"):
            load_rgb(path)


def _class_folders(root: Path, counts: dict[str, int]) -> Path:
    for label, count in counts.items():
        folder = root / "train" / label
        folder.mkdir(parents=True)
        for photo in real_photos("train", label, count):
            (folder / photo.name).symlink_to(photo)
    return root


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ({"hot_dog": 6}, r"two classes with photos; found \{'hot_dog': 6\}"),
        (
            {"hot_dog": 6, "not_hot_dog": 0},
            r"two classes with photos; found \{'hot_dog': 6\}",
        ),
        ({"hot_dog": 6, "not_hot_dog": 1}, r"class 'not_hot_dog' has 1 photo"),
    ],
    ids=["single-class-folder", "empty-class-folder", "one-photo-class"],
)
def test_folders_that_cannot_train_are_refused_before_training(
    engine, workspace, counts, message
):
    from pipeline.train import NotTrainableError, TrainConfig, train_run

    root = _class_folders(workspace / "photos", counts)
    with session_scope(engine) as session:
        report = ingest_folder(session, root)
    empty = [str(root.resolve() / "train" / n) for n, c in counts.items() if c == 0]
    assert report.empty_folders == empty
    assert all(f"{folder} holds no files" in report.summary() for folder in empty)

    with (
        pytest.raises(NotTrainableError, match=message),
        session_scope(engine) as session,
    ):
        train_run(session, TrainConfig())
    with session_scope(engine) as session:
        assert session.scalars(select(TrainingRun)).all() == []
