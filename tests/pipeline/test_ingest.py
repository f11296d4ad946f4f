import pytest
from sqlalchemy import func, select

from db.engine import session_scope
from db.models import HOLDOUT, POOL, Photo, SkippedFile
from pipeline.ingest import ingest_folder


def test_ingest_imports_pool_and_holdout_with_folder_labels(engine, small_set):
    with session_scope(engine) as session:
        report = ingest_folder(session, small_set)
    assert report.added == 20 and report.skipped == []
    with session_scope(engine) as session:
        rows = session.execute(
            select(Photo.split, Photo.label, func.count()).group_by(
                Photo.split, Photo.label
            )
        ).all()
        assert sorted(rows) == [
            (HOLDOUT, "hot_dog", 4),
            (HOLDOUT, "not_hot_dog", 4),
            (POOL, "hot_dog", 6),
            (POOL, "not_hot_dog", 6),
        ]
        photo = session.scalars(select(Photo)).first()
        assert photo.width > 0 and photo.height > 0 and len(photo.sha256) == 64


def test_second_ingest_adds_nothing(engine, small_set):
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
    with session_scope(engine) as session:
        report = ingest_folder(session, small_set)
    assert (report.added, report.already_known) == (0, 20)
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Photo)) == 20


def test_bad_files_are_recorded_and_the_rest_imported(engine, small_set):
    folder = small_set / "train" / "hot_dog"
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "page.jpg").write_text("<html>404</html>")
    good = sorted(folder.glob("*.jpg"))[0].read_bytes()
    (folder / "copy of first.jpg").write_bytes(good)
    with session_scope(engine) as session:
        report = ingest_folder(session, small_set)
    assert report.added == 20
    with session_scope(engine) as session:
        reasons = {
            row.path.rsplit("/", 1)[-1]: row.reason
            for row in session.scalars(select(SkippedFile))
        }
    assert set(reasons) == {"empty.jpg", "page.jpg", "copy of first.jpg"}
    assert "empty" in reasons["empty.jpg"]
    assert "not an image" in reasons["page.jpg"]
    assert "duplicate" in reasons["copy of first.jpg"]


def test_a_holdout_copy_of_a_pool_photo_is_reported(engine, small_set):
    source = sorted((small_set / "train" / "hot_dog").glob("*.jpg"))[0]
    (small_set / "test" / "hot_dog" / "leak.jpg").write_bytes(source.read_bytes())
    with session_scope(engine) as session:
        report = ingest_folder(session, small_set)
    ((path, reason),) = report.skipped
    assert path.endswith("leak.jpg") and source.name in reason


def test_missing_folder_error_names_it(engine, tmp_path):
    missing = tmp_path / "nowhere"
    with (
        pytest.raises(FileNotFoundError, match="nowhere"),
        session_scope(engine) as session,
    ):
        ingest_folder(session, missing)
