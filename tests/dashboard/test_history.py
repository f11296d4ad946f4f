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
    with session_scope(get_engine()) as session:
        undo = session.scalars(
            select(LabelEvent).order_by(LabelEvent.id.desc())
        ).first()
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
