"""Grad-CAM heat maps of the trained run, and the Review page's toggle for them.

These use the trained run of `tests/dashboard/conftest.py`, so the model is
trained once per session for the dashboard tests and these alike.
"""

import numpy as np
import streamlit as st
import torch
from PIL import Image
from sqlalchemy import select

from db.engine import get_engine, session_scope
from db.models import POOL, Photo
from pipeline.heatmap import (
    grad_cam,
    heatmap_overlay,
    heatmap_path,
    load_run_model,
    run_image_size,
)
from pipeline.images import load_rgb, preprocess
from pipeline.runs import latest_run
from tests.dashboard.conftest import open_page
from tests.dashboard.test_review import shown_photo_ids


def pool_photos() -> list[Photo]:
    with session_scope(get_engine()) as session:
        query = select(Photo).where(Photo.split == POOL).order_by(Photo.id)
        return list(session.scalars(query))


def test_grad_cam_of_the_trained_model_on_a_real_photo(trained):
    with session_scope(get_engine()) as session:
        run = latest_run(session)
    photo = pool_photos()[0]
    image = load_rgb(photo.path)
    model = load_run_model(run)
    size = run_image_size(run)

    result = grad_cam(model, image, size)

    assert result.cam.shape == (size, size)
    assert result.cam.min() == 0.0 and result.cam.max() == 1.0
    assert result.cam.std() > 0.05
    # By default the map explains the class the model predicts.
    with torch.no_grad():
        logits = model(torch.from_numpy(preprocess(image, size))[None])
    assert result.class_index == int(logits.argmax())

    made = heatmap_overlay(run, photo.path, photo.sha256)

    assert made == trained / "artifacts" / "heatmaps" / f"run-{run.id}" / (
        f"{photo.sha256}.jpg"
    )
    with Image.open(made) as overlay:
        assert overlay.size == image.size
        difference = np.abs(
            np.asarray(overlay, np.float32) - np.asarray(image, np.float32)
        )
    assert difference.mean() > 20
    # Made once: a second call reads the cached file.
    stamp = made.stat().st_mtime_ns
    assert heatmap_overlay(run, photo.path, photo.sha256) == made
    assert made.stat().st_mtime_ns == stamp


def test_heat_map_toggle_shows_overlays_in_the_grid(trained):
    # Earlier tests may have cached overlays in this process; start from none.
    st.cache_data.clear()
    app = open_page("review")
    shown = shown_photo_ids(app)
    with session_scope(get_engine()) as session:
        run = latest_run(session)
    by_id = {photo.id: photo for photo in pool_photos()}

    app.toggle(key="review_heatmap").set_value(True).run()

    assert not app.exception and not app.warning
    assert len(app.get("image")) == len(shown) == 12
    assert all(heatmap_path(run.id, by_id[i].sha256).exists() for i in shown)

    app.toggle(key="review_focus").set_value(True).run()
    assert not app.exception and len(app.get("image")) == 1
    app.toggle(key="review_heatmap").set_value(False).run()
    assert not app.exception and len(app.get("image")) == 1


def test_heat_maps_without_a_trained_run_say_why(small_set):
    app = open_page("review")
    app.toggle(key="review_heatmap").set_value(True).run()
    assert not app.exception
    assert [i.value for i in app.info] == [
        "Heat maps need a trained model: train one on the Train page."
    ]
    assert len(app.get("image")) == 12
