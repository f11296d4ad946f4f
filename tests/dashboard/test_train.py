import os
import re
from dataclasses import asdict
from datetime import timedelta

from sqlalchemy import select

from db.engine import get_engine, session_scope
from db.models import Job, TrainingRun, utcnow
from pipeline.train import TrainConfig
from tests.dashboard.conftest import open_page


def jobs() -> list[Job]:
    with session_scope(get_engine()) as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def add_job(**values) -> int:
    with session_scope(get_engine()) as session:
        job = Job(kind="train", **values)
        session.add(job)
        session.flush()
        return job.id


def test_train_button_starts_a_job_with_the_form_settings(small_set, no_workers):
    app = open_page("train")
    app.number_input(key="train_frozen_epochs").set_value(1)
    app.number_input(key="train_unfrozen_epochs").set_value(0)
    app.number_input(key="train_image_size").set_value(160)
    app.number_input(key="train_max_per_class").set_value(40)
    app.number_input(key="train_crop_views").set_value(2)
    app.number_input(key="train_head_hidden").set_value(0)
    app.number_input(key="train_tta_crops").set_value(3)
    app.button(key="train_submit").click().run()

    assert not app.exception
    [job] = jobs()
    assert job.kind == "train" and job.state == "queued"
    changed = {
        "frozen_epochs": 1,
        "unfrozen_epochs": 0,
        "image_size": 160,
        "max_per_class": 40,
        "crop_views": 2,
        "head_hidden": 0,
        "tta_crops": 3,
    }
    # Every other setting is TrainConfig's default.
    assert job.params == {**asdict(TrainConfig()), **changed}
    # The page now follows the job, and Train waits for it.
    assert len(app.get("progress")) == 1
    assert app.button(key=f"cancel-job-{job.id}")
    assert app.button(key="train_submit").disabled


def test_zero_epochs_is_refused(small_set, no_workers):
    app = open_page("train")
    app.number_input(key="train_frozen_epochs").set_value(0)
    app.number_input(key="train_unfrozen_epochs").set_value(0)
    app.button(key="train_submit").click().run()
    assert [e.value for e in app.error] == [
        "Set at least one epoch: head-only or whole-network epochs."
    ]
    assert jobs() == []


def test_a_running_job_shows_progress_time_left_and_can_be_cancelled(small_set):
    # Half done after 60 s: about 60 s left.
    job_id = add_job(
        state="running",
        progress=0.5,
        message="head: epoch 1/2, batch 3/6, loss 0.512",
        started_at=utcnow() - timedelta(seconds=60),
        heartbeat=utcnow(),
        pid=os.getpid(),
    )
    app = open_page("train")

    [bar] = app.get("progress")
    assert bar.proto.value == 50
    assert "head: epoch 1/2, batch 3/6" in bar.proto.text
    captions = [c.value for c in app.caption]
    assert any(re.fullmatch(r"50 % · about 1 min 0\d s left", c) for c in captions)

    app.button(key=f"cancel-job-{job_id}").click().run()
    assert jobs()[0].cancel_requested
    assert app.button(key=f"cancel-job-{job_id}").disabled


def test_how_the_last_job_ended_is_shown(small_set):
    add_job(state="done", message="run 1 done", finished_at=utcnow())
    app = open_page("train")
    assert [s.value for s in app.success][0].endswith(": run 1 done")

    add_job(
        state="failed", message="NotTrainableError: no photos", finished_at=utcnow()
    )
    app.run()
    [error] = app.error
    assert "NotTrainableError: no photos" in error.value and "jobs/2.log" in error.value

    add_job(state="cancelled", message="training cancelled", finished_at=utcnow())
    app.run()
    assert [w.value for w in app.warning][0].endswith(": training cancelled")


def test_a_dead_worker_is_reported_as_failed(small_set):
    add_job(state="running", pid=2**22 + 12345, message="head: epoch 1/1")
    app = open_page("train")
    [error] = app.error
    assert "worker stopped without finishing" in error.value
    assert jobs()[0].state == "failed"


def test_runs_table_confusion_matrix_and_chart(trained):
    with session_scope(get_engine()) as session:
        run = session.scalars(select(TrainingRun)).one()
    app = open_page("train")

    assert not app.exception
    runs, confusion = (frame.value for frame in app.dataframe)
    assert list(runs["run"]) == [run.id]
    assert list(runs["status"]) == ["done"]
    expected = f"{100 * run.metrics['accuracy_holdout']:.1f} %"
    assert list(runs["holdout accuracy"]) == [expected]
    assert list(runs["photos trained on"]) == [12]
    assert list(runs["settings"]) == ["128 px, 1+0 epochs, seed 42"]

    assert list(confusion.index) == ["given hot_dog", "given not_hot_dog"]
    assert list(confusion.columns) == ["predicted hot_dog", "predicted not_hot_dog"]
    assert confusion.values.tolist() == run.metrics["confusion"]
    assert confusion.values.sum() == 8
    assert app.metric[0].value == expected
    assert len(app.get("vega_lite_chart")) == 1


def test_fit_time_is_shown_beside_the_whole_run_time(trained):
    with session_scope(get_engine()) as session:
        run = session.scalars(select(TrainingRun)).one()
        run.train_seconds = 75.6
        run.finished_at = run.created_at + timedelta(seconds=234)
    app = open_page("train")

    (fit,) = [metric for metric in app.metric if metric.label == "Fit time"]
    assert fit.value == "1 min 16 s"
    assert "The whole run, with holdout evaluation" in fit.help
    assert "took 3 min 54 s" in fit.help


def test_each_finished_run_offers_its_cleaning_report(small_set):
    open_page()  # imports the photos
    with session_scope(get_engine()) as session:
        for accuracy in (0.5, 0.75):
            session.add(
                TrainingRun(
                    status="done",
                    config={},
                    classes=["hot_dog", "not_hot_dog"],
                    metrics={
                        "accuracy_holdout": accuracy,
                        "confusion": [[1, 1], [0, 2]],
                    },
                )
            )
    app = open_page("train")

    assert not app.exception
    [button] = app.get("download_button")
    assert button.label == "Download cleaning report"
    assert button.key == "train_report_2"  # the newest run is the one shown
