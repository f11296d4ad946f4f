import json
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import select

from db.engine import create_db_engine, session_scope
from db.labels import apply_action
from db.models import EXCLUDED, HOLDOUT, POOL, UNLABELLED, LabelEvent, Photo
from pipeline.__main__ import main
from pipeline.export_data import MANIFEST_COLUMNS, export_dataset, new_dataset_dir
from pipeline.images import file_sha256
from pipeline.ingest import ingest_folder
from tests.conftest import real_photos


def _tree(out: Path) -> dict[str, tuple[str, str]]:
    """sha256 -> (top folder, class folder or "") of every file in the tree."""
    found = {}
    for path in out.rglob("*"):
        if path.is_file() and not path.name.startswith("manifest."):
            parts = path.relative_to(out).parts
            found[file_sha256(path)] = (parts[0], parts[1] if len(parts) > 2 else "")
    return found


def _labels(session) -> dict[str, tuple[str, str]]:
    rows = session.execute(select(Photo.sha256, Photo.split, Photo.label))
    return {sha: (split, label) for sha, split, label in rows}


@pytest.fixture
def cleaned(engine, small_set):
    """The small set plus one unlabelled photo, with one relabel and two exclusions.

    Returns the ids of (relabelled, excluded from the pool, excluded unlabelled).
    """
    folder = small_set / "unlabelled"
    folder.mkdir()
    for photo in real_photos("train", "not_hot_dog", 2, skip=20):
        (folder / photo.name).symlink_to(photo)
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        pool = session.scalars(
            select(Photo).where(Photo.split == POOL).order_by(Photo.id)
        ).all()
        relabelled, excluded = pool[0].id, pool[1].id
        apply_action(session, relabelled, "relabel", new_label="not_hot_dog")
        apply_action(session, excluded, "exclude")
        unlabelled = session.scalar(select(Photo.id).where(Photo.split == UNLABELLED))
        apply_action(session, unlabelled, "exclude", source="label")
    return relabelled, excluded, unlabelled


def test_manifest_lists_every_photo_and_the_tree_leaves_out_excluded_ones(
    engine, workspace, cleaned
):
    relabelled, excluded, excluded_unlabelled = cleaned
    out = workspace / "cleaned"
    with session_scope(engine) as session:
        summary = export_dataset(session, out)
        photos = {p.id: p for p in session.scalars(select(Photo))}
        events = dict(
            session.execute(select(LabelEvent.photo_id, LabelEvent.created_at)).all()
        )

    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert list(manifest.columns) == list(MANIFEST_COLUMNS)
    assert sorted(manifest["photo_id"]) == sorted(photos) and len(manifest) == 22
    assert summary["photos"] == 22 and summary["excluded"] == 2
    assert summary["in_tree"] == 20 and summary["missing"] == 0
    assert summary["linked"] + summary["copied"] == 20
    parquet = pd.read_parquet(out / "manifest.parquet")
    assert parquet.astype(str).equals(manifest.astype(str))

    rows = manifest.set_index("photo_id")
    tree = _tree(out)
    assert len(tree) == 20
    for photo_id in (excluded, excluded_unlabelled):
        assert photos[photo_id].sha256 not in tree
        assert rows.loc[photo_id, "exported_path"] == ""
        assert rows.loc[photo_id, "status"] == EXCLUDED
    # A relabelled photo is filed under its new class; the manifest keeps both.
    moved = photos[relabelled]
    assert tree[moved.sha256] == ("train", "not_hot_dog")
    assert rows.loc[relabelled, "label"] == "not_hot_dog"
    assert rows.loc[relabelled, "original_label"] == "hot_dog"
    assert (
        rows.loc[relabelled, "reason"] == "review: hot_dog → not_hot_dog (relabelled)"
    )
    assert rows.loc[excluded, "reason"] == "review: hot_dog (excluded)"
    # The last change is the last label event, or the import for untouched ones.
    changed = events[relabelled].isoformat(timespec="seconds")
    assert rows.loc[relabelled, "last_change"] == changed
    untouched = next(p for p in photos.values() if p.split == HOLDOUT)
    created = untouched.created_at.isoformat(timespec="seconds")
    assert rows.loc[untouched.id, "last_change"] == created
    for photo_id, photo in photos.items():
        exported = rows.loc[photo_id, "exported_path"]
        assert rows.loc[photo_id, "sha256"] == photo.sha256
        if exported:
            assert file_sha256(out / exported) == photo.sha256
    holdout = [p for p in photos.values() if p.split == HOLDOUT]
    assert all(tree[p.sha256] == ("test", p.label) for p in holdout)
    assert summary["classes"] == {
        "train": {"hot_dog": 4, "not_hot_dog": 7},
        "test": {"hot_dog": 4, "not_hot_dog": 4},
        "unlabelled": {"(no label)": 1},
    }


def test_the_tree_reimports_with_the_same_labels(engine, workspace, cleaned):
    out = workspace / "cleaned"
    with session_scope(engine) as session:
        export_dataset(session, out)
        before = {
            sha: where for sha, where in _labels(session).items() if sha in _tree(out)
        }

    fresh = create_db_engine(f"sqlite:///{workspace / 'fresh.db'}")
    with session_scope(fresh) as session:
        report = ingest_folder(session, out)
        after = _labels(session)
    assert report.skipped == [] and report.added == 20
    assert after == before


def test_fastai_reads_the_tree_as_it_is(engine, workspace, cleaned):
    from fastai.vision.all import ImageDataLoaders, Resize

    out = workspace / "cleaned"
    with session_scope(engine) as session:
        export_dataset(session, out)
    loaders = ImageDataLoaders.from_folder(
        out, train="train", valid="test", item_tfms=Resize(64), bs=4, num_workers=0
    )
    assert list(loaders.vocab) == ["hot_dog", "not_hot_dog"]
    assert (len(loaders.train_ds), len(loaders.valid_ds)) == (11, 8)


def test_photos_with_the_same_name_in_one_class_both_get_exported(engine, workspace):
    data = workspace / "photos"
    first, second = real_photos("train", "hot_dog", 2)
    other = real_photos("train", "not_hot_dog", 2)
    for index, photo in enumerate((first, second)):
        folder = data / "train" / "hot_dog" / f"batch{index}"
        folder.mkdir(parents=True)
        (folder / "IMG_0001.jpg").symlink_to(photo)
    (data / "train" / "not_hot_dog").mkdir(parents=True)
    for photo in other:
        (data / "train" / "not_hot_dog" / photo.name).symlink_to(photo)
    out = workspace / "cleaned"
    with session_scope(engine) as session:
        ingest_folder(session, data)
        summary = export_dataset(session, out)
    names = sorted(p.name for p in (out / "train" / "hot_dog").iterdir())
    assert summary["in_tree"] == 4 and len(names) == 2
    renamed = next(name for name in names if name != "IMG_0001.jpg")
    assert "IMG_0001.jpg" in names
    assert renamed.startswith("IMG_0001-") and renamed.endswith(".jpg")
    assert {file_sha256(out / "train" / "hot_dog" / n) for n in names} == {
        file_sha256(first),
        file_sha256(second),
    }


def test_a_photo_whose_file_is_gone_stays_in_the_manifest(engine, small_set, workspace):
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
    gone = sorted((small_set / "test" / "hot_dog").iterdir())[0]
    gone.unlink()
    out = workspace / "cleaned"
    with session_scope(engine) as session:
        summary = export_dataset(session, out)
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert (summary["photos"], summary["in_tree"], summary["missing"]) == (20, 19, 1)
    assert manifest.loc[manifest["path"] == str(gone), "exported_path"].item() == ""


def test_an_export_never_writes_into_a_folder_with_files(engine, small_set, workspace):
    out = workspace / "cleaned"
    out.mkdir()
    (out / "old.txt").write_text("from before")
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        with pytest.raises(ValueError, match="not an empty folder"):
            export_dataset(session, out)
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_cli_export_data_writes_under_the_given_folder(
    engine, small_set, workspace, capsys
):
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
    out = workspace / "from cli"
    assert main(["export-data", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["photos"] == 20 and Path(summary["manifest"]).is_file()
    assert main(["export-data", "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_new_dataset_dirs_are_new_each_time(workspace):
    first, second = new_dataset_dir(), new_dataset_dir()
    assert first != second and first.parent == second.parent
    assert first.parent.name == "datasets" and not any(first.iterdir())
