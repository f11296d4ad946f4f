import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from db.engine import session_scope
from db.labels import (
    ACCEPT_SOURCE,
    StaleLabelError,
    apply_action,
    class_names,
    undo_event,
)
from db.models import (
    CONFIRMED,
    DONE,
    EXCLUDED,
    NO_LABEL,
    POOL,
    UNLABELLED,
    UNREVIEWED,
    LabelEvent,
    Photo,
    Prediction,
    TrainingRun,
)
from db.settings import get_settings
from pipeline.images import crop_seed
from pipeline.infer import predict_probs
from pipeline.ingest import ingest_folder
from pipeline.model import create_model, load_weights, save_weights
from pipeline.unlabelled import (
    ADDED,
    KNOWN,
    PRELABEL,
    REFUSED,
    accept,
    add_uploads,
    label_queue,
    margin,
    prelabel,
    unsuggested_count,
)
from tests.conftest import CLASSES, real_photos

SIZE = 96


def _unlabelled_folder(data_dir, count: int):
    """`count` real photos, not in the small set, under DATA_DIR/unlabelled."""
    folder = data_dir / "unlabelled"
    folder.mkdir(parents=True, exist_ok=True)
    photos = real_photos("train", "hot_dog", count, skip=20)
    for photo in photos:
        (folder / photo.name).symlink_to(photo)
    return photos


def _unlabelled_ids(session) -> list[int]:
    return list(
        session.scalars(
            select(Photo.id).where(Photo.split == UNLABELLED).order_by(Photo.id)
        )
    )


def _fake_run(session, classes=CLASSES) -> TrainingRun:
    """A finished run whose model is the ImageNet body with a random head.

    Its suggestions differ from photo to photo, which is all ranking needs;
    training a real one is left to the tests that need its accuracy.
    """
    torch.manual_seed(0)
    path = get_settings().artifact_dir / "runs" / "fake" / "model.pt"
    save_weights(create_model(len(classes)), path)
    run = TrainingRun(
        status=DONE,
        config={"image_size": SIZE, "tta": False},
        classes=list(classes),
        artifact_path=str(path),
    )
    session.add(run)
    session.flush()
    return run


def test_unlabelled_folder_imports_without_label_or_class(engine, small_set):
    _unlabelled_folder(small_set, 2)
    with session_scope(engine) as session:
        report = ingest_folder(session, small_set)
    assert report.added == 22 and report.unlabelled == 2
    assert "2 files under unlabelled/ await a label" in report.summary()
    with session_scope(engine) as session:
        photos = session.scalars(select(Photo).where(Photo.split == UNLABELLED)).all()
        assert [(p.label, p.original_label, p.status) for p in photos] == [
            (NO_LABEL, NO_LABEL, UNREVIEWED)
        ] * 2
        # The empty label is no class: training, relabels and exports ignore it.
        assert class_names(session) == list(CLASSES)
    with session_scope(engine) as session:
        assert ingest_folder(session, small_set).added == 0


def test_unlabelled_photos_are_never_trained_on(engine, small_set):
    from pipeline.train import select_photos

    _unlabelled_folder(small_set, 2)
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        unlabelled = set(_unlabelled_ids(session))
        pool = select_photos(session, POOL, None)
        assert len(pool) == 12 and not unlabelled & {p.id for p in pool}


def test_the_same_photo_uploaded_twice_is_one_row(engine, small_set):
    photo = real_photos("train", "hot_dog", 1, skip=20)[0]
    data = photo.read_bytes()
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        first = add_uploads(session, [("lunch.JPG", data), ("again.jpeg", data)])
    with session_scope(engine) as session:
        second = add_uploads(session, [("third time.jpg", data)])
        rows = session.scalars(select(Photo).where(Photo.split == UNLABELLED)).all()

    assert [r.outcome for r in first + second] == [ADDED, KNOWN, KNOWN]
    assert len(rows) == 1
    assert {r.photo_id for r in first + second} == {rows[0].id}
    assert "waiting for a label" in second[0].reason
    # Stored once, named by content, with the suffix of the format inside.
    uploads = get_settings().artifact_dir / "uploads"
    assert [p.name for p in uploads.iterdir()] == [f"{rows[0].sha256}.jpg"]
    assert rows[0].path == str(uploads / f"{rows[0].sha256}.jpg")
    assert (rows[0].label, rows[0].status) == (NO_LABEL, UNREVIEWED)


def test_an_upload_of_a_pool_photo_says_where_it_is(engine, small_set):
    pool_photo = sorted((small_set / "train" / "hot_dog").iterdir())[0]
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        (result,) = add_uploads(session, [("x.jpg", pool_photo.read_bytes())])
    assert result.outcome == KNOWN
    assert "in the pool, labelled hot_dog" in result.reason


def test_bad_uploads_are_refused_with_a_reason_and_not_kept(engine, small_set):
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        results = add_uploads(
            session,
            [
                ("empty.jpg", b""),
                ("page.jpg", b"<html>404</html>"),
                ("cut.jpg", b"\xff\xd8\xff"),
            ],
        )
        count = session.scalar(
            select(func.count()).select_from(Photo).where(Photo.split == UNLABELLED)
        )
    assert [r.outcome for r in results] == [REFUSED] * 3
    assert "empty" in results[0].reason
    assert "not an image" in results[1].reason
    assert (
        results[2].reason and str(get_settings().artifact_dir) not in results[2].reason
    )
    assert count == 0
    assert list((get_settings().artifact_dir / "uploads").iterdir()) == []


def test_prelabel_stores_the_run_probabilities_and_the_queue_is_least_sure_first(
    engine, small_set
):
    _unlabelled_folder(small_set, 5)
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        run = _fake_run(session)
        assert prelabel(session, run) == 5
        # Done once per run and photo, unless asked again.
        assert prelabel(session, run) == 0
        assert unsuggested_count(session, run.id) == 0
        queue = label_queue(session)
        photos = {p.id: p for p in session.scalars(select(Photo))}

    assert queue.total == 5 and queue.run_id == run.id
    model = load_weights(run.artifact_path, 2)
    paths = [photos[item.photo_id].path for item in queue.items]
    expected = predict_probs(model, paths, SIZE)
    for item, probs in zip(queue.items, expected, strict=True):
        assert item.suggested == CLASSES[int(probs.argmax())]
        assert item.confidence == pytest.approx(probs.max(), abs=1e-4)
        assert dict(item.probabilities) == pytest.approx(
            dict(zip(CLASSES, probs.tolist(), strict=True)), abs=1e-4
        )
    margins = [margin(probs) for probs in expected]
    assert margins == sorted(margins)
    assert len(set(np.round(margins, 4))) > 1, "the test needs differing margins"
    assert [item.margin for item in queue.items] == pytest.approx(margins, abs=1e-4)


def test_a_head_only_run_suggests_from_cached_features_as_from_the_photos(
    engine, small_set
):
    """A run whose body is ImageNet's suggests from cached features of each
    view, with the probabilities the whole network gives on those views."""
    _unlabelled_folder(small_set, 3)
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        run = _fake_run(session)
        run.config = {
            "image_size": SIZE,
            "tta": True,
            "tta_crops": 2,
            "head_on_features": True,
            "frozen_epochs": 5,
            "unfrozen_epochs": 0,
        }
        assert prelabel(session, run) == 3
        photos = list(
            session.scalars(
                select(Photo).where(Photo.split == UNLABELLED).order_by(Photo.id)
            )
        )
        stored = {
            row.photo_id: row.probs
            for row in session.scalars(
                select(Prediction).where(Prediction.kind == PRELABEL)
            )
        }

    # The features path ran: the crops of every unlabelled photo are cached.
    crops = get_settings().artifact_dir / "embeddings" / f"imagenet-{SIZE}-crops2.npz"
    with np.load(crops) as cache:
        assert {p.sha256 for p in photos} <= set(cache["keys"].tolist())
    model = load_weights(run.artifact_path, 2)
    expected = predict_probs(
        model,
        [p.path for p in photos],
        SIZE,
        tta=True,
        crops=2,
        crop_seeds=[crop_seed(p.sha256) for p in photos],
    )
    assert np.allclose([stored[p.id] for p in photos], expected, atol=1e-4)


def test_photos_without_a_suggestion_come_last_and_new_uploads_get_one(
    engine, small_set
):
    _unlabelled_folder(small_set, 2)
    late = real_photos("train", "not_hot_dog", 1, skip=20)[0]
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        run = _fake_run(session)
        prelabel(session, run)
        (upload,) = add_uploads(session, [(late.name, late.read_bytes())])
        queue = label_queue(session)
        assert [item.photo_id for item in queue.items][-1] == upload.photo_id
        assert queue.items[-1].suggested is None
        assert unsuggested_count(session, run.id) == 1
        assert prelabel(session, run) == 1
        assert label_queue(session).items[-1].suggested is not None


def test_prelabel_needs_a_finished_run(engine, small_set):
    _unlabelled_folder(small_set, 1)
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        with pytest.raises(LookupError, match="train one"):
            prelabel(session)
        # Without a run the queue still lists them, in import order.
        queue = label_queue(session)
    assert queue.total == 1 and queue.run_id is None
    assert queue.items[0].suggested is None


def test_accept_moves_the_photo_into_the_pool_with_an_audit_row(engine, small_set):
    _unlabelled_folder(small_set, 2)
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        first, second = _unlabelled_ids(session)
        event = accept(session, first, "not_hot_dog", expected_version=1)

    with session_scope(engine) as session:
        photo = session.get(Photo, first)
        assert (photo.split, photo.label, photo.original_label, photo.status) == (
            POOL,
            "not_hot_dog",
            "not_hot_dog",
            CONFIRMED,
        )
        assert photo.version == 2
        (row,) = session.scalars(select(LabelEvent).where(LabelEvent.photo_id == first))
        assert (row.id, row.source) == (event.id, ACCEPT_SOURCE)
        assert (row.old_label, row.new_label) == (NO_LABEL, "not_hot_dog")
        assert (row.old_status, row.new_status) == (UNREVIEWED, CONFIRMED)
        assert label_queue(session).total == 1
        # It trains with the next run, like any pool photo.
        from pipeline.train import select_photos

        assert first in {p.id for p in select_photos(session, POOL, None)}


def test_accept_refuses_what_it_cannot_do(engine, small_set):
    _unlabelled_folder(small_set, 1)
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        (photo_id,) = _unlabelled_ids(session)
        pool_id = session.scalar(select(Photo.id).where(Photo.split == POOL))
        with pytest.raises(ValueError, match="unknown class 'salad'"):
            accept(session, photo_id, "salad")
        with pytest.raises(ValueError, match="unknown class ''"):
            accept(session, photo_id, NO_LABEL)
        with pytest.raises(ValueError, match="already labelled"):
            accept(session, pool_id, "hot_dog")
        with pytest.raises(LookupError):
            accept(session, 10_000, "hot_dog")
        with pytest.raises(StaleLabelError):
            accept(session, photo_id, "hot_dog", expected_version=7)
        # Review actions that need a label are refused too.
        with pytest.raises(ValueError, match="no label yet"):
            apply_action(session, photo_id, "relabel", new_label="hot_dog")
        with pytest.raises(ValueError, match="no label yet"):
            apply_action(session, photo_id, "confirm")
        assert session.get(Photo, photo_id).split == UNLABELLED


def test_an_excluded_upload_leaves_the_queue_and_undo_brings_it_back(engine, small_set):
    _unlabelled_folder(small_set, 1)
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        (photo_id,) = _unlabelled_ids(session)
        event = apply_action(session, photo_id, "exclude", source="label")
        assert session.get(Photo, photo_id).status == EXCLUDED
        assert label_queue(session).total == 0
        undo_event(session, event.id)
        assert label_queue(session).total == 1


def test_undoing_an_accept_puts_the_photo_back_unlabelled(engine, small_set):
    _unlabelled_folder(small_set, 1)
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        (photo_id,) = _unlabelled_ids(session)
        run = _fake_run(session)
        prelabel(session, run)
        event = accept(session, photo_id, "hot_dog")
        assert label_queue(session).total == 0
        undo = undo_event(session, event.id)
        photo = session.get(Photo, photo_id)
        assert (photo.split, photo.label, photo.original_label, photo.status) == (
            UNLABELLED,
            NO_LABEL,
            NO_LABEL,
            UNREVIEWED,
        )
        assert (undo.old_label, undo.new_label) == ("hot_dog", NO_LABEL)
        assert class_names(session) == list(CLASSES)
        # Back in the queue with the suggestion it had.
        (item,) = label_queue(session).items
        assert item.photo_id == photo_id and item.suggested is not None
        # Undoing the undo labels it again, in the pool.
        undo_event(session, undo.id)
        assert (photo.split, photo.label) == (POOL, "hot_dog")
        kinds = session.scalars(
            select(Prediction.kind).where(Prediction.photo_id == photo_id)
        ).all()
        assert kinds == [PRELABEL]
