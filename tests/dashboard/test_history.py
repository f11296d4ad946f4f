from sqlalchemy import select

from db.engine import get_engine, session_scope
from db.labels import apply_action
from db.models import LabelEvent, Photo
from tests.dashboard.conftest import open_page


def act(photo_id: int, action: str, source: str, new_label: str | None = None) -> int:
    with session_scope(get_engine()) as session:
        return apply_action(
            session, photo_id, action, new_label=new_label, source=source
        ).id


def photo(photo_id: int) -> Photo:
    with session_scope(get_engine()) as session:
        return session.get(Photo, photo_id)


def newest_event() -> LabelEvent:
    with session_scope(get_engine()) as session:
        return session.scalars(
            select(LabelEvent).order_by(LabelEvent.id.desc())
        ).first()


def event_count() -> int:
    with session_scope(get_engine()) as session:
        return len(session.scalars(select(LabelEvent.id)).all())


def undo_keys(app) -> list[str]:
    return [b.key for b in app.button if b.key.startswith("history-undo-")]


def test_events_newest_first_filtered_by_source_and_label(small_set):
    open_page()  # imports the photos
    first = act(1, "relabel", "review", new_label="not_hot_dog")
    second = act(2, "exclude", "cli")
    third = act(12, "confirm", "review")
    app = open_page("history")

    assert undo_keys(app) == [f"history-undo-{i}" for i in (third, second, first)]
    assert "3 changes, newest first · page 1 of 1" in [c.value for c in app.caption]

    app.selectbox(key="history_source").select("cli").run()
    assert undo_keys(app) == [f"history-undo-{second}"]

    app.selectbox(key="history_source").select("any")
    app.selectbox(key="history_label").select("not_hot_dog").run()
    # photo 1 went hot_dog -> not_hot_dog; photo 12 was confirmed as not_hot_dog
    assert undo_keys(app) == [f"history-undo-{i}" for i in (third, first)]


def test_undo_a_row_puts_the_photo_back(small_set):
    open_page()
    event_id = act(1, "relabel", "review", new_label="not_hot_dog")
    app = open_page("history")

    app.button(key=f"history-undo-{event_id}").click().run()

    assert not app.exception
    assert (photo(1).label, photo(1).status) == ("hot_dog", "unreviewed")
    undo = newest_event()
    assert undo.undoes_id == event_id and undo.source == "undo"
    assert f"undone by #{undo.id}" in [c.value for c in app.caption]
    assert f"undoes #{event_id}" in [c.value for c in app.caption]
    assert undo_keys(app) == []


def test_undo_of_an_overtaken_change_warns_and_changes_nothing(small_set):
    open_page()
    relabel = act(1, "relabel", "review", new_label="not_hot_dog")
    act(1, "exclude", "review")
    app = open_page("history")

    app.button(key=f"history-undo-{relabel}").click().run()

    [warning] = app.warning
    assert f"Cannot undo event #{relabel}" in warning.value
    assert "**not_hot_dog** (excluded)" in warning.value
    assert (photo(1).label, photo(1).status, photo(1).version) == (
        "not_hot_dog",
        "excluded",
        3,
    )


def assert_refused_and_nothing_saved(app, reason: str) -> None:
    """Photo 1, excluded three changes ago, is left as is; the page says why."""
    assert not app.exception and not app.success
    [warning] = app.warning
    assert reason in warning.value
    assert "**hot_dog** (excluded)" in warning.value
    after = photo(1)
    assert (after.label, after.status, after.version) == ("hot_dog", "excluded", 4)
    assert event_count() == 3


def test_a_second_undo_from_a_stale_tab_is_refused(small_set):
    open_page()
    exclusion = act(1, "exclude", "review")
    tab_a, tab_b = open_page("history"), open_page("history")
    tab_a.button(key=f"history-undo-{exclusion}").click().run()
    undo = newest_event().id
    act(1, "exclude", "review")

    tab_b.button(key=f"history-undo-{exclusion}").click().run()

    assert_refused_and_nothing_saved(
        tab_b, f"Cannot undo event #{exclusion}: event #{undo} already undid it"
    )


def test_undo_of_a_photo_changed_since_the_page_was_drawn_is_refused(small_set):
    open_page()
    exclusion = act(1, "exclude", "review")
    app = open_page("history")
    # Someone else restores and excludes again: photo 1 looks as event
    # `exclusion` left it, but undoing it would drop their exclusion.
    act(1, "restore", "cli")
    act(1, "exclude", "cli")

    app.button(key=f"history-undo-{exclusion}").click().run()

    assert_refused_and_nothing_saved(
        app, f"Cannot undo event #{exclusion}: photo #1 changed after this page"
    )
