import json
import sys

import numpy as np
import pytest
from sqlalchemy import select

from db.engine import get_engine, session_scope
from db.models import Export, Job
from tests.conftest import real_photos
from tests.dashboard.conftest import open_page

CHECKS = {
    "agreement": 1.0,
    "max_prob_diff": 4e-6,
    "accuracy_holdout": 0.75,
    "size_mb": 18.6,
    "latency_ms_median": 9.8,
}


def job_params() -> list[dict]:
    with session_scope(get_engine()) as session:
        return [job.params for job in session.scalars(select(Job).order_by(Job.id))]


@pytest.fixture
def exports(trained):
    """Two recorded exports of run 1 with files on disk, and one whose file is gone."""
    folder = trained / "artifacts" / "exports"
    folder.mkdir(parents=True)
    model, sidecar = folder / "run1.pte", folder / "run1.json"
    model.write_bytes(b"\0" * 2048)
    sidecar.write_text(json.dumps({"labels": ["hot_dog", "not_hot_dog"]}))
    onnx = folder / "run1.onnx"
    onnx.write_bytes(b"\1" * 1024)
    with session_scope(get_engine()) as session:
        session.add_all(
            [
                Export(run_id=1, format="pte", path=str(model),
                       sidecar_path=str(sidecar), size_bytes=2048, checks=CHECKS),
                Export(run_id=1, format="onnx", path=str(onnx), sidecar_path=None,
                       size_bytes=1024, checks={"agreement": 0.995}),
                Export(run_id=1, format="pte", path=str(folder / "gone.pte"),
                       sidecar_path=None, size_bytes=10, checks={}),
            ]
        )  # fmt: skip
    return folder


def test_without_a_finished_run_there_is_nothing_to_export(small_set):
    app = open_page("export")
    assert not app.exception
    assert [i.value for i in app.info] == [
        "No finished training run to export yet: train one on the Train page."
    ]


def test_export_button_starts_an_export_job(trained, no_workers):
    app = open_page("export")
    assert [i.value for i in app.info] == [
        "No exports yet: pick a run and press Export."
    ]

    app.radio(key="export_format").set_value("onnx").run()
    assert app.checkbox(key="export_int8").disabled
    app.button(key="export_start").click().run()

    assert not app.exception
    assert job_params() == [{"run_id": 1, "format": "onnx", "int8": False}]
    assert len(app.get("progress")) == 1


def test_int8_pte_export(trained, no_workers):
    app = open_page("export")
    app.checkbox(key="export_int8").check().run()
    app.button(key="export_start").click().run()
    assert job_params() == [{"run_id": 1, "format": "pte", "int8": True}]


def test_exports_are_listed_with_their_checks_and_files(exports):
    app = open_page("export")

    assert not app.exception
    table = app.dataframe[0].value
    assert list(table["format"]) == ["onnx", "pte"]  # newest first, gone.pte left out
    assert list(table["file"]) == ["run1.onnx", "run1.pte"]
    pte = table[table["format"] == "pte"].iloc[0]
    assert pte["size (MB)"] == 18.6
    assert pte["agreement"] == "100.0 %"
    assert pte["holdout accuracy"] == "75.0 %"
    assert pte["median latency (ms)"] == 9.8

    app.selectbox(key="export_selected_2").select(1).run()
    labels = [button.proto.label for button in app.get("download_button")]
    assert labels == ["Download run1.pte", "Download run1.json"]


def test_trying_an_export_on_an_uploaded_photo(exports, monkeypatch):
    import pipeline.export

    seen = {}

    def fake_predict(export, image):
        seen["export"], seen["size"] = export.id, image.size
        return "not_hot_dog", 0.875, np.array([0.125, 0.875])

    monkeypatch.setattr(pipeline.export, "predict_with_export", fake_predict)
    photo = real_photos("test", "hot_dog", 1)[0]
    app = open_page("export")
    app.selectbox(key="export_selected_2").select(1).run()
    app.get("file_uploader")[0].set_value(
        (photo.name, photo.read_bytes(), "image/jpeg")
    )
    app.run()

    assert not app.exception
    assert seen["export"] == 1 and min(seen["size"]) > 0
    assert app.metric[0].value == "not_hot_dog"
    assert app.metric[0].proto.delta == "87.5 % sure"


def test_a_missing_export_module_leaves_a_message(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "pipeline.export", None)
    app = open_page("export")
    assert not app.exception
    [info] = app.info
    assert info.value.startswith("Exporting is not available in this installation")
