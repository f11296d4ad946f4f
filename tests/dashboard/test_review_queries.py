"""The queries behind the Review and History pages (pipeline/review.py)."""

from datetime import datetime, timedelta

import pytest
from PIL import Image

from db.engine import session_scope
from db.models import HOLDOUT, POOL, Job, Photo, Prediction, TrainingRun
from pipeline.review import (
    ReviewFilters,
    estimate_seconds_left,
    review_queue,
    thumbnail,
)

# (photo label, predicted label, confidence, score) for pool photos 1-5;
# photo 6 is not scored, photo 7 is in the holdout.
SCORED = {
    1: ("a", "a", 0.90, 0.10),
    2: ("a", "b", 0.80, 0.80),
    3: ("b", "b", 0.60, 0.40),
    4: ("b", "a", 0.95, 0.95),
    5: ("a", "a", 0.70, 0.30),
}


@pytest.fixture
def scored(engine):
    with session_scope(engine) as session:
        for photo_id in range(1, 8):
            label = SCORED.get(photo_id, ("b",))[0]
            session.add(
                Photo(id=photo_id, sha256=f"{photo_id:064d}", path=f"/p/{photo_id}.jpg",
                      width=1, height=1, split=HOLDOUT if photo_id == 7 else POOL,
                      original_label=label, label=label)
            )  # fmt: skip
        old = TrainingRun(status="done", config={}, classes=["a", "b"])
        new = TrainingRun(status="done", config={}, classes=["a", "b"])
        session.add_all([old, new])
        session.flush()
        for photo_id, (given, predicted, confidence, score) in SCORED.items():
            for run, kind in ((new, "oof"), (old, "oof"), (new, "holdout")):
                session.add(
                    Prediction(run_id=run.id, photo_id=photo_id, kind=kind,
                               probs=[0.5, 0.5], given_label=given,
                               predicted_label=predicted, confidence=confidence,
                               score=score if run is new and kind == "oof" else 0.0,
                               reason=f"reason {photo_id}")
                )  # fmt: skip
    return engine


def ids(queue) -> list[int]:
    return [item.photo_id for item in queue.items]


def test_queue_ranks_by_the_latest_runs_oof_score_then_unscored_by_id(scored):
    with session_scope(scored) as session:
        queue = review_queue(session)
    assert ids(queue) == [4, 2, 3, 5, 1, 6]
    assert queue.total == 6 and queue.run_id == 2
    assert [item.reason_kind for item in queue.items] == [
        "disagrees", "disagrees", "unsure", "agrees", "agrees", "unscored",
    ]  # fmt: skip
    assert queue.items[0].reason == "reason 4"
    assert queue.items[-1].predicted_label is None


def test_queue_pages_and_filters(scored):
    with session_scope(scored) as session:
        assert ids(review_queue(session, offset=2, limit=2)) == [3, 5]
        assert review_queue(session, offset=2, limit=2).total == 6
        assert ids(review_queue(session, ReviewFilters(label="a"))) == [2, 5, 1]
        assert ids(review_queue(session, ReviewFilters(predicted="a"))) == [4, 5, 1]
        unsure = review_queue(session, ReviewFilters(reason_kind="unsure"))
        assert ids(unsure) == [3] and unsure.total == 1
        unscored = ReviewFilters(reason_kind="unscored")
        assert ids(review_queue(session, unscored)) == [6]
        session.get(Photo, 5).status = "excluded"
        assert ids(review_queue(session, ReviewFilters(status="excluded"))) == [5]


def test_bad_filter_values_are_refused():
    with pytest.raises(ValueError, match="unknown status 'done'"):
        ReviewFilters(status="done")
    with pytest.raises(ValueError, match="unknown reason kind 'odd'"):
        ReviewFilters(reason_kind="odd")


def test_thumbnail_is_upright_small_and_made_once(workspace):
    source = workspace / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
    Image.new("RGB", (800, 400), "red").save(source, exif=exif)

    made = thumbnail(source, "ab" * 32)

    assert made == workspace / "artifacts" / "thumbs" / f"{'ab' * 32}.jpg"
    with Image.open(made) as image:
        assert image.size == (160, 320)
    source.unlink()
    assert thumbnail(source, "ab" * 32) == made


def test_time_left_follows_the_pace_so_far():
    start = datetime(2026, 1, 1, 12, 0, 0)
    job = Job(kind="train", progress=0.25, started_at=start)
    assert estimate_seconds_left(job, start + timedelta(seconds=30)) == 90.0
    job.progress = 0.01
    assert estimate_seconds_left(job, start + timedelta(seconds=30)) is None
    job.started_at = None
    job.progress = 0.5
    assert estimate_seconds_left(job) is None
