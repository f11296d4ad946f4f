import re

from sqlalchemy import select

from db.engine import get_engine, session_scope
from db.models import CONFIRMED, POOL, UNLABELLED, LabelEvent, Photo
from pipeline.unlabelled import add_uploads
from tests.conftest import real_photos
from tests.dashboard.conftest import open_page


def upload(count: int) -> list[int]:
    photos = real_photos("train", "not_hot_dog", count, skip=30)
    with session_scope(get_engine()) as session:
        results = add_uploads(session, [(p.name, p.read_bytes()) for p in photos])
    return [r.photo_id for r in results]


def shown_photo(app) -> int:
    for caption in app.caption:
        match = re.search(r" · #(\d+)$", caption.value)
        if match:
            return int(match.group(1))
    raise AssertionError("no photo on the page")


def test_nothing_to_label_says_where_photos_come_from(small_set):
    app = open_page("label")
    assert not app.exception and not app.error
    assert app.info[0].value.startswith("Nothing to label")
    assert "No finished training run yet" in " ".join(c.value for c in app.caption)


def test_suggest_then_label_with_a_click_and_undo(trained):
    ids = upload(3)
    app = open_page("label")
    assert not app.exception
    assert "No suggestion yet" in [m.value for m in app.markdown]

    app.button(key="label_suggest").click().run()
    assert not app.exception and not app.error
    suggestion = next(m.value for m in app.markdown if m.value.startswith("Suggested"))
    photo_id = shown_photo(app)
    assert photo_id in ids

    suggested = re.search(r"\*\*(.+)\*\*", suggestion).group(1)
    other = {"hot_dog": "not_hot_dog", "not_hot_dog": "hot_dog"}[suggested]
    assert app.button(key=f"label-{photo_id}-{suggested}").label.startswith("Accept")
    app.button(key=f"label-{photo_id}-{other}").click().run()

    assert not app.exception
    with session_scope(get_engine()) as session:
        photo = session.get(Photo, photo_id)
        assert (photo.split, photo.label, photo.status) == (POOL, other, CONFIRMED)
        (event,) = session.scalars(
            select(LabelEvent).where(LabelEvent.photo_id == photo_id)
        )
        assert event.source == "label"
    assert shown_photo(app) != photo_id
    assert "Photo 1 of 2" in " ".join(c.value for c in app.caption)

    app.button(key="label_undo").click().run()
    with session_scope(get_engine()) as session:
        assert session.get(Photo, photo_id).split == UNLABELLED
    assert "Photo 1 of 3" in " ".join(c.value for c in app.caption)


def test_undo_last_from_a_stale_tab_never_reaches_an_older_label(trained):
    upload(3)
    tab_a = open_page("label")
    labelled = []
    for _ in range(3):
        labelled.append(shown_photo(tab_a))
        tab_a.button(key=f"label-{labelled[-1]}-hot_dog").click().run()
    tab_a.button(key="label_undo").click().run()
    # Tab B is drawn now: its newest label is the second photo's.
    tab_b = open_page("label")
    tab_a.button(key="label_undo").click().run()
    with session_scope(get_engine()) as session:
        count = len(session.scalars(select(LabelEvent.id)).all())

    tab_b.button(key="label_undo").click().run()

    assert not tab_b.exception and not tab_b.toast
    [warning] = tab_b.warning
    assert f"photo #{labelled[1]} is now **unlabelled**" in warning.value
    with session_scope(get_engine()) as session:
        first = session.get(Photo, labelled[0])
        assert (first.split, first.label) == (POOL, "hot_dog")
        assert len(session.scalars(select(LabelEvent.id)).all()) == count
