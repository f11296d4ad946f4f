"""Three classes, one named with a space and accents, through the whole loop:
ingest -> train -> relabel to each class -> label new photos -> export the
model -> export the cleaned set and import it again."""

import json
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select

from db.engine import create_db_engine, session_scope
from db.labels import apply_action, class_names
from db.models import (
    DONE,
    HOLDOUT,
    POOL,
    RELABELLED,
    UNLABELLED,
    Photo,
    Prediction,
    TrainingRun,
)
from pipeline.export import ExportConfig, export_run
from pipeline.export_data import export_dataset
from pipeline.ingest import ingest_folder
from pipeline.train import TrainConfig, train_run
from pipeline.unlabelled import accept, label_queue, prelabel
from tests.conftest import real_photos

PATE = "pâté en croûte"
CLASSES = ["hot_dog", PATE, "salad"]


def generated_salad(path: Path, seed: int) -> None:
    """A green, leafy-noise JPEG: a class no real photo here belongs to."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 90, size=(120, 160, 3))
    pixels[..., 1] += rng.integers(100, 165, size=(120, 160))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path, "JPEG", quality=90)


def make_three_class_set(root: Path, train: int, test: int) -> Path:
    """Real hot dogs, real other food as "pâté en croûte", generated salads."""
    for split, count in (("train", train), ("test", test)):
        for source, label in (("hot_dog", "hot_dog"), ("not_hot_dog", PATE)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for photo in real_photos(split, source, count):
                (folder / photo.name).symlink_to(photo)
        for index in range(count):
            seed = index + (1000 if split == "test" else 0)
            generated_salad(root / split / "salad" / f"salade {index}.jpg", seed)
    unlabelled = root / "unlabelled"
    unlabelled.mkdir()
    (unlabelled / "new.jpg").symlink_to(real_photos("train", "hot_dog", 1, 30)[0])
    generated_salad(unlabelled / "verte.jpg", seed=5000)
    return root


def test_three_classes_with_a_non_ascii_name_go_through_the_loop(engine, workspace):
    data = make_three_class_set(workspace / "photos", train=6, test=3)

    # Ingest: three classes from the folder names, two photos without one.
    with session_scope(engine) as session:
        report = ingest_folder(session, data)
        assert report.skipped == [] and report.added == 29
        assert report.classes == {"hot_dog": 6, PATE: 6, "salad": 6}
        assert class_names(session) == CLASSES

    # Train: a three-class head; unlabelled photos are neither trained nor scored.
    config = TrainConfig(
        image_size=96, frozen_epochs=2, unfrozen_epochs=0, folds=2, tta=False
    )
    with session_scope(engine) as session:
        run = train_run(session, config)
        run_id = run.id
    with session_scope(engine) as session:
        run = session.get(TrainingRun, run_id)
        assert run.status == DONE and run.classes == CLASSES
        assert run.n_train == 18 and run.metrics["n_holdout"] == 9
        assert np.array(run.metrics["confusion"]).shape == (3, 3)
        assert run.metrics["train_class_counts"] == dict.fromkeys(CLASSES, 6)
        scored = session.scalars(
            select(Photo.split).join(Prediction).where(Prediction.run_id == run_id)
        ).all()
        assert sorted(set(scored)) == [HOLDOUT, POOL] and len(scored) == 27
        assert all(
            len(row.probs) == 3
            for row in session.scalars(
                select(Prediction).where(Prediction.run_id == run_id)
            )
        )

    # Relabel: one photo of each class to each of the other two.
    with session_scope(engine) as session:
        pool = session.scalars(
            select(Photo).where(Photo.split == POOL).order_by(Photo.id)
        ).all()
        by_class = {name: [p for p in pool if p.label == name] for name in CLASSES}
        moves = []
        for index, name in enumerate(CLASSES):
            target = CLASSES[(index + 1) % 3]
            photo = by_class[name][0]
            apply_action(session, photo.id, "relabel", new_label=target)
            moves.append((photo.id, name, target))
    with session_scope(engine) as session:
        for photo_id, old, new in moves:
            photo = session.get(Photo, photo_id)
            assert (photo.original_label, photo.label) == (old, new)
            assert photo.status == RELABELLED
        assert class_names(session) == CLASSES

    # Label the new photos: suggestions over three classes, then a person's pick.
    with session_scope(engine) as session:
        assert prelabel(session) == 2
        queue = label_queue(session)
        assert queue.total == 2
        for item in queue.items:
            assert sorted(name for name, _ in item.probabilities) == CLASSES
        first = queue.items[0].photo_id
        accept(session, first, PATE)
        assert session.get(Photo, first).split == POOL

    # Export the model: the sidecar names the three classes in output order.
    with session_scope(engine) as session:
        export = export_run(session, run_id, ExportConfig(format="onnx", check_limit=6))
        sidecar = json.loads(Path(export.sidecar_path).read_text())
    assert sidecar["labels"] == CLASSES
    assert sidecar["output"]["shape"] == [1, 3]
    assert sidecar["checks"]["agreement"] >= 0.99

    # Export the cleaned set; it imports into a fresh database as it was.
    out = workspace / "cleaned"
    with session_scope(engine) as session:
        summary = export_dataset(session, out)
        before = {
            sha: (split, label)
            for sha, split, label in session.execute(
                select(Photo.sha256, Photo.split, Photo.label)
            )
        }
    assert summary["classes"]["train"] == {"hot_dog": 6, PATE: 7, "salad": 6}
    assert (out / "train" / PATE).is_dir() and (out / "test" / PATE).is_dir()
    fresh = create_db_engine(f"sqlite:///{workspace / 'fresh.db'}")
    with session_scope(fresh) as session:
        report = ingest_folder(session, out)
        after = {
            sha: (split, label)
            for sha, split, label in session.execute(
                select(Photo.sha256, Photo.split, Photo.label)
            )
        }
        assert class_names(session) == CLASSES
    assert report.skipped == [] and after == before
    assert sum(split == UNLABELLED for split, _ in after.values()) == 1


def test_a_class_folder_named_in_nfd_gives_the_same_class_as_nfc(engine, workspace):
    """A folder copied from a Mac spells "é" as "e" plus a combining accent."""
    data = workspace / "photos"
    decomposed = unicodedata.normalize("NFD", PATE)
    assert decomposed != PATE
    for index in range(2):
        generated_salad(data / "train" / decomposed / f"{index}.jpg", seed=index)
        generated_salad(data / "test" / PATE / f"{index}.jpg", seed=10 + index)
        generated_salad(data / "train" / "salad" / f"{index}.jpg", seed=20 + index)
    with session_scope(engine) as session:
        ingest_folder(session, data)
        assert class_names(session) == [PATE, "salad"]
        labels = session.scalars(select(Photo.label).distinct()).all()
    assert sorted(labels) == [PATE, "salad"]
