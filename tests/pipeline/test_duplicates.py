import pytest

from db.engine import session_scope
from db.labels import apply_action
from db.models import HOLDOUT, POOL, UNLABELLED
from pipeline.duplicates import (
    COPY_EXCLUDED,
    EXACT,
    KEPT,
    NEAR,
    ONE_IMPORTED,
    UNDECIDED,
    find_duplicates,
    folder_split,
    review_pairs,
)
from pipeline.ingest import ingest_folder
from tests.conftest import make_photo_set, resized_copy


@pytest.mark.parametrize(
    ("path", "split", "label"),
    [
        ("/data/train/hot_dog/a.jpg", POOL, "hot_dog"),
        ("/data/test/not_hot_dog/more/a.jpg", HOLDOUT, "not_hot_dog"),
        ("/data/unlabelled/batch 2/a.jpg", UNLABELLED, ""),
        # The nearest split folder counts, not any folder named test above it.
        ("/home/test/photos/train/hot_dog/a.jpg", POOL, "hot_dog"),
        ("C:\\data\\test\\hot_dog\\a.jpg", HOLDOUT, "hot_dog"),
    ],
)
def test_folder_split(path, split, label):
    assert folder_split(path) == (split, label)


def test_an_exact_copy_under_a_folder_named_test_is_not_cross_split(engine, workspace):
    photos = make_photo_set(workspace / "test" / "photos", 3, 0)
    source = sorted((photos / "train" / "hot_dog").glob("*.jpg"))[0]
    (photos / "train" / "hot_dog" / "again.jpg").write_bytes(source.read_bytes())
    with session_scope(engine) as session:
        ingest_folder(session, photos)
        [pair] = [p for p in find_duplicates(session, False) if p.kind == EXACT]
    assert not pair.cross_split


@pytest.fixture
def with_copies(engine, small_set):
    """small_set plus a resized pool photo in the holdout and an exact copy."""
    pool = sorted((small_set / "train" / "hot_dog").glob("*.jpg"))
    resized_copy(pool[0], small_set / "test" / "hot_dog" / "smaller.jpg")
    (small_set / "test" / "hot_dog" / "same.jpg").write_bytes(pool[1].read_bytes())
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
    return small_set


def _pair_of(reviews, name):
    [review] = [r for r in reviews if r.second.path.endswith(name)]
    return review


def test_review_pairs_show_each_copy_as_it_stands(engine, with_copies):
    with session_scope(engine) as session:
        pairs = find_duplicates(session, use_embeddings=False)
        near = _pair_of(review_pairs(session, pairs), "smaller.jpg")
        exact = _pair_of(review_pairs(session, pairs), "same.jpg")

    assert near.pair.kind == NEAR and near.pair.cross_split
    assert (near.first.split, near.first.label, near.first.status) == (
        POOL,
        "hot_dog",
        "unreviewed",
    )
    assert (near.second.split, near.second.label) == (HOLDOUT, "hot_dog")
    assert near.second.width * 2 <= near.first.width
    assert near.first.can_exclude and not near.second.can_exclude
    assert near.to_confirm == [near.first]
    assert near.state == UNDECIDED

    assert exact.pair.kind == EXACT and exact.pair.cross_split
    assert exact.second.photo_id is None and not exact.second.can_exclude
    assert (exact.second.split, exact.second.label) == (HOLDOUT, "hot_dog")
    # Same bytes, so the same thumbnail.
    assert exact.second.sha256 == exact.first.sha256
    assert exact.state == ONE_IMPORTED


@pytest.mark.parametrize(
    ("action", "state"), [("exclude", COPY_EXCLUDED), ("confirm", KEPT)]
)
def test_a_decision_on_the_pool_copy_settles_the_pair(
    engine, with_copies, action, state
):
    with session_scope(engine) as session:
        pairs = find_duplicates(session, use_embeddings=False)
        near = _pair_of(review_pairs(session, pairs), "smaller.jpg")
        apply_action(session, near.first.photo_id, action)
        after = _pair_of(review_pairs(session, pairs), "smaller.jpg")
    assert after.state == state
    assert after.first.version == near.first.version + 1
