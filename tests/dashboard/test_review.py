import re

from sqlalchemy import select

from db.engine import get_engine, session_scope
from db.labels import apply_action
from db.models import HOLDOUT, POOL, LabelEvent, Photo, Prediction
from pipeline.scoring import OOF
from tests.conftest import make_photo_set, real_photos
from tests.dashboard.conftest import open_page


def shown_photo_ids(app) -> list[int]:
    """Photo ids in the order the cards show them (from each card's caption)."""
    ids = []
    for caption in app.caption:
        match = re.match(r"#(\d+) · ", caption.value)
        if match:
            ids.append(int(match.group(1)))
    return ids


def get_photo(photo_id: int) -> Photo:
    with session_scope(get_engine()) as session:
        return session.get(Photo, photo_id)


def events_of(photo_id: int) -> list[LabelEvent]:
    with session_scope(get_engine()) as session:
        query = select(LabelEvent).where(LabelEvent.photo_id == photo_id)
        return list(session.scalars(query.order_by(LabelEvent.id)))


def event_count() -> int:
    with session_scope(get_engine()) as session:
        return len(session.scalars(select(LabelEvent.id)).all())


def test_relabel_click_changes_the_label_and_records_who_did_it(trained):
    app = open_page("review")
    photo_id = shown_photo_ids(app)[0]
    before = get_photo(photo_id)
    other = {"hot_dog": "not_hot_dog", "not_hot_dog": "hot_dog"}[before.label]

    app.button(key=f"relabel-{photo_id}-{other}").click().run()

    assert not app.exception
    after = get_photo(photo_id)
    assert after.label == other
    assert after.original_label == before.label
    assert after.status == "relabelled"
    assert after.version == before.version + 1
    [event] = events_of(photo_id)
    assert (event.old_label, event.new_label) == (before.label, other)
    assert (event.old_status, event.new_status) == ("unreviewed", "relabelled")
    assert event.source == "review"
    assert event.undoes_id is None
    # The card now shows the new label and offers the old one back.
    assert app.button(key=f"relabel-{photo_id}-{before.label}")
    assert f"#{photo_id} · relabelled · version 2" in [c.value for c in app.caption]


def test_most_confused_pool_photos_come_first_and_holdout_never(trained):
    app = open_page("review")

    with session_scope(get_engine()) as session:
        ranked = session.scalars(
            select(Prediction.photo_id)
            .where(Prediction.kind == OOF)
            .order_by(Prediction.score.desc(), Prediction.photo_id)
        ).all()
        holdout = set(session.scalars(select(Photo.id).where(Photo.split == HOLDOUT)))
    assert len(ranked) == 12
    assert shown_photo_ids(app) == list(ranked)
    assert not holdout & set(shown_photo_ids(app))
    assert "Photos 1–12 of 12 · page 1 of 1" in [c.value for c in app.caption]


def test_a_stale_version_is_refused_with_the_current_label(trained):
    app = open_page("review")
    photo_id = shown_photo_ids(app)[0]
    seen = get_photo(photo_id)
    other = {"hot_dog": "not_hot_dog", "not_hot_dog": "hot_dog"}[seen.label]
    # Someone else relabels the photo after the page was drawn.
    with session_scope(get_engine()) as session:
        apply_action(session, photo_id, "relabel", new_label=other, source="cli")

    app.button(key=f"confirm-{photo_id}").click().run()

    assert not app.exception
    [warning] = app.warning
    assert f"Photo #{photo_id} was changed" in warning.value
    assert f"**{other}**" in warning.value and "relabelled" in warning.value
    now = get_photo(photo_id)
    assert (now.label, now.status, now.version) == (other, "relabelled", 2)
    assert [e.source for e in events_of(photo_id)] == ["cli"]


def test_exclude_then_restore_then_undo(trained):
    app = open_page("review")
    photo_id = shown_photo_ids(app)[1]

    app.button(key=f"exclude-{photo_id}").click().run()
    assert get_photo(photo_id).status == "excluded"
    assert not app.button(key=f"restore-{photo_id}").disabled

    app.button(key=f"restore-{photo_id}").click().run()
    assert get_photo(photo_id).status == "unreviewed"

    app.button(key="review_undo").click().run()
    assert not app.exception
    photo = get_photo(photo_id)
    assert (photo.status, photo.version) == ("excluded", 4)
    undo = events_of(photo_id)[-1]
    assert undo.source == "undo" and undo.undoes_id == events_of(photo_id)[1].id


def test_undo_with_nothing_to_undo_says_so(trained):
    app = open_page("review")
    app.button(key="review_undo").click().run()
    assert [i.value for i in app.info] == [
        "Nothing to undo: every review action is already undone."
    ]


def test_filters_narrow_the_grid(trained):
    app = open_page("review")
    app.selectbox(key="review_filter_reason_kind").select("disagrees").run()
    shown = shown_photo_ids(app)
    with session_scope(get_engine()) as session:
        disagreeing = session.scalars(
            select(Prediction.photo_id).where(
                Prediction.kind == OOF,
                Prediction.predicted_label != Prediction.given_label,
            )
        ).all()
    assert shown and sorted(shown) == sorted(disagreeing)

    app.selectbox(key="review_filter_reason_kind").select("any")
    app.selectbox(key="review_filter_label").select("hot_dog").run()
    assert len(shown_photo_ids(app)) == 6
    assert all(get_photo(i).label == "hot_dog" for i in shown_photo_ids(app))

    first = shown_photo_ids(app)[0]
    app.button(key=f"exclude-{first}").click()
    app.selectbox(key="review_filter_status").select("excluded").run()
    assert shown_photo_ids(app) == [first]

    app.selectbox(key="review_filter_label").select("not_hot_dog").run()
    assert shown_photo_ids(app) == []
    assert [i.value for i in app.info] == ["No pool photos match these filters."]


def test_pages_of_24_cover_every_pool_photo(workspace):
    make_photo_set(workspace / "photos", train_per_class=15, test_per_class=1)
    app = open_page("review")
    first_page = shown_photo_ids(app)
    assert first_page == list(range(1, 25))  # no run yet: import order
    assert "Photos 1–24 of 30 · page 1 of 2" in [c.value for c in app.caption]

    app.button(key="review_next_page").click().run()
    second_page = shown_photo_ids(app)
    assert len(second_page) == 6
    with session_scope(get_engine()) as session:
        pool = set(session.scalars(select(Photo.id).where(Photo.split == POOL)))
    assert set(first_page) | set(second_page) == pool
    assert app.button(key="review_next_page").disabled

    # An undo turns back to the page of the photo it changed.
    app.button(key="exclude-30").click().run()
    app.button(key="review_prev_page").click().run()
    assert shown_photo_ids(app) == first_page
    app.button(key="review_undo").click().run()
    assert get_photo(30).status == "unreviewed"
    assert shown_photo_ids(app) == second_page


def test_every_other_class_gets_a_relabel_button(workspace):
    photos = make_photo_set(workspace / "photos", train_per_class=3, test_per_class=0)
    taco = photos / "train" / "taco"
    taco.mkdir()
    for photo in real_photos("train", "not_hot_dog", 3, skip=10):
        (taco / photo.name).symlink_to(photo)
    app = open_page("review")

    keys = {button.key for button in app.button}
    assert {"confirm-1", "relabel-1-not_hot_dog", "relabel-1-taco"} <= keys
    assert "relabel-1-hot_dog" not in keys
    app.button(key="relabel-1-taco").click().run()
    assert (get_photo(1).label, get_photo(1).status) == ("taco", "relabelled")


def test_one_photo_mode_has_keys_and_moves_on_after_a_decision(trained):
    app = open_page("review")
    ranked = shown_photo_ids(app)
    app.toggle(key="review_focus").set_value(True).run()
    assert shown_photo_ids(app) == ranked[:1]

    first = get_photo(ranked[0])
    buttons = {button.key: button for button in app.button}
    classes = ["hot_dog", "not_hot_dog"]
    digit = str(classes.index(first.label) + 1)
    assert buttons[f"focus-confirm-{first.id}"].proto.shortcut == digit
    assert buttons[f"focus-exclude-{first.id}"].proto.shortcut == "x"
    assert buttons["review_next_photo"].proto.shortcut == "j"
    assert buttons["review_prev_photo"].proto.shortcut == "k"
    assert buttons["review_undo"].proto.shortcut == "u"

    app.button(key=f"focus-confirm-{first.id}").click().run()
    assert get_photo(first.id).status == "confirmed"
    assert shown_photo_ids(app) == ranked[1:2]
    # Undo brings back the photo it changed.
    app.button(key="review_undo").click().run()
    assert get_photo(first.id).status == "unreviewed"
    assert shown_photo_ids(app) == ranked[:1]
    app.button(key="review_next_photo").click().run()
    assert shown_photo_ids(app) == ranked[1:2]
    app.button(key="review_prev_photo").click().run()
    assert shown_photo_ids(app) == ranked[:1]


def test_a_status_filter_in_one_photo_mode_does_not_skip_photos(trained):
    app = open_page("review")
    app.selectbox(key="review_filter_status").select("unreviewed").run()
    ranked = shown_photo_ids(app)
    app.toggle(key="review_focus").set_value(True).run()
    assert shown_photo_ids(app) == ranked[:1]

    app.button(key=f"focus-confirm-{ranked[0]}").click().run()

    # The photo left the unreviewed list, so the next one took its place.
    assert shown_photo_ids(app) == ranked[1:2]
    assert "Photo 1 of 11" in [c.value for c in app.caption]


def test_rerank_after_a_change_refits_the_scores_from_current_labels(trained):
    app = open_page("review")
    photo_id = shown_photo_ids(app)[0]
    before = get_photo(photo_id)
    other = {"hot_dog": "not_hot_dog", "not_hot_dog": "hot_dog"}[before.label]

    app.toggle(key="review_autorank").set_value(True).run()
    app.button(key=f"relabel-{photo_id}-{other}").click().run()

    assert not app.exception
    with session_scope(get_engine()) as session:
        row = session.scalars(
            select(Prediction).where(
                Prediction.photo_id == photo_id, Prediction.kind == OOF
            )
        ).one()
        # The stored row now scores the photo against its new label.
        assert row.given_label == other
    assert any("Re-ranked" in toast.value for toast in app.toast)


def test_undo_last_from_a_stale_tab_never_reaches_an_older_change(trained):
    tab_a = open_page("review")
    oldest, older, newest = shown_photo_ids(tab_a)[:3]
    labels = {}
    for photo_id in (oldest, older, newest):
        labels[photo_id] = get_photo(photo_id).label
        other = {"hot_dog": "not_hot_dog", "not_hot_dog": "hot_dog"}[labels[photo_id]]
        tab_a.button(key=f"relabel-{photo_id}-{other}").click().run()
    tab_a.button(key="review_undo").click().run()
    # Tab B is drawn now: its newest change is the relabel of `older`.
    tab_b = open_page("review")
    assert f"Photo #{older}:" in tab_b.button(key="review_undo").help
    tab_a.button(key="review_undo").click().run()
    assert get_photo(older).label == labels[older]
    relabelled = get_photo(oldest)
    count = event_count()

    tab_b.button(key="review_undo").click().run()

    assert not tab_b.exception and not tab_b.toast
    [warning] = tab_b.warning
    assert f"photo #{older} is now **{labels[older]}**" in warning.value
    assert "Nothing was saved" in warning.value
    after = get_photo(oldest)
    assert (after.label, after.status, after.version) == (
        relabelled.label,
        "relabelled",
        relabelled.version,
    )
    assert [e.source for e in events_of(oldest)] == ["review"]
    assert event_count() == count
