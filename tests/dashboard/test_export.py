import sys

from sqlalchemy import select

from db.engine import get_engine, session_scope
from db.models import Job
from tests.dashboard.conftest import open_page


def job_params() -> list[dict]:
    with session_scope(get_engine()) as session:
        return [job.params for job in session.scalars(select(Job).order_by(Job.id))]


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


def test_the_page_points_to_try_it_for_trying_an_export(exports):
    app = open_page("export")
    assert not app.get("file_uploader")
    [link] = app.page_link
    assert link.value == "Try an export on a photo"
    assert link.proto.page == "try_it"


def test_a_missing_export_module_leaves_a_message(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "pipeline.export", None)
    app = open_page("export")
    assert not app.exception
    [info] = app.info
    assert info.value.startswith("Exporting is not available in this installation")
