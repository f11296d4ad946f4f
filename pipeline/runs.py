"""Looking up training runs."""

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import DONE, TrainingRun


def latest_run(session: Session) -> TrainingRun | None:
    """The newest run that finished."""
    return session.scalars(
        select(TrainingRun)
        .where(TrainingRun.status == DONE)
        .order_by(TrainingRun.id.desc())
        .limit(1)
    ).first()


def get_run(session: Session, run_id: int | None = None) -> TrainingRun:
    """Run `run_id`, or the latest finished run when `run_id` is None.

    Raises:
        LookupError: no such run, or no finished run yet.
        ValueError: the run did not finish.
    """
    if run_id is None:
        run = latest_run(session)
        if run is None:
            raise LookupError("no finished training run yet; train one first")
        return run
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise LookupError(f"no training run with id {run_id}")
    if run.status != DONE:
        raise ValueError(f"run {run_id} is {run.status}, not done")
    return run
