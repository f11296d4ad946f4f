import pytest
from sqlalchemy import select

from db.engine import session_scope
from db.models import HOLDOUT, Photo, Prediction
from pipeline.ingest import ingest_folder
from pipeline.runs import BROKEN, FIXED, OTHER, holdout_flips
from pipeline.scoring import OOF
from tests.conftest import add_run

CLASSES = ("hot_dog", "not_hot_dog", "taco")


def other_than(label: str) -> str:
    return "not_hot_dog" if label == "hot_dog" else "hot_dog"


@pytest.fixture
def holdout(engine, small_set) -> list[tuple[int, str]]:
    """(id, label) of the 8 holdout photos: 4 hot dogs, then 4 others."""
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        photos = session.scalars(
            select(Photo).where(Photo.split == HOLDOUT).order_by(Photo.id)
        )
        return [(photo.id, photo.label) for photo in photos]


def two_runs(session, holdout):
    """Run 1, then run 2, with one fix, one break, one other flip, one new photo.

    Photo 0 goes wrong → right, photo 1 right → wrong, photo 5 from one wrong
    class to another, photo 6 stays wrong, photo 7 only run 2 predicted.
    """
    (a, a_label), (b, b_label) = holdout[0], holdout[1]
    (c, c_label), (d, d_label) = holdout[5], holdout[6]
    before = dict(holdout[:7])
    before.update({a: other_than(a_label), c: "taco", d: other_than(d_label)})
    after = dict(holdout)
    after.update({b: other_than(b_label), c: other_than(c_label)})
    after[d] = other_than(d_label)
    first = add_run(session, before, CLASSES)
    second = add_run(session, after, CLASSES)
    return first, second


def test_flips_are_sorted_into_fixed_broken_and_other(engine, holdout):
    with session_scope(engine) as session:
        first, second = two_runs(session, holdout)
        changes = holdout_flips(session, second, first)

    (a, a_label), (b, b_label), (c, c_label) = holdout[0], holdout[1], holdout[5]
    assert (changes.run_id, changes.previous_id) == (second.id, first.id)
    assert changes.compared == 7  # photo 7 was not in run 1
    assert [(f.photo_id, f.change) for f in changes.flips] == [
        (a, FIXED),
        (b, BROKEN),
        (c, OTHER),
    ]
    fixed, broken, other = changes.flips
    assert (fixed.given_label, fixed.previous_label, fixed.predicted_label) == (
        a_label,
        other_than(a_label),
        a_label,
    )
    assert (broken.previous_label, broken.predicted_label) == (
        b_label,
        other_than(b_label),
    )
    assert (other.given_label, other.previous_label, other.predicted_label) == (
        c_label,
        "taco",
        other_than(c_label),
    )
    assert [changes.count(kind) for kind in (FIXED, BROKEN, OTHER)] == [1, 1, 1]


def test_swapping_the_runs_swaps_fixed_and_broken(engine, holdout):
    with session_scope(engine) as session:
        first, second = two_runs(session, holdout)
        changes = holdout_flips(session, first, second)
    assert [(f.photo_id, f.change) for f in changes.flips] == [
        (holdout[1][0], FIXED),
        (holdout[0][0], BROKEN),
        (holdout[5][0], OTHER),
    ]


def test_only_holdout_predictions_count(engine, holdout):
    with session_scope(engine) as session:
        first = add_run(session, dict(holdout))
        second = add_run(session, dict(holdout))
        # The same photo scored out-of-fold by run 2 with another label: not
        # a holdout prediction, so no flip.
        photo_id, label = holdout[2]
        session.add(
            Prediction(
                run_id=second.id,
                photo_id=photo_id,
                kind=OOF,
                probs=[0.1, 0.9],
                given_label=label,
                predicted_label=other_than(label),
                confidence=0.9,
                score=0.9,
            )
        )
        session.flush()
        changes = holdout_flips(session, second, first)
    assert changes.compared == 8
    assert changes.flips == []


def test_runs_without_holdout_predictions_compare_nothing(engine, holdout):
    with session_scope(engine) as session:
        first = add_run(session, {})
        second = add_run(session, dict(holdout))
        changes = holdout_flips(session, second, first)
    assert (changes.compared, changes.flips) == (0, [])
