"""Shared fixtures: a private database per test and small sets of real photos.

Photo sets are built from the real Seefood photos by symbolic link, so the
tests read real JPEGs without copying them.
"""

import os
import sys
from pathlib import Path

import pytest

from db.engine import get_engine
from db.models import DONE, Photo, Prediction, TrainingRun
from db.settings import PROJECT_ROOT
from pipeline.images import load_rgb
from pipeline.scoring import HOLDOUT_KIND

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


def resized_copy(source: Path, target: Path) -> Path:
    """A half-size JPEG of `source` at `target`: a near duplicate, not an exact one."""
    image = load_rgb(source)
    small = image.resize((image.width // 2, image.height // 2))
    target.parent.mkdir(parents=True, exist_ok=True)
    small.save(target, "JPEG", quality=80)
    return target


def add_run(
    session, predicted: dict[int, str], classes: tuple[str, ...] = CLASSES
) -> TrainingRun:
    """A finished run that predicted class `predicted[id]` for holdout photo `id`.

    Its accuracy and confusion matrix are worked out from those predictions,
    as training would.
    """
    run = TrainingRun(config={}, classes=list(classes), status=DONE)
    session.add(run)
    session.flush()
    index = {name: i for i, name in enumerate(classes)}
    confusion = [[0] * len(classes) for _ in classes]
    for photo_id, label in predicted.items():
        photo = session.get(Photo, photo_id)
        probs = [0.9 if name == label else 0.1 / (len(classes) - 1) for name in classes]
        session.add(
            Prediction(
                run_id=run.id,
                photo_id=photo_id,
                kind=HOLDOUT_KIND,
                probs=probs,
                given_label=photo.label,
                predicted_label=label,
                confidence=max(probs),
                score=1.0 - probs[index[photo.label]],
            )
        )
        confusion[index[photo.label]][index[label]] += 1
    right = sum(row[i] for i, row in enumerate(confusion))
    run.metrics = {
        "accuracy_holdout": right / len(predicted) if predicted else None,
        "n_holdout": len(predicted),
        "confusion": confusion,
    }
    session.flush()
    return run


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
