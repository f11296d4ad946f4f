"""Bulk actions on the Review grid: select cards, apply one action to all."""

from sqlalchemy import select

from db.engine import get_engine, session_scope
from db.labels import apply_action
from db.models import HOLDOUT, LabelEvent, Photo
from pipeline.review import apply_to_many
from tests.dashboard.conftest import open_page
from tests.dashboard.test_review import events_of, get_photo, shown_photo_ids

OTHER = {"hot_dog": "not_hot_dog", "not_hot_dog": "hot_dog"}


def select_cards(app, photo_ids):
    for photo_id in photo_ids:
        app.checkbox(key=f"select-{photo_id}").check()
    return app.run()


def test_bulk_buttons_wait_for_a_selection(trained):
    app = open_page("review")
    keys = ("review_bulk_confirm", "review_bulk_relabel", "review_bulk_exclude")
    assert all(app.button(key=key).disabled for key in keys)
    assert "0 selected" in [c.value for c in app.caption]

    select_cards(app, shown_photo_ids(app)[:2])
    assert not any(app.button(key=key).disabled for key in keys)
    assert "2 selected" in [c.value for c in app.caption]


def test_exclude_selected_saves_each_and_reports_the_stale_one(trained):
    app = open_page("review")
    first, second, third, untouched = shown_photo_ids(app)[:4]
    select_cards(app, [first, second, third])
    # Someone else relabels one of them after the page showed it.
    changed_to = OTHER[get_photo(second).label]
    with session_scope(get_engine()) as session:
        apply_action(session, second, "relabel", new_label=changed_to, source="cli")

    app.button(key="review_bulk_exclude").click().run()

    assert not app.exception
    for photo_id in (first, third):
        photo = get_photo(photo_id)
        assert (photo.status, photo.version) == ("excluded", 2)
        [event] = events_of(photo_id)
        assert (event.new_status, event.source) == ("excluded", "review")
    stale = get_photo(second)
    assert (stale.label, stale.status, stale.version) == (changed_to, "relabelled", 2)
    assert [e.source for e in events_of(second)] == ["cli"]
    assert get_photo(untouched).version == 1

    [warning] = app.warning
    assert warning.value == (
        "Excluded 2 of 3 selected photos. Not saved, changed since this page "
        f"showed them: #{second} (now **{changed_to}**, relabelled)."
    )
    # Saved photos are deselected; the stale one stays selected to be looked at.
    assert app.checkbox(key=f"select-{second}").value
    assert not app.checkbox(key=f"select-{first}").value
    assert not app.checkbox(key=f"select-{third}").value


def test_relabel_selected_to_the_chosen_class(trained):
    app = open_page("review")
    chosen = shown_photo_ids(app)[:3]
    labels = {photo_id: get_photo(photo_id).label for photo_id in chosen}
    select_cards(app, chosen)
    app.selectbox(key="review_bulk_label").select("not_hot_dog").run()
    assert app.button(key="review_bulk_relabel").label == (
        "Relabel selected to not_hot_dog"
    )

    app.button(key="review_bulk_relabel").click().run()

    assert not app.exception and not app.warning
    for photo_id, label in labels.items():
        photo = get_photo(photo_id)
        assert (photo.label, photo.version) == ("not_hot_dog", 2)
        # Relabelling a photo to its folder's class confirms it.
        expected = "confirmed" if label == "not_hot_dog" else "relabelled"
        assert photo.status == expected
        [event] = events_of(photo_id)
        assert (event.old_label, event.new_label) == (label, "not_hot_dog")
        assert event.source == "review"
    assert [t.value for t in app.toast] == [
        "Relabelled 3 of 3 selected photos to not_hot_dog."
    ]


def test_select_all_then_confirm_every_card_on_the_page(trained):
    app = open_page("review")
    shown = shown_photo_ids(app)
    app.button(key="review_select_all").click().run()
    assert all(app.checkbox(key=f"select-{i}").value for i in shown)

    app.button(key="review_bulk_confirm").click().run()

    assert not app.exception
    assert {get_photo(i).status for i in shown} == {"confirmed"}
    with session_scope(get_engine()) as session:
        sources = session.scalars(select(LabelEvent.source)).all()
    assert sources == ["review"] * len(shown)
    assert [t.value for t in app.toast] == [
        f"Confirmed {len(shown)} of {len(shown)} selected photos."
    ]
    assert not any(app.checkbox(key=f"select-{i}").value for i in shown)


def test_a_photo_the_action_cannot_apply_to_is_reported_not_fatal(trained):
    with session_scope(get_engine()) as session:
        holdout = session.scalars(
            select(Photo.id).where(Photo.split == HOLDOUT)
        ).first()
    result = apply_to_many("confirm", [(1, 1), (holdout, 1), (999, 1)])
    assert result.done == [1]
    assert [photo_id for photo_id, _ in result.failed] == [holdout, 999]
    assert result.summary().startswith("Confirmed 1 of 3 selected photos. Not saved: ")
    assert "frozen holdout" in result.summary()
    assert get_photo(1).status == "confirmed"
