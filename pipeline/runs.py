"""Looking up training runs, and what changed on the holdout between two."""

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from db.models import DONE, Photo, Prediction, TrainingRun
from pipeline.scoring import HOLDOUT_KIND

# How a holdout photo's prediction changed between two runs.
FIXED = "fixed"  # now right, was wrong
BROKEN = "broken"  # now wrong, was right
OTHER = "other"  # wrong both times, as a different class
CHANGES = (FIXED, BROKEN, OTHER)


def latest_run(session: Session) -> TrainingRun | None:
    """The newest run that finished."""
    return session.scalars(
        select(TrainingRun)
        .where(TrainingRun.status == DONE)
        .order_by(TrainingRun.id.desc())
        .limit(1)
    ).first()


def previous_run(session: Session, run: TrainingRun) -> TrainingRun | None:
    """The finished run started last before `run`."""
    return session.scalars(
        select(TrainingRun)
        .where(TrainingRun.status == DONE, TrainingRun.id < run.id)
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


@dataclass(frozen=True)
class HoldoutFlip:
    """A holdout photo the two runs predicted differently."""

    photo_id: int
    path: str
    sha256: str
    given_label: str
    previous_label: str  # what the earlier run predicted
    predicted_label: str  # what the later run predicted
    previous_confidence: float
    confidence: float

    @property
    def change(self) -> str:
        if self.predicted_label == self.given_label:
            return FIXED
        if self.previous_label == self.given_label:
            return BROKEN
        return OTHER


@dataclass(frozen=True)
class HoldoutFlips:
    """Which holdout predictions changed from run `previous_id` to `run_id`."""

    run_id: int
    previous_id: int
    # Holdout photos both runs predicted; the others cannot have flipped.
    compared: int
    flips: list[HoldoutFlip]

    def count(self, change: str) -> int:
        return sum(flip.change == change for flip in self.flips)


def holdout_flips(
    session: Session, run: TrainingRun, previous: TrainingRun
) -> HoldoutFlips:
    """The holdout photos whose predicted label differs between two runs.

    Fixed ones first, then broken, then the other flips; by photo id within.
    Photos only one of the runs predicted (imported in between, or left out by
    a per-class limit) are not compared.
    """
    new, old = aliased(Prediction), aliased(Prediction)
    both = (
        select(Photo, new, old)
        .join(new, new.photo_id == Photo.id)
        .join(old, old.photo_id == Photo.id)
        .where(
            new.run_id == run.id,
            new.kind == HOLDOUT_KIND,
            old.run_id == previous.id,
            old.kind == HOLDOUT_KIND,
        )
    )
    rows = session.execute(both.order_by(Photo.id)).all()
    flips = [
        HoldoutFlip(
            photo_id=photo.id,
            path=photo.path,
            sha256=photo.sha256,
            given_label=after.given_label,
            previous_label=before.predicted_label,
            predicted_label=after.predicted_label,
            previous_confidence=before.confidence,
            confidence=after.confidence,
        )
        for photo, after, before in rows
        if after.predicted_label != before.predicted_label
    ]
    flips.sort(key=lambda flip: CHANGES.index(flip.change))
    return HoldoutFlips(run.id, previous.id, len(rows), flips)
