"""Label changes: confirm, relabel, exclude and undo, each with an audit row.

Photos in the unlabelled split get their first label with `accept_label`,
which moves them into the pool; undoing that puts them back.

Every change is a conditional update on the photo's version, so two reviewers
acting on the same photo cannot overwrite each other silently: the second one
gets `StaleLabelError` carrying the label that is there now. An event can be
undone once; asking again (from a page drawn before the first undo) raises
`AlreadyUndoneError` instead of reverting whatever came after.
"""

import logging

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import (
    CONFIRMED,
    EXCLUDED,
    HOLDOUT,
    NO_LABEL,
    POOL,
    RELABELLED,
    UNLABELLED,
    UNREVIEWED,
    LabelEvent,
    Photo,
)

logger = logging.getLogger(__name__)

ACTIONS = ("confirm", "relabel", "exclude", "restore")
# Actions that make sense before a photo has any label.
UNLABELLED_ACTIONS = ("exclude", "restore")
ACCEPT_SOURCE = "label"


class StaleLabelError(Exception):
    """The photo changed since the caller read it."""

    def __init__(self, photo: Photo, message: str | None = None):
        self.photo_id = photo.id
        self.label = photo.label
        self.status = photo.status
        self.version = photo.version
        super().__init__(
            message
            or f"photo {photo.id} was changed by someone else: it is now "
            f"{photo.label!r} ({photo.status}); reload and try again"
        )


class AlreadyUndoneError(StaleLabelError):
    """The event has been undone already; undoing it again would revert later
    changes instead."""

    def __init__(self, event: LabelEvent, undo_id: int):
        self.event_id = event.id
        self.undo_id = undo_id
        photo = event.photo
        super().__init__(
            photo,
            f"event {event.id} was already undone by event {undo_id}; photo "
            f"{photo.id} is now {photo.label!r} ({photo.status}) and was left as is",
        )


def class_names(session: Session) -> list[str]:
    """Every class known to the database: folder names and labels given since.

    Unlabelled photos add none: their empty label is not a class.
    """
    labelled = Photo.split != UNLABELLED
    originals = session.scalars(
        select(Photo.original_label).where(labelled).distinct()
    ).all()
    current = session.scalars(select(Photo.label).where(labelled).distinct()).all()
    return sorted(set(originals) | set(current))


def _new_state(photo: Photo, action: str, new_label: str | None) -> tuple[str, str]:
    if action == "confirm":
        return photo.label, CONFIRMED
    if action == "exclude":
        return photo.label, EXCLUDED
    if action == "restore":
        status = RELABELLED if photo.label != photo.original_label else UNREVIEWED
        return photo.label, status
    if action == "relabel":
        if not new_label:
            raise ValueError("relabel needs a new label")
        status = RELABELLED if new_label != photo.original_label else CONFIRMED
        return new_label, status
    raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")


def _write(
    session: Session,
    photo: Photo,
    label: str,
    status: str,
    expected_version: int,
    source: str,
    undoes_id: int | None = None,
    split: str | None = None,
) -> LabelEvent:
    old_label, old_status = photo.label, photo.status
    values = {"label": label, "status": status, "version": Photo.version + 1}
    if split is not None:
        # Moving between the unlabelled split and the pool: the label a photo
        # enters the pool with is its first one; leaving it drops every label.
        values.update(split=split, original_label=label)
    result = session.execute(
        update(Photo)
        .where(Photo.id == photo.id, Photo.version == expected_version)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        session.refresh(photo)
        raise StaleLabelError(photo)
    event = LabelEvent(
        photo_id=photo.id,
        old_label=old_label,
        new_label=label,
        old_status=old_status,
        new_status=status,
        source=source,
        undoes_id=undoes_id,
    )
    session.add(event)
    session.flush()
    session.refresh(photo)
    return event


def apply_action(
    session: Session,
    photo_id: int,
    action: str,
    *,
    new_label: str | None = None,
    expected_version: int | None = None,
    source: str = "review",
) -> LabelEvent:
    """Apply one review action to one photo and record it.

    Args:
        photo_id: the photo to change.
        action: one of `ACTIONS`.
        new_label: the class to give, for `relabel`.
        expected_version: the version the caller saw; `None` means "current".
        source: who made the change (`review`, `cli`, `undo`, ...).

    Raises:
        LookupError: no such photo.
        ValueError: a holdout photo, an unknown action or an unknown class,
            or an unlabelled photo asked for anything but exclude or restore.
        StaleLabelError: the photo changed since `expected_version`.
    """
    photo = session.get(Photo, photo_id)
    if photo is None:
        raise LookupError(f"no photo with id {photo_id}")
    if photo.split == HOLDOUT:
        raise ValueError(
            f"cannot {action} photo {photo_id} ({photo.path}): it is in the frozen "
            "holdout, which review actions never change"
        )
    if photo.split == UNLABELLED and action not in UNLABELLED_ACTIONS:
        raise ValueError(
            f"photo {photo_id} ({photo.path}) has no label yet; give it one "
            f"with accept_label (the Label page) instead of {action!r}"
        )
    if action == "relabel" and new_label not in class_names(session):
        raise ValueError(
            f"unknown class {new_label!r}; expected one of {class_names(session)}"
        )
    label, status = _new_state(photo, action, new_label)
    version = photo.version if expected_version is None else expected_version
    event = _write(session, photo, label, status, version, source)
    logger.info("photo %s: %s -> %s (%s)", photo_id, event.old_label, label, status)
    return event


def accept_label(
    session: Session,
    photo_id: int,
    label: str,
    *,
    expected_version: int | None = None,
    source: str = ACCEPT_SOURCE,
) -> LabelEvent:
    """Give an unlabelled photo its first label and move it into the pool.

    The photo is `confirmed` (a person chose the label), its original label
    becomes `label`, and it trains with the next run.

    Raises:
        LookupError: no such photo.
        ValueError: the photo already has a label, or `label` is not a class.
        StaleLabelError: the photo changed since `expected_version`.
    """
    photo = session.get(Photo, photo_id)
    if photo is None:
        raise LookupError(f"no photo with id {photo_id}")
    if photo.split != UNLABELLED:
        raise ValueError(
            f"photo {photo_id} ({photo.path}) is already labelled {photo.label!r} "
            f"in the {photo.split}; change it with apply_action (the Review page)"
        )
    classes = class_names(session)
    if label not in classes:
        raise ValueError(f"unknown class {label!r}; expected one of {classes}")
    version = photo.version if expected_version is None else expected_version
    event = _write(session, photo, label, CONFIRMED, version, source, split=POOL)
    logger.info("photo %s: first label %s, now in the pool", photo_id, label)
    return event


def _undo_split(event: LabelEvent) -> str | None:
    """The split undoing `event` moves the photo to, if it moved one."""
    if event.old_label == event.new_label:
        return None
    if event.old_label == NO_LABEL:
        return UNLABELLED
    if event.new_label == NO_LABEL:
        return POOL
    return None


def undone_by(session: Session, event_id: int) -> int | None:
    """The id of the event that undid `event_id`, or None if none has."""
    return session.scalar(
        select(LabelEvent.id)
        .where(LabelEvent.undoes_id == event_id)
        .order_by(LabelEvent.id)
        .limit(1)
    )


def undo_event(
    session: Session,
    event_id: int,
    source: str = "undo",
    *,
    expected_version: int | None = None,
) -> LabelEvent:
    """Put the photo back to how it was before `event_id`, as a new event.

    Undoing a first label (`accept_label`) moves the photo back out of the pool.

    Args:
        event_id: the event to undo.
        source: who asked for the undo.
        expected_version: the photo version the caller saw; `None` means
            "current".

    Raises:
        LookupError: no such event.
        AlreadyUndoneError: the event was undone already; a second undo would
            revert whatever changed the photo after the first.
        StaleLabelError: the photo was changed again after that event, or
            since `expected_version`, so undoing it would silently drop the
            later change.
    """
    event = session.get(LabelEvent, event_id)
    if event is None:
        raise LookupError(f"no label event with id {event_id}")
    undo_id = undone_by(session, event_id)
    if undo_id is not None:
        raise AlreadyUndoneError(event, undo_id)
    photo = event.photo
    if (photo.label, photo.status) != (event.new_label, event.new_status):
        raise StaleLabelError(photo)
    # Two undos of one event that pass the checks above together still cannot
    # both land: the first bumps the version the second one expects.
    version = photo.version if expected_version is None else expected_version
    return _write(
        session,
        photo,
        event.old_label,
        event.old_status,
        version,
        source,
        undoes_id=event.id,
        split=_undo_split(event),
    )


def last_event(session: Session, source: str | None = None) -> LabelEvent | None:
    """The newest event that has not been undone, optionally from one source."""
    undone = select(LabelEvent.undoes_id).where(LabelEvent.undoes_id.is_not(None))
    query = (
        select(LabelEvent)
        .where(LabelEvent.id.not_in(undone), LabelEvent.undoes_id.is_(None))
        .order_by(LabelEvent.id.desc())
        .limit(1)
    )
    if source is not None:
        query = query.where(LabelEvent.source == source)
    return session.scalars(query).first()


__all__ = [
    "ACCEPT_SOURCE",
    "ACTIONS",
    "CONFIRMED",
    "EXCLUDED",
    "RELABELLED",
    "UNREVIEWED",
    "AlreadyUndoneError",
    "StaleLabelError",
    "accept_label",
    "apply_action",
    "class_names",
    "last_event",
    "undo_event",
    "undone_by",
]
