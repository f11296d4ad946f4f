import pytest
from streamlit.testing.v1 import AppTest

from db.engine import get_engine, session_scope
from db.models import Photo
from tests.conftest import real_photos
from tests.dashboard.conftest import APP, TIMEOUT, open_page

PAGES = [None, "review", "duplicates", "train", "export", "try_it", "history"]


def photo_count() -> int:
    with session_scope(get_engine()) as session:
        return session.query(Photo).count()


def test_a_missing_photo_folder_is_named_and_the_app_still_works(workspace):
    app = open_page()
    assert not app.exception
    [error] = app.error
    assert f"DATA_DIR={workspace / 'photos'}" in error.value
    assert "does not exist" in error.value
    assert app.info[0].value.startswith("No photos in the database yet.")


def test_start_imports_the_photo_folder_once(small_set):
    open_page()
    assert photo_count() == 20
    # Another browser session in the same process does not import again.
    [photo] = real_photos("train", "hot_dog", 1, skip=20)
    (small_set / "train" / "hot_dog" / photo.name).symlink_to(photo)
    open_page()
    assert photo_count() == 20


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_an_empty_database(workspace, page):
    (workspace / "photos" / "train" / "hot_dog").mkdir(parents=True)
    app = open_page(page)
    assert not app.exception
    assert not app.error
    assert photo_count() == 0


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_with_photos_but_no_run(small_set, page):
    app = open_page(page)
    assert not app.exception
    assert not app.error


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_with_a_finished_run(trained, page):
    app = open_page(page)
    assert not app.exception
    assert not app.error


def test_a_first_request_for_a_page_still_runs_the_entry_point(small_set):
    app = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    app.switch_page("views/review.py").run()
    assert not app.exception
    assert photo_count() == 20
    assert app.title[0].value == "Review"
    assert app.button(key="confirm-1")
