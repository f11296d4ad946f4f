import random
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from db.engine import get_engine, session_scope
from db.models import EXCLUDED, POOL, Export, Photo
from pipeline.images import load_rgb
from tests.dashboard.conftest import open_page


def pool_photos() -> list[Photo]:
    """The photos the page offers, in its order: by file name."""
    query = select(Photo).where(Photo.split == POOL, Photo.status != EXCLUDED)
    with session_scope(get_engine()) as session:
        photos = list(session.scalars(query))
    return sorted(photos, key=lambda photo: (Path(photo.path).name, photo.id))


def only_export() -> Export:
    with session_scope(get_engine()) as session:
        [export] = session.scalars(select(Export)).all()
    return export


@pytest.fixture
def fake_predict(monkeypatch):
    """Make the exported file's answer a sentinel, and record what it was asked."""
    import pipeline.export

    calls = []

    def predict(export, image):
        calls.append((export.id, image.size))
        return "sentinel_class", 0.625, np.array([0.375, 0.625])

    monkeypatch.setattr(pipeline.export, "predict_with_export", predict)
    return calls


def test_without_exports_the_page_says_so_and_points_to_export(trained):
    app = open_page("try_it")

    assert not app.exception
    assert [i.value for i in app.info] == [
        "No exports yet: make one on the Export page, then try it here."
    ]
    [link] = app.page_link
    assert link.value == "Go to Export"
    assert link.proto.page == "export"
    assert not app.get("file_uploader")


def test_exports_are_offered_newest_first_with_their_checks(exports):
    with session_scope(get_engine()) as session:
        int8 = exports / "run1-int8.pte"
        int8.write_bytes(b"\2" * 512)
        session.add(
            Export(
                run_id=1,
                format="pte_int8",
                path=str(int8),
                size_bytes=512,
                checks={"accuracy_holdout": 0.5},
            )
        )

    app = open_page("try_it")

    assert not app.exception
    choice = app.selectbox(key="try_export_4")
    assert choice.options == [
        "export #4 · pte · int8 · run #1 · holdout 50.0 %",
        "export #2 · onnx · fp32 · run #1 · holdout –",
        "export #1 · pte · fp32 · run #1 · holdout 75.0 %",
    ]
    assert choice.value == 4


def test_a_pool_photo_is_answered_by_the_exported_file(exported):
    from pipeline.export import predict_with_export

    export = only_export()
    photo = pool_photos()[0]
    label, confidence, probs = predict_with_export(export, load_rgb(photo.path))

    app = open_page("try_it")
    app.selectbox(key="try_pool_photo").select(photo.id).run()

    assert not app.exception and not app.error
    humanised = label.replace("_", " ").capitalize()
    assert [h.value for h in app.header] == [
        f"{humanised}, {100 * confidence:.1f} % sure"
    ]
    [caption] = [c.value for c in app.caption if c.value.startswith("Computed")]
    assert Path(export.path).name in caption and "onnx" in caption
    assert "not by PyTorch" in caption
    table = app.dataframe[0].value
    assert list(table["class"]) == ["Hot dog", "Not hot dog"]
    assert np.allclose(table["probability"], probs)
    verdict = app.success if label == photo.label else app.warning
    [line] = [v.value for v in verdict]
    given = photo.label.replace("_", " ").capitalize()
    assert line.startswith(f"Given label: {given}.")


def test_the_answer_comes_from_predict_with_export(exports, fake_predict):
    photo = pool_photos()[0]
    app = open_page("try_it")
    app.selectbox(key="try_pool_photo").select(photo.id).run()

    assert not app.exception
    # The newest export with a file, given the photo as decoded from its path.
    assert fake_predict == [(2, load_rgb(photo.path).size)]
    assert app.header[0].value == "Sentinel class, 62.5 % sure"
    assert "run1.onnx" in app.caption[-1].value
    [warning] = app.warning
    assert warning.value.endswith("The export says Sentinel class instead.")


def test_random_pool_photo_picks_one_from_the_pool(exports, fake_predict, monkeypatch):
    monkeypatch.setattr(random, "choice", lambda ids: ids[-1])
    app = open_page("try_it")
    assert not fake_predict

    app.button(key="try_random").click().run()

    assert not app.exception
    assert app.selectbox(key="try_pool_photo").value == pool_photos()[-1].id
    assert len(fake_predict) == 1
    assert app.header[0].value == "Sentinel class, 62.5 % sure"


def test_an_uploaded_photo_is_answered_without_a_given_label(exports, fake_predict):
    photo = pool_photos()[0]
    app = open_page("try_it")
    app.radio(key="try_source").set_value("upload").run()
    app.get("file_uploader")[0].set_value(
        ("lunch.jpg", Path(photo.path).read_bytes(), "image/jpeg")
    )
    app.run()

    assert not app.exception and not app.error
    assert fake_predict == [(2, load_rgb(photo.path).size)]
    assert app.header[0].value == "Sentinel class, 62.5 % sure"
    assert not app.success and not app.warning


def test_an_unreadable_upload_is_named(exports, fake_predict):
    app = open_page("try_it")
    app.radio(key="try_source").set_value("upload").run()
    app.get("file_uploader")[0].set_value(("broken.jpg", b"not a photo", "image/jpeg"))
    app.run()

    assert not app.exception
    [error] = app.error
    assert error.value.startswith("broken.jpg: ")
    assert not fake_predict and not app.header


def test_a_missing_model_file_is_named(exports, fake_predict, monkeypatch):
    import pipeline.export

    # As if the file went between listing the exports and running one.
    def every_export(session):
        return list(session.scalars(select(Export).order_by(Export.id.desc())))

    monkeypatch.setattr(pipeline.export, "list_exports", every_export)
    app = open_page("try_it")
    app.selectbox(key="try_pool_photo").select(pool_photos()[0].id).run()

    assert not app.exception
    [error] = app.error
    assert str(exports / "gone.pte") in error.value
    assert not fake_predict and not app.header
