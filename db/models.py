"""ORM models: photos and their labels, the audit trail, runs, exports, jobs.

Labels are plain strings (the class-folder names), so any number of classes
works without a schema change.
"""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Splits a photo can belong to.
POOL = "pool"  # the labelling pool, offered for review and used for training
HOLDOUT = "holdout"  # frozen test photos, never offered for relabelling
# New photos waiting for their first label: never trained, scored or exported
# as a class until a person gives them one, which moves them into the pool.
UNLABELLED = "unlabelled"
SPLITS = (POOL, HOLDOUT, UNLABELLED)
# The label (and original label) of a photo in the unlabelled split.
NO_LABEL = ""

# Review states of a photo.
UNREVIEWED = "unreviewed"
CONFIRMED = "confirmed"
RELABELLED = "relabelled"
EXCLUDED = "excluded"
STATUSES = (UNREVIEWED, CONFIRMED, RELABELLED, EXCLUDED)

# Job states.
QUEUED = "queued"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
JOB_STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Photo(Base):
    """One image file, identified by the SHA-256 of its bytes."""

    __tablename__ = "photos"
    __table_args__ = (Index("ix_photos_split_status", "split", "status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(unique=True)
    width: Mapped[int]
    height: Mapped[int]
    split: Mapped[str] = mapped_column(String(16))
    original_label: Mapped[str]
    label: Mapped[str]
    status: Mapped[str] = mapped_column(String(16), default=UNREVIEWED)
    # 64-bit difference hash of the upright image, as 16 hex digits: photos a
    # few bits apart look the same (resized, recompressed, lightly edited).
    dhash: Mapped[str | None] = mapped_column(String(16), index=True)
    # Bumped on every change; a relabel only applies to the version it saw.
    version: Mapped[int] = mapped_column(default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    events: Mapped[list["LabelEvent"]] = relationship(back_populates="photo")


class SkippedFile(Base):
    """A file found under the data folder that could not be used, and why."""

    __tablename__ = "skipped_files"

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(unique=True)
    reason: Mapped[str]
    # Set when the file is a byte-for-byte copy of a photo already imported.
    duplicate_of_id: Mapped[int | None] = mapped_column(ForeignKey("photos.id"))
    seen_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class LabelEvent(Base):
    """One change to a photo's label or status: the audit trail."""

    __tablename__ = "label_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    photo_id: Mapped[int] = mapped_column(ForeignKey("photos.id"), index=True)
    old_label: Mapped[str]
    new_label: Mapped[str]
    old_status: Mapped[str] = mapped_column(String(16))
    new_status: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(32))
    # Set when this event reverses an earlier one.
    undoes_id: Mapped[int | None] = mapped_column(ForeignKey("label_events.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    photo: Mapped[Photo] = relationship(back_populates="events")


class TrainingRun(Base):
    """A fine-tune on the labels as they were when it started."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default=RUNNING)
    config: Mapped[dict[str, Any]]
    classes: Mapped[list[Any]]
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    artifact_path: Mapped[str | None]
    device: Mapped[str | None]
    n_train: Mapped[int] = mapped_column(default=0)
    # The process doing the training, to tell a crashed run from a live one.
    pid: Mapped[int | None]
    train_seconds: Mapped[float | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    predictions: Mapped[list["Prediction"]] = relationship(
        back_populates="run", cascade="all, delete-orphan"
    )


class Prediction(Base):
    """A run's prediction for one photo.

    Pool photos are scored out-of-fold (`kind="oof"`): by a model that did not
    see the photo. Holdout photos are scored by the trained model itself.
    Unlabelled photos get a suggested label (`kind="prelabel"`); they have no
    given label, so their `score` measures how unsure the model is instead.
    """

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("run_id", "photo_id", "kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id"), index=True)
    photo_id: Mapped[int] = mapped_column(ForeignKey("photos.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    probs: Mapped[list[Any]]
    given_label: Mapped[str]
    predicted_label: Mapped[str]
    confidence: Mapped[float]
    # Higher means more likely mislabelled: 1 - p(given label). For a
    # prelabel, higher means less sure: 1 - (top minus second probability).
    score: Mapped[float]
    reason: Mapped[str] = mapped_column(default="")

    run: Mapped[TrainingRun] = relationship(back_populates="predictions")
    photo: Mapped[Photo] = relationship()


class Export(Base):
    """A model file written from a run, with the checks it passed."""

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id"), index=True)
    format: Mapped[str] = mapped_column(String(16))
    path: Mapped[str]
    sidecar_path: Mapped[str | None]
    size_bytes: Mapped[int]
    checks: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """A background task (train, export) and how far it has got."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default=QUEUED, index=True)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[float] = mapped_column(default=0.0)
    message: Mapped[str] = mapped_column(default="")
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    pid: Mapped[int | None]
    run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"))
    export_id: Mapped[int | None] = mapped_column(ForeignKey("exports.id"))
    heartbeat: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
