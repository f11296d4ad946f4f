"""The review dashboard's queries (queue, audit trail, counts) and bulk actions.

The review queue ranks pool photos by the latest finished run's out-of-fold
score (1 - p(given label)), most confused first; photos that run did not score
come after them, by id. The order comes from the stored scores, so it stays
put while a reviewer works through it and changes only when a run rescores.
Holdout photos never appear: they are the frozen test set.

A bulk action is one `apply_action` per photo, each on the version the page
showed and committed on its own, so a photo someone else changed meanwhile is
skipped and reported without holding back the rest.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, aliased

from db.engine import session_scope
from db.labels import StaleLabelError, apply_action
from db.models import (
    EXCLUDED,
    POOL,
    QUEUED,
    RUNNING,
    STATUSES,
    Job,
    LabelEvent,
    Photo,
    Prediction,
    SkippedFile,
    TrainingRun,
    utcnow,
)
from db.settings import get_settings
from pipeline.images import load_rgb
from pipeline.runs import latest_run
from pipeline.scoring import OOF

logger = logging.getLogger(__name__)

DISAGREES = "disagrees"
UNSURE = "unsure"
AGREES = "agrees"
UNSCORED = "unscored"
REASON_KINDS = (DISAGREES, UNSURE, AGREES, UNSCORED)
# The cut below which `pipeline.scoring.describe` calls an agreeing model unsure.
UNSURE_BELOW = 0.65

THUMBNAIL_SIDE = 320


@dataclass(frozen=True)
class ReviewFilters:
    """Narrow the queue; `None` means any value."""

    label: str | None = None
    predicted: str | None = None
    status: str | None = None
    reason_kind: str | None = None

    def __post_init__(self):
        if self.status is not None and self.status not in STATUSES:
            raise ValueError(
                f"unknown status {self.status!r}; expected one of {STATUSES}"
            )
        if self.reason_kind is not None and self.reason_kind not in REASON_KINDS:
            raise ValueError(
                f"unknown reason kind {self.reason_kind!r}; "
                f"expected one of {REASON_KINDS}"
            )


@dataclass(frozen=True)
class ReviewItem:
    """One pool photo as the reviewer sees it, with the run's verdict if any."""

    photo_id: int
    path: str
    sha256: str
    label: str
    original_label: str
    status: str
    version: int
    predicted_label: str | None
    confidence: float | None
    score: float | None
    reason: str
    reason_kind: str
    # The label the photo had when the run scored it.
    scored_label: str | None


@dataclass(frozen=True)
class ReviewQueue:
    """One slice of the queue, the number of photos in all, and the run it ranks by."""

    items: list[ReviewItem]
    total: int
    run_id: int | None


def _reason_kind_column():
    return case(
        (Prediction.id.is_(None), UNSCORED),
        (Prediction.predicted_label != Prediction.given_label, DISAGREES),
        (Prediction.confidence < UNSURE_BELOW, UNSURE),
        else_=AGREES,
    )


def _latest_run_id(session: Session) -> int | None:
    run = latest_run(session)
    return run.id if run is not None else None


def _queue_select(filters: ReviewFilters, run_id: int | None, *columns):
    """`columns` of the filtered queue, joined to the run's oof predictions."""
    joined = and_(
        Prediction.photo_id == Photo.id,
        Prediction.run_id == run_id,
        Prediction.kind == OOF,
    )
    conditions = [Photo.split == POOL]
    if filters.label is not None:
        conditions.append(Photo.label == filters.label)
    if filters.predicted is not None:
        conditions.append(Prediction.predicted_label == filters.predicted)
    if filters.status is not None:
        conditions.append(Photo.status == filters.status)
    if filters.reason_kind is not None:
        conditions.append(_reason_kind_column() == filters.reason_kind)
    return (
        select(*columns)
        .select_from(Photo)
        .outerjoin(Prediction, joined)
        .where(*conditions)
    )


# Most confused first; photos without a score last, by id.
_QUEUE_ORDER = (Prediction.score.is_(None), Prediction.score.desc(), Photo.id)


def review_queue(
    session: Session,
    filters: ReviewFilters | None = None,
    offset: int = 0,
    limit: int = 24,
    run_id: int | None = None,
) -> ReviewQueue:
    """Pool photos, most confused first, after `offset`, at most `limit`.

    Args:
        filters: narrow by current label, predicted label, status, reason kind.
        run_id: rank by this run's scores; default the latest finished run.
    """
    filters = filters or ReviewFilters()
    if run_id is None:
        run_id = _latest_run_id(session)
    kind = _reason_kind_column().label("reason_kind")
    query = _queue_select(filters, run_id, Photo, Prediction, kind)

    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.execute(
        query.order_by(*_QUEUE_ORDER).offset(max(offset, 0)).limit(limit)
    ).all()
    items = [
        _item(photo, prediction, reason_kind) for photo, prediction, reason_kind in rows
    ]
    return ReviewQueue(items=items, total=total or 0, run_id=run_id)


def queue_position(
    session: Session,
    photo_id: int,
    filters: ReviewFilters | None = None,
    run_id: int | None = None,
) -> int | None:
    """Where `photo_id` stands in the filtered queue (0 = first), or None."""
    filters = filters or ReviewFilters()
    if run_id is None:
        run_id = _latest_run_id(session)
    ids = session.scalars(
        _queue_select(filters, run_id, Photo.id).order_by(*_QUEUE_ORDER)
    ).all()
    try:
        return ids.index(photo_id)
    except ValueError:
        return None


def _item(photo: Photo, prediction: Prediction | None, reason_kind: str) -> ReviewItem:
    return ReviewItem(
        photo_id=photo.id,
        path=photo.path,
        sha256=photo.sha256,
        label=photo.label,
        original_label=photo.original_label,
        status=photo.status,
        version=photo.version,
        predicted_label=prediction.predicted_label if prediction else None,
        confidence=prediction.confidence if prediction else None,
        score=prediction.score if prediction else None,
        reason=prediction.reason if prediction else "not scored by the latest run",
        reason_kind=reason_kind,
        scored_label=prediction.given_label if prediction else None,
    )


def thumbnail(path: str | Path, sha256: str, side: int = THUMBNAIL_SIDE) -> Path:
    """A small upright JPEG of the photo, made once under ARTIFACT_DIR/thumbs.

    Raises:
        BadImageError: the photo cannot be decoded.
    """
    target = get_settings().artifact_dir / "thumbs" / f"{sha256}.jpg"
    if target.exists():
        return target
    image = load_rgb(path)
    image.thumbnail((side, side))
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name first, so a half-written file is never served.
    partial = target.with_name(f"{sha256}.partial.jpg")
    image.save(partial, "JPEG", quality=85)
    partial.replace(target)
    return target


# What each bulk action reads as in a report, past tense.
BULK_ACTIONS = {"confirm": "Confirmed", "relabel": "Relabelled", "exclude": "Excluded"}


@dataclass
class BulkResult:
    """What one action on many photos did, photo by photo."""

    action: str
    new_label: str | None = None
    done: list[int] = field(default_factory=list)
    # Photos changed by someone else since they were shown: nothing saved.
    stale: list[StaleLabelError] = field(default_factory=list)
    # (photo id, why) for photos the action cannot apply to.
    failed: list[tuple[int, str]] = field(default_factory=list)

    @property
    def attempted(self) -> int:
        return len(self.done) + len(self.stale) + len(self.failed)

    def summary(self) -> str:
        """One paragraph for the reviewer: counts first, then each photo not saved."""
        target = f" to {self.new_label}" if self.action == "relabel" else ""
        text = (
            f"{BULK_ACTIONS[self.action]} {len(self.done)} of {self.attempted} "
            f"selected photos{target}."
        )
        if self.stale:
            photos = ", ".join(
                f"#{error.photo_id} (now **{error.label}**, {error.status})"
                for error in self.stale
            )
            text += f" Not saved, changed since this page showed them: {photos}."
        if self.failed:
            reasons = "; ".join(f"#{photo_id}: {why}" for photo_id, why in self.failed)
            text += f" Not saved: {reasons}."
        return text


def apply_to_many(
    action: str,
    shown: Sequence[tuple[int, int]],
    new_label: str | None = None,
    source: str = "review",
    engine: Engine | None = None,
) -> BulkResult:
    """Apply one action to each (photo id, version shown) pair, one commit each.

    A photo changed since it was shown, or one the action cannot apply to,
    is reported and skipped; the others are still saved.

    Raises:
        ValueError: `action` is not one of `BULK_ACTIONS`.
    """
    if action not in BULK_ACTIONS:
        raise ValueError(
            f"unknown bulk action {action!r}; expected one of {list(BULK_ACTIONS)}"
        )
    result = BulkResult(action=action, new_label=new_label)
    for photo_id, version in shown:
        try:
            with session_scope(engine) as session:
                apply_action(
                    session,
                    photo_id,
                    action,
                    new_label=new_label,
                    expected_version=version,
                    source=source,
                )
        except StaleLabelError as error:
            result.stale.append(error)
        except (LookupError, ValueError) as error:
            result.failed.append((photo_id, str(error)))
        else:
            result.done.append(photo_id)
    logger.info(
        "%s on %d photos: %d saved, %d stale, %d failed",
        action,
        result.attempted,
        len(result.done),
        len(result.stale),
        len(result.failed),
    )
    return result


@dataclass(frozen=True)
class HistoryRow:
    """One label event with the photo it changed."""

    event_id: int
    created_at: datetime
    photo_id: int
    path: str
    old_label: str
    new_label: str
    old_status: str
    new_status: str
    source: str
    undoes_id: int | None
    undone_by_id: int | None
    # The photo's version when the row was read: an undo applies only to it.
    photo_version: int


def label_history(
    session: Session,
    source: str | None = None,
    label: str | None = None,
    offset: int = 0,
    limit: int = 50,
) -> tuple[list[HistoryRow], int]:
    """The audit trail, newest first, and the number of events matching.

    Args:
        source: only events from this source (`review`, `undo`, `cli`, ...).
        label: only events whose old or new label is this class.
    """
    undo = aliased(LabelEvent)
    undone_by = (
        select(func.max(undo.id))
        .where(undo.undoes_id == LabelEvent.id)
        .scalar_subquery()
    )
    conditions = []
    if source is not None:
        conditions.append(LabelEvent.source == source)
    if label is not None:
        conditions.append(
            or_(LabelEvent.old_label == label, LabelEvent.new_label == label)
        )

    base = (
        select(LabelEvent, Photo.path, Photo.version, undone_by.label("undone_by"))
        .join(Photo, Photo.id == LabelEvent.photo_id)
        .where(*conditions)
    )
    total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
    rows = session.execute(
        base.order_by(LabelEvent.id.desc()).offset(max(offset, 0)).limit(limit)
    ).all()
    history = [
        HistoryRow(
            event_id=event.id,
            created_at=event.created_at,
            photo_id=event.photo_id,
            path=path,
            old_label=event.old_label,
            new_label=event.new_label,
            old_status=event.old_status,
            new_status=event.new_status,
            source=event.source,
            undoes_id=event.undoes_id,
            undone_by_id=undone_by_id,
            photo_version=version,
        )
        for event, path, version, undone_by_id in rows
    ]
    return history, total


def event_sources(session: Session) -> list[str]:
    """Every source that has written a label event."""
    return sorted(session.scalars(select(LabelEvent.source).distinct()))


def photo_counts(session: Session) -> list[dict]:
    """Photos per split, current label and status, as rows for a table."""
    rows = session.execute(
        select(Photo.split, Photo.label, Photo.status, func.count())
        .group_by(Photo.split, Photo.label, Photo.status)
        .order_by(Photo.split, Photo.label, Photo.status)
    ).all()
    return [
        {"split": split, "label": label, "status": status, "photos": count}
        for split, label, status, count in rows
    ]


def relabelled_count(session: Session) -> int:
    """Pool photos whose label now differs from their folder's name."""
    return (
        session.scalar(
            select(func.count())
            .select_from(Photo)
            .where(Photo.split == POOL, Photo.label != Photo.original_label)
        )
        or 0
    )


def skipped_files(session: Session) -> list[SkippedFile]:
    return list(session.scalars(select(SkippedFile).order_by(SkippedFile.path)))


def training_photos(session: Session) -> list:
    """Pool photos left in training (not excluded), by file name: id, path, label."""
    rows = session.execute(
        select(Photo.id, Photo.path, Photo.label).where(
            Photo.split == POOL, Photo.status != EXCLUDED
        )
    ).all()
    return sorted(rows, key=lambda row: (Path(row.path).name, row.id))


def list_runs(session: Session) -> list[TrainingRun]:
    """Every training run, newest first."""
    return list(session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc())))


def latest_job(session: Session, kind: str) -> Job | None:
    """The newest job of `kind` (`train` or `export`), whatever its state."""
    return session.scalars(
        select(Job).where(Job.kind == kind).order_by(Job.id.desc()).limit(1)
    ).first()


def is_active(job: Job) -> bool:
    return job.state in (QUEUED, RUNNING)


def estimate_seconds_left(job: Job, now: datetime | None = None) -> float | None:
    """Time left at the pace so far, or `None` before there is a pace to go by."""
    if job.started_at is None or job.progress < 0.02 or job.progress >= 1.0:
        return None
    elapsed = ((now or utcnow()) - job.started_at).total_seconds()
    return max(elapsed * (1.0 - job.progress) / job.progress, 0.0)
