"""Background jobs: training and export run in a worker process of their own.

The dashboard starts a job and returns at once; the worker writes progress,
a heartbeat and the outcome to the job's row, and reads the row's cancel flag.
A job whose worker died (killed, crashed, machine restarted) is marked failed
by `reap_dead_jobs`, which the dashboard and CLI call at start.
"""

import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from datetime import timedelta

import psutil
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from db.engine import create_db_engine, get_engine, session_scope
from db.models import (
    CANCELLED,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    Job,
    TrainingRun,
    utcnow,
)
from db.settings import PROJECT_ROOT, get_settings
from pipeline.progress import Progress

logger = logging.getLogger(__name__)

JOB_KINDS = ("train", "export")
HEARTBEAT_SECONDS = 2.0
STALE_AFTER = timedelta(minutes=2)


def start_job(
    session: Session, kind: str, params: dict | None = None, spawn: bool = True
) -> Job:
    """Record a job and start its worker process; returns without waiting.

    Raises:
        ValueError: unknown kind, or a job of that kind is already running.
    """
    if kind not in JOB_KINDS:
        raise ValueError(f"unknown job kind {kind!r}; expected one of {JOB_KINDS}")
    _check_params(kind, params or {})
    reap_dead_jobs(session)
    busy = session.scalar(
        select(Job).where(Job.kind == kind, Job.state.in_((QUEUED, RUNNING)))
    )
    if busy is not None:
        raise ValueError(f"a {kind} job (#{busy.id}) is already {busy.state}")
    job = Job(kind=kind, params=params or {}, message="waiting for a worker")
    session.add(job)
    session.commit()
    if spawn:
        job.pid = _spawn_worker(job.id)
        session.commit()
    return job


def _check_params(kind: str, params: dict) -> None:
    """Refuse settings the worker would refuse, before a job is recorded."""
    if kind == "train":
        from pipeline.train import TrainConfig

        TrainConfig.from_dict(params)
    elif kind == "export":
        from pipeline.export import ExportConfig

        ExportConfig(**{k: v for k, v in params.items() if k != "run_id"})


def _spawn_worker(job_id: int) -> int:
    log_dir = get_settings().artifact_dir / "jobs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{job_id}.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "worker", str(job_id)],
            cwd=PROJECT_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=os.environ.copy(),
        )
    logger.info("job %s: worker pid %s", job_id, process.pid)
    return process.pid


def request_cancel(session: Session, job_id: int) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    session.commit()


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _worker_alive(job: Job) -> bool:
    if job.pid is None:
        return job.created_at > utcnow() - STALE_AFTER
    return _pid_alive(job.pid)


def reap_dead_jobs(session: Session) -> list:
    """Mark failed every unfinished job or run whose process is gone or silent."""
    reaped = []
    for job in session.scalars(select(Job).where(Job.state.in_((QUEUED, RUNNING)))):
        stale = job.heartbeat is not None and job.heartbeat < utcnow() - STALE_AFTER
        if stale or not _worker_alive(job):
            job.state = FAILED
            job.message = (
                f"worker stopped without finishing (last message: {job.message!r})"
                if not stale
                else "worker stopped sending heartbeats"
            )
            job.finished_at = utcnow()
            reaped.append(job.id)
    for run in session.scalars(
        select(TrainingRun).where(TrainingRun.status == RUNNING)
    ):
        if not _pid_alive(run.pid):
            run.status = FAILED
            run.metrics = {"error": "the training process died before finishing"}
            run.finished_at = utcnow()
            reaped.append(f"run {run.id}")
    if reaped:
        session.commit()
        logger.warning("marked %s failed: their workers died", reaped)
    return reaped


class _JobReporter:
    """Writes progress to the job row at most every HEARTBEAT_SECONDS.

    Progress is best effort: it goes through an engine of its own that waits
    at most a second for the lock, so a caller that holds a write transaction
    (export, scoring) never stalls on its own progress report.
    """

    def __init__(self, job_id: int):
        self.job_id = job_id
        self.last_write = 0.0
        self.engine = create_db_engine(
            get_settings().database_url, busy_timeout_ms=1000
        )

    def beat_until(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_SECONDS * 2):
            try:
                with session_scope(self.engine) as session:
                    session.execute(
                        update(Job)
                        .where(Job.id == self.job_id)
                        .values(heartbeat=utcnow())
                    )
            except OperationalError as error:
                logger.debug("job %s: heartbeat not written (%s)", self.job_id, error)

    def __call__(self, fraction: float, message: str) -> bool:
        now = time.monotonic()
        if now - self.last_write < HEARTBEAT_SECONDS and fraction < 1.0:
            return False
        self.last_write = now
        try:
            with session_scope(self.engine) as session:
                session.execute(
                    update(Job)
                    .where(Job.id == self.job_id)
                    .values(progress=fraction, message=message, heartbeat=utcnow())
                )
                job = session.get(Job, self.job_id)
                return bool(job and job.cancel_requested)
        except OperationalError as error:
            logger.debug("job %s: progress not written (%s)", self.job_id, error)
            return False


def run_job(job_id: int) -> str:
    """Run job `job_id` in this process and record how it ended."""
    from pipeline.train import CancelledError

    engine = get_engine()
    with session_scope(engine) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"no job with id {job_id}")
        job.state, job.started_at, job.heartbeat = RUNNING, utcnow(), utcnow()
        job.pid = os.getpid()
        kind, params = job.kind, dict(job.params)

    reporter = _JobReporter(job_id)
    progress = Progress(reporter)
    # Heartbeats come from a thread of their own, so that a long phase that
    # reports no progress (embedding, scoring) still shows a live worker.
    stop = threading.Event()
    beat = threading.Thread(target=reporter.beat_until, args=(stop,), daemon=True)
    beat.start()
    state, message, result = FAILED, "", {}
    try:
        with session_scope(engine) as session:
            if kind == "train":
                from pipeline.train import TrainConfig, train_run

                run = train_run(session, TrainConfig.from_dict(params), progress)
                result = {"run_id": run.id}
                accuracy = run.metrics.get("accuracy_holdout")
                message = f"run {run.id} done" + (
                    f": holdout accuracy {100 * accuracy:.1f} %" if accuracy else ""
                )
            elif kind == "export":
                from pipeline.export import ExportConfig, export_run

                params = dict(params)
                run_id = params.pop("run_id")
                export = export_run(session, run_id, ExportConfig(**params), progress)
                result = {"export_id": export.id, "run_id": run_id}
                message = f"export {export.id} ({export.format}) written and checked"
        state = DONE
    except CancelledError as error:
        state, message = CANCELLED, str(error)
    except Exception as error:  # the job row is the only place a user sees it
        logger.error("job %s failed:\n%s", job_id, traceback.format_exc())
        state, message = FAILED, f"{type(error).__name__}: {error}"
    stop.set()
    beat.join()
    with session_scope(engine) as session:
        job = session.get(Job, job_id)
        job.state, job.message, job.finished_at = state, message, utcnow()
        if state == DONE:
            job.progress = 1.0
        job.run_id = result.get("run_id", job.run_id)
        job.export_id = result.get("export_id", job.export_id)
    return state
