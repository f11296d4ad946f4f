import os
import signal
import time

from sqlalchemy import select

from db.engine import session_scope
from db.models import DONE, FAILED, RUNNING, Job, TrainingRun
from pipeline.ingest import ingest_folder
from pipeline.jobs import reap_dead_jobs, request_cancel, start_job

TINY = {
    "image_size": 96,
    "frozen_epochs": 1,
    "unfrozen_epochs": 0,
    "folds": 2,
    "tta": False,
}


def _wait(engine, job_id, until, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(engine) as session:
            reap_dead_jobs(session)
            job = session.get(Job, job_id)
            if until(job):
                return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not get there in {timeout} s")


def test_train_job_runs_in_a_worker_and_records_the_run(engine, small_set):
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        job = start_job(session, "train", TINY)
        assert job.pid is not None and job.pid != os.getpid()
    job = _wait(engine, job.id, lambda j: j.state not in ("queued", "running"))
    assert job.state == DONE, job.message
    assert job.progress == 1.0 and "holdout accuracy" in job.message
    with session_scope(engine) as session:
        run = session.get(TrainingRun, job.run_id)
        assert run.status == DONE and run.config["image_size"] == 96


def test_a_killed_worker_is_marked_failed_with_the_reason(engine, small_set):
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        job = start_job(session, "train", {**TINY, "frozen_epochs": 50})
    job = _wait(engine, job.id, lambda j: j.message.startswith("head"))
    os.killpg(job.pid, signal.SIGKILL)
    time.sleep(1.0)
    with session_scope(engine) as session:
        reaped = reap_dead_jobs(session)
        job = session.get(Job, job.id)
        assert job.id in reaped
        assert job.state == FAILED and "without finishing" in job.message
        run = session.scalars(select(TrainingRun)).one()
        assert run.status == FAILED and run.artifact_path is None


def test_a_second_train_job_is_refused_while_one_runs(engine, small_set):
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        first = start_job(session, "train", {**TINY, "frozen_epochs": 50})
        try:
            try:
                start_job(session, "train", TINY)
            except ValueError as error:
                assert f"#{first.id}" in str(error)
            else:
                raise AssertionError("second job was not refused")
        finally:
            request_cancel(session, first.id)
    job = _wait(engine, first.id, lambda j: j.state not in ("queued", RUNNING))
    assert job.state == "cancelled"


def test_a_job_with_bad_settings_is_refused_before_it_is_recorded(engine):
    with session_scope(engine) as session:
        for kind, params, named in (
            ("train", {**TINY, "batch_size": 0}, "batch_size"),
            ("export", {"run_id": 1, "format": "tflite"}, "'tflite'"),
        ):
            try:
                start_job(session, kind, params, spawn=False)
            except ValueError as error:
                assert named in str(error)
            else:
                raise AssertionError(f"{kind} job with {params} was accepted")
        assert session.scalars(select(Job)).all() == []
