import itertools

import pytest
from sqlalchemy import select

from db.engine import session_scope
from db.labels import (
    AlreadyUndoneError,
    StaleLabelError,
    apply_action,
    class_names,
    last_event,
    undo_event,
)
from db.models import (
    CONFIRMED,
    EXCLUDED,
    HOLDOUT,
    POOL,
    RELABELLED,
    UNREVIEWED,
    LabelEvent,
    Photo,
)

_SERIAL = itertools.count(1)


def _photo(session, label, split=POOL):
    n = [next(_SERIAL)]
    photo = Photo(
        sha256=f"{n[0]:064d}",
        path=f"/photos/{n[0]}.jpg",
        width=10,
        height=10,
        split=split,
        original_label=label,
        label=label,
    )
    session.add(photo)
    session.flush()
    return photo


@pytest.fixture
def photos(engine):
    with session_scope(engine) as session:
        ids = [
            _photo(session, "hot_dog").id,
            _photo(session, "not_hot_dog").id,
            _photo(session, "hot_dog", split=HOLDOUT).id,
        ]
    return ids


def test_relabel_writes_label_status_version_and_audit_row(engine, photos):
    with session_scope(engine) as session:
        event = apply_action(session, photos[0], "relabel", new_label="not_hot_dog")
    with session_scope(engine) as session:
        photo = session.get(Photo, photos[0])
        assert (photo.label, photo.status, photo.version) == (
            "not_hot_dog",
            RELABELLED,
            2,
        )
        row = session.get(LabelEvent, event.id)
        assert (row.old_label, row.new_label, row.source) == (
            "hot_dog",
            "not_hot_dog",
            "review",
        )
        assert (row.old_status, row.new_status) == (UNREVIEWED, RELABELLED)


def test_second_reviewer_with_old_version_is_told_the_current_label(engine, photos):
    with session_scope(engine) as session:
        seen = session.get(Photo, photos[0]).version
    with session_scope(engine) as session:
        apply_action(
            session,
            photos[0],
            "relabel",
            new_label="not_hot_dog",
            expected_version=seen,
        )
    with pytest.raises(StaleLabelError) as caught, session_scope(engine) as session:
        apply_action(session, photos[0], "exclude", expected_version=seen)
    assert caught.value.label == "not_hot_dog"
    assert "not_hot_dog" in str(caught.value)
    with session_scope(engine) as session:
        assert session.get(Photo, photos[0]).status == RELABELLED
        assert len(session.scalars(select(LabelEvent)).all()) == 1


def test_undo_restores_and_is_itself_audited(engine, photos):
    with session_scope(engine) as session:
        event = apply_action(session, photos[1], "exclude")
    with session_scope(engine) as session:
        undo = undo_event(session, event.id)
        assert undo.undoes_id == event.id
        photo = session.get(Photo, photos[1])
        assert (photo.label, photo.status, photo.version) == (
            "not_hot_dog",
            UNREVIEWED,
            3,
        )
        assert last_event(session) is None


def test_undo_refuses_when_a_later_change_would_be_lost(engine, photos):
    with session_scope(engine) as session:
        first = apply_action(session, photos[0], "exclude")
        apply_action(session, photos[0], "restore")
    with pytest.raises(StaleLabelError), session_scope(engine) as session:
        undo_event(session, first.id)


def _state(session, photo_id):
    photo = session.get(Photo, photo_id)
    events = session.scalars(select(LabelEvent.id).order_by(LabelEvent.id)).all()
    return photo.label, photo.status, photo.version, events


def test_undoing_an_undone_event_again_is_refused_and_writes_nothing(engine, photos):
    # Tab A undoes the exclusion and excludes again; tab B, drawn before both,
    # then asks to undo the first exclusion once more.
    with session_scope(engine) as session:
        first = apply_action(session, photos[0], "exclude")
        shown = session.get(Photo, photos[0]).version
        undo = undo_event(session, first.id)
        apply_action(session, photos[0], "exclude")
        before = _state(session, photos[0])

    for version in (None, shown):
        with pytest.raises(AlreadyUndoneError) as caught:
            with session_scope(engine) as session:
                undo_event(session, first.id, expected_version=version)
        assert (caught.value.event_id, caught.value.undo_id) == (first.id, undo.id)
        assert (caught.value.label, caught.value.status) == ("hot_dog", EXCLUDED)
        assert f"already undone by event {undo.id}" in str(caught.value)
        with session_scope(engine) as session:
            assert _state(session, photos[0]) == before
    assert before[:3] == ("hot_dog", EXCLUDED, 4)


def test_undo_with_a_stale_expected_version_is_refused(engine, photos):
    with session_scope(engine) as session:
        first = apply_action(session, photos[0], "exclude")
        shown = session.get(Photo, photos[0]).version
        # Someone else restores and excludes again: the state matches the
        # event's result, but undoing it now would drop their exclusion.
        apply_action(session, photos[0], "restore", source="cli")
        apply_action(session, photos[0], "exclude", source="cli")
        before = _state(session, photos[0])

    with pytest.raises(StaleLabelError) as caught, session_scope(engine) as session:
        undo_event(session, first.id, expected_version=shown)
    assert not isinstance(caught.value, AlreadyUndoneError)
    assert (caught.value.status, caught.value.version) == (EXCLUDED, 4)
    with session_scope(engine) as session:
        assert _state(session, photos[0]) == before


def test_undo_on_the_version_shown_applies(engine, photos):
    with session_scope(engine) as session:
        event = apply_action(session, photos[0], "exclude")
        shown = session.get(Photo, photos[0]).version
    with session_scope(engine) as session:
        undo = undo_event(session, event.id, expected_version=shown)
        assert undo.undoes_id == event.id
        assert _state(session, photos[0])[:3] == ("hot_dog", UNREVIEWED, 3)


def test_relabel_back_to_the_folder_label_counts_as_confirmed(engine, photos):
    with session_scope(engine) as session:
        apply_action(session, photos[0], "relabel", new_label="not_hot_dog")
        apply_action(session, photos[0], "relabel", new_label="hot_dog")
        assert session.get(Photo, photos[0]).status == CONFIRMED


@pytest.mark.parametrize(
    ("index", "action", "label", "message"),
    [
        (2, "relabel", "not_hot_dog", "cannot relabel photo .* frozen holdout"),
        (2, "exclude", None, "cannot exclude photo .* frozen holdout"),
        (2, "confirm", None, "cannot confirm photo .* frozen holdout"),
        (0, "relabel", "pizza", "pizza"),
        (0, "teleport", None, "teleport"),
    ],
)
def test_bad_actions_are_refused_and_change_nothing(
    engine, photos, index, action, label, message
):
    with pytest.raises(ValueError, match=message), session_scope(engine) as session:
        apply_action(session, photos[index], action, new_label=label)
    with session_scope(engine) as session:
        assert session.scalars(select(LabelEvent)).all() == []
        assert {p.status for p in session.scalars(select(Photo))} == {UNREVIEWED}


def test_class_names_are_folder_names(engine, photos):
    with session_scope(engine) as session:
        assert class_names(session) == ["hot_dog", "not_hot_dog"]
        apply_action(session, photos[0], "exclude")
        assert session.get(Photo, photos[0]).status == EXCLUDED
        assert class_names(session) == ["hot_dog", "not_hot_dog"]
