"""New photos without a label: bring them in, suggest a label, let a person decide.

Photos land in the unlabelled split from `DATA_DIR/unlabelled/` at import or
as uploads (`add_uploads`). The latest run suggests a label for each
(`prelabel`, stored as predictions of kind "prelabel"), and `label_queue`
puts first the photos the model is least sure about (uncertainty sampling:
smallest margin between its two most likely classes, then lowest top
probability), because a person's answer there teaches the next run the most.
`accept` gives a photo its label and moves it into the pool, so it trains with
the next run. Until then a photo here is never trained on or scored.
"""

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import and_, delete, func, select
from sqlalchemy.orm import Session

from db.labels import accept_label
from db.models import (
    EXCLUDED,
    NO_LABEL,
    UNLABELLED,
    LabelEvent,
    Photo,
    Prediction,
    TrainingRun,
)
from db.settings import get_settings
from pipeline.images import IMAGE_SIZE, BadImageError, load_rgb
from pipeline.ingest import ingest_files
from pipeline.model import get_device, load_weights
from pipeline.runs import latest_run
from pipeline.train import body_trained, predict_views

logger = logging.getLogger(__name__)

PRELABEL = "prelabel"
UPLOADS_FOLDER = "uploads"
ADDED = "added"
KNOWN = "known"
REFUSED = "refused"

# The suffix an upload is stored under, by the format Pillow finds in it, when
# the uploaded name does not already carry one of that format's suffixes.
_FORMAT_SUFFIX = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
}


@dataclass(frozen=True)
class UploadResult:
    """What became of one uploaded file."""

    name: str
    outcome: str  # ADDED, KNOWN (the same bytes are already a photo) or REFUSED
    photo_id: int | None = None
    reason: str = ""


def add_uploads(session: Session, files: list[tuple[str, bytes]]) -> list[UploadResult]:
    """Store uploaded files and import them into the unlabelled split.

    Each file is kept as `ARTIFACT_DIR/uploads/<sha256><suffix>`, so the same
    photo uploaded twice (under any name) is stored and imported once. A file
    that is empty or cannot be decoded is refused with the reason and not kept.

    Args:
        files: (file name as uploaded, its bytes) pairs.

    Returns one result per file, in the order given.
    """
    folder = get_settings().artifact_dir / UPLOADS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for name, data in files:
        result = _add_upload(session, folder, name, data)
        results.append(result)
        if result.outcome == REFUSED:
            logger.warning("upload %s refused: %s", name, result.reason)
    added = sum(r.outcome == ADDED for r in results)
    logger.info("uploads: %d added of %d files", added, len(results))
    return results


def _add_upload(session: Session, folder: Path, name: str, data: bytes):
    if not data:
        return UploadResult(name, REFUSED, reason="empty file (0 bytes)")
    sha = hashlib.sha256(data).hexdigest()
    known = session.scalar(select(Photo).where(Photo.sha256 == sha))
    if known is not None:
        return UploadResult(name, KNOWN, known.id, _already(known))

    # Decode it once before keeping it, by the same rules as an import. The
    # temporary name is unique, so two sessions uploading it never collide.
    handle, name_on_disk = tempfile.mkstemp(dir=folder, suffix=".partial")
    partial = Path(name_on_disk)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        image_format = _check_image(partial)
    except (BadImageError, OSError) as error:
        partial.unlink(missing_ok=True)
        return UploadResult(name, REFUSED, reason=_without_path(error, partial))
    target = folder / f"{sha}{_suffix(name, image_format)}"
    os.replace(partial, target)

    # TODO: two sessions adding the same new bytes at the same moment both
    # pass the check above, and the second fails on the unique hash when it
    # writes; telling it "known" instead needs a savepoint around the insert.

    report = ingest_files(session, [target], UNLABELLED, NO_LABEL)
    photo = session.scalar(select(Photo).where(Photo.sha256 == sha))
    if photo is None:
        reason = report.skipped[0][1] if report.skipped else "not imported"
        return UploadResult(name, REFUSED, reason=reason)
    return UploadResult(name, ADDED, photo.id)


def _already(photo: Photo) -> str:
    if photo.split == UNLABELLED and photo.status == EXCLUDED:
        return f"already photo #{photo.id}, left out of labelling"
    if photo.split == UNLABELLED:
        return f"already photo #{photo.id}, waiting for a label"
    return f"already photo #{photo.id} in the {photo.split}, labelled {photo.label}"


def _check_image(path: Path) -> str:
    """Decode `path` fully; return the format Pillow found (e.g. "JPEG")."""
    load_rgb(path)
    with Image.open(path) as image:
        return image.format or ""


def _without_path(error: Exception, path: Path) -> str:
    return str(error).removeprefix(f"{path}: ")


def _suffix(name: str, image_format: str) -> str:
    own = Path(name).suffix.lower()
    if Image.registered_extensions().get(own) == image_format:
        return own
    return _FORMAT_SUFFIX.get(image_format, "")


def prelabel(
    session: Session, run: TrainingRun | None = None, redo: bool = False
) -> int:
    """Suggest a label for every unlabelled photo with run `run`'s model.

    Stores one prediction of kind "prelabel" per photo. Photos the run already
    suggested a label for are left as they are unless `redo`; excluded photos
    and files that can no longer be read are left out.

    Args:
        run: default the latest finished run.

    Returns the number of photos given a suggestion now.

    Raises:
        LookupError: no finished run to suggest labels with.
        FileNotFoundError: the run's weights are gone.
    """
    run = run or latest_run(session)
    if run is None:
        raise LookupError("no finished training run yet; train one to suggest labels")
    if not run.artifact_path or not Path(run.artifact_path).is_file():
        raise FileNotFoundError(
            f"run {run.id} has no saved weights at {run.artifact_path}; train again"
        )
    photos = list(
        session.scalars(
            select(Photo)
            .where(Photo.split == UNLABELLED, Photo.status != EXCLUDED)
            .order_by(Photo.id)
        )
    )
    if not redo:
        done = set(
            session.scalars(
                select(Prediction.photo_id).where(
                    Prediction.run_id == run.id, Prediction.kind == PRELABEL
                )
            )
        )
        photos = [p for p in photos if p.id not in done]
    if not photos:
        return 0

    model = load_weights(run.artifact_path, len(run.classes)).to(get_device())
    size = int(run.config.get("image_size", IMAGE_SIZE))
    views = dict(
        size=size,
        tta=bool(run.config.get("tta", False)),
        crops=int(run.config.get("tta_crops", 0)),
        from_features=not body_trained(run.config),
    )
    photos, probs = _predict(model, photos, views)
    store_suggestions(session, run, photos, probs)
    logger.info("run %s: suggested labels for %d photos", run.id, len(photos))
    return len(photos)


def store_suggestions(
    session: Session, run: TrainingRun, photos: list[Photo], probs: np.ndarray
) -> None:
    """Store the run's suggested labels for `photos`, which `label_queue` ranks.

    Args:
        probs: (N, C) class probabilities, one row per photo, in the order of
            `run.classes`; they replace any suggestion the run made for them.
    """
    classes = list(run.classes)
    session.execute(
        delete(Prediction).where(
            Prediction.run_id == run.id,
            Prediction.kind == PRELABEL,
            Prediction.photo_id.in_([p.id for p in photos]),
        )
    )
    for photo, row in zip(photos, probs, strict=True):
        session.add(_suggestion(run, photo, row, classes))
    session.flush()


def _predict(model, photos: list[Photo], views: dict):
    """Probabilities for the photos that can be read, and those photos.

    They are averaged over the views the run's holdout evaluation used
    (`views`: the keyword arguments of `predict_views`), from cached ImageNet
    features when the run's body is ImageNet's.
    """
    try:
        return photos, predict_views(model, photos, **views)
    except (BadImageError, OSError):
        pass
    # One unreadable file fails its whole batch: go photo by photo to find it.
    kept, rows = [], []
    for photo in photos:
        try:
            rows.append(predict_views(model, [photo], **views)[0])
        except (BadImageError, OSError) as error:
            logger.warning("prelabel: leaving out %s: %s", photo.path, error)
            continue
        kept.append(photo)
    return kept, np.array(rows)


def margin(probs: np.ndarray) -> float:
    """Top probability minus the second one: small means unsure between two."""
    top = np.sort(np.asarray(probs, dtype=np.float64))[::-1]
    return float(top[0] - (top[1] if len(top) > 1 else 0.0))


def _suggestion(run, photo, row, classes) -> Prediction:
    order = np.argsort(row)[::-1]
    best = int(order[0])
    reason = f"suggests {classes[best]} at {row[best]:.2f}"
    if len(order) > 1:
        second = int(order[1])
        reason += f"; next {classes[second]} at {row[second]:.2f}"
    return Prediction(
        run_id=run.id,
        photo_id=photo.id,
        kind=PRELABEL,
        probs=[round(float(v), 5) for v in row],
        given_label=NO_LABEL,
        predicted_label=classes[best],
        confidence=float(row[best]),
        score=1.0 - margin(row),
        reason=reason,
    )


@dataclass(frozen=True)
class LabelItem:
    """One unlabelled photo with the run's suggestion, if it made one."""

    photo_id: int
    path: str
    sha256: str
    version: int
    suggested: str | None
    confidence: float | None
    margin: float | None
    reason: str
    # (class, probability), most likely first; empty without a suggestion.
    probabilities: list[tuple[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class LabelQueue:
    items: list[LabelItem]
    total: int
    run_id: int | None


def label_queue(
    session: Session,
    offset: int = 0,
    limit: int | None = None,
    run_id: int | None = None,
) -> LabelQueue:
    """Unlabelled photos, the ones the model is least sure about first.

    Ordered by the run's margin between its two most likely classes (smallest
    first), then by its top probability (lowest first); photos it has made no
    suggestion for come last, by id. Excluded photos are left out.

    Args:
        run_id: rank by this run's suggestions; default the latest finished run.
    """
    if run_id is None:
        run = latest_run(session)
    else:
        run = session.get(TrainingRun, run_id)
    classes = list(run.classes) if run is not None else []
    joined = and_(
        Prediction.photo_id == Photo.id,
        Prediction.run_id == (run.id if run is not None else None),
        Prediction.kind == PRELABEL,
    )
    query = (
        select(Photo, Prediction)
        .select_from(Photo)
        .outerjoin(Prediction, joined)
        .where(Photo.split == UNLABELLED, Photo.status != EXCLUDED)
    )
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.execute(
        query.order_by(
            Prediction.score.is_(None),
            Prediction.score.desc(),
            Prediction.confidence.asc(),
            Photo.id,
        )
        .offset(max(offset, 0))
        .limit(limit)
    ).all()
    items = [_item(photo, prediction, classes) for photo, prediction in rows]
    return LabelQueue(items, total, run.id if run is not None else None)


def _item(photo: Photo, prediction: Prediction | None, classes: list[str]):
    if prediction is None:
        return LabelItem(
            photo.id,
            photo.path,
            photo.sha256,
            photo.version,
            None,
            None,
            None,
            "no suggestion from the latest run yet",
        )
    ranked = sorted(
        zip(classes, prediction.probs, strict=True), key=lambda pair: -pair[1]
    )
    return LabelItem(
        photo.id,
        photo.path,
        photo.sha256,
        photo.version,
        prediction.predicted_label,
        prediction.confidence,
        1.0 - prediction.score,
        prediction.reason,
        [(name, float(p)) for name, p in ranked],
    )


def accept(
    session: Session, photo_id: int, label: str, expected_version: int | None = None
) -> LabelEvent:
    """Give unlabelled photo `photo_id` the class `label`: it joins the pool.

    The change is recorded as a label event of source "label" and can be
    undone like any other (the photo then goes back to the unlabelled split).

    Raises:
        LookupError: no such photo.
        ValueError: the photo already has a label, or `label` is not a class.
        db.labels.StaleLabelError: the photo changed since `expected_version`.
    """
    return accept_label(session, photo_id, label, expected_version=expected_version)


def unlabelled_count(session: Session) -> int:
    """Unlabelled photos that are not excluded."""
    return session.scalar(
        select(func.count())
        .select_from(Photo)
        .where(Photo.split == UNLABELLED, Photo.status != EXCLUDED)
    )


def unsuggested_count(session: Session, run_id: int) -> int:
    """Unlabelled photos run `run_id` has not suggested a label for yet."""
    suggested = select(Prediction.photo_id).where(
        Prediction.run_id == run_id, Prediction.kind == PRELABEL
    )
    return session.scalar(
        select(func.count())
        .select_from(Photo)
        .where(
            Photo.split == UNLABELLED,
            Photo.status != EXCLUDED,
            Photo.id.not_in(suggested),
        )
    )
