"""Shared fixtures: a private database per test and small sets of real photos.

Photo sets are built from the real Seefood photos by symbolic link, so the
tests read real JPEGs without copying them.
"""

import os
import sys
from pathlib import Path

import pytest

from db.engine import get_engine
from db.settings import PROJECT_ROOT

SEEFOOD = Path(
    os.environ.get("SEEFOOD_DIR", PROJECT_ROOT.parent / "shared/data/seefood")
)
CLASSES = ("hot_dog", "not_hot_dog")


def real_photos(split: str, label: str, count: int, skip: int = 0) -> list[Path]:
    """The first `count` real photos of one class, after `skip`, by file name."""
    folder = SEEFOOD / split / label
    if not folder.is_dir():
        pytest.fail(f"real photos missing: {folder} (set SEEFOOD_DIR)")
    return sorted(folder.glob("*.jpg"))[skip : skip + count]


def make_photo_set(
    root: Path, train_per_class: int, test_per_class: int, skip: int = 0
) -> Path:
    """A class-folder set under `root` linking to real Seefood photos."""
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label in CLASSES:
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for photo in real_photos(split, label, count, skip):
                (folder / photo.name).symlink_to(photo)
    return root


@pytest.fixture(autouse=True)
def _restore_main_module():
    """Put back the `__main__` module that an AppTest run replaces.

    Streamlit's script runner installs the app script as `__main__` and leaves
    it there. A process started later with the "spawn" method would then run
    the whole dashboard script before its own target.
    """
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Point DATABASE_URL, ARTIFACT_DIR and DATA_DIR at a fresh temp folder."""
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'studio.db'}")
    monkeypatch.setenv("ARTIFACT_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "photos"))
    return tmp_path


@pytest.fixture
def engine(workspace):
    return get_engine()


@pytest.fixture
def small_set(workspace) -> Path:
    """6 pool and 4 holdout real photos per class, under DATA_DIR."""
    return make_photo_set(workspace / "photos", train_per_class=6, test_per_class=4)
