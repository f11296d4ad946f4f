"""Write the cleaned photo set out: a manifest of every photo and a class-folder tree.

    out_dir/
        manifest.csv        one row per photo in the database, excluded ones too
        manifest.parquet    the same rows, when pyarrow is installed
        train/<label>/      pool photos under their current label
        test/<label>/       holdout photos
        unlabelled/         photos still waiting for a label

Excluded photos stay out of the tree and are kept in the manifest. The tree
is a class-folder set: `ingest_folder` imports it as it is, and so does
fastai's `ImageDataLoaders.from_folder(out_dir, train="train", valid="test")`.

Files are hard links to the photos where the file system allows it, which
costs no space; writing into a linked file changes the original too. Elsewhere
they are copies. The manifest is written last, so a folder without one is an
export that did not finish.
"""

import logging
import mimetypes
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import (
    EXCLUDED,
    HOLDOUT,
    POOL,
    UNLABELLED,
    LabelEvent,
    Photo,
    Prediction,
)
from db.settings import get_settings
from pipeline.runs import latest_run
from pipeline.scoring import HOLDOUT_KIND, OOF
from pipeline.unlabelled import PRELABEL

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "photo_id",
    "path",
    "sha256",
    "split",
    "label",
    "original_label",
    "status",
    "reason",
    "last_change",
    "exported_path",
)
# Where each split goes in the tree; unlabelled photos have no class folder.
TREE_FOLDERS = {POOL: "train", HOLDOUT: "test", UNLABELLED: "unlabelled"}
# The prediction that explains a photo of each split.
_REASON_KIND = {POOL: OOF, HOLDOUT: HOLDOUT_KIND, UNLABELLED: PRELABEL}
DATASETS_FOLDER = "datasets"


def new_dataset_dir(root: Path | None = None) -> Path:
    """A new, empty folder `root/<UTC timestamp>` (default ARTIFACT_DIR/datasets)."""
    root = root or get_settings().artifact_dir / DATASETS_FOLDER
    root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for counter in range(1, 1000):
        folder = root / (stamp if counter == 1 else f"{stamp}-{counter}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"{root} already holds 999 exports named {stamp}-*")


def export_dataset(session: Session, out_dir: str | Path) -> dict:
    """Write the manifest and the class-folder tree of every photo to `out_dir`.

    Returns counts of what was written, with the paths of the manifests.

    Raises:
        ValueError: `out_dir` exists and is not empty, or a label cannot be a
            folder name; nothing is written.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(
            f"{out_dir} is not an empty folder; export into a new one so that old "
            "and new files do not mix"
        )

    # Read every photo with what explains its state, and plan the tree.
    photos = list(session.scalars(select(Photo).order_by(Photo.id)))
    reasons = _run_reasons(session)
    events = _last_events(session)
    targets = _plan_tree(out_dir, photos)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Place each photo that is not excluded in the tree.
    counts = {"linked": 0, "copied": 0, "missing": 0}
    rows = []
    for photo in photos:
        exported = ""
        target = targets.get(photo.id)
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                counts[_place(Path(photo.path), target)] += 1
                exported = target.relative_to(out_dir).as_posix()
            except FileNotFoundError:
                counts["missing"] += 1
                logger.warning("export: %s is gone; left out of the tree", photo.path)
        rows.append(_manifest_row(photo, reasons, events.get(photo.id), exported))

    # Write the manifest last: its presence marks a finished export.
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    csv_path = out_dir / "manifest.csv"
    _write_atomic(csv_path, lambda path: frame.to_csv(path, index=False))
    parquet_path = None
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        logger.info("pyarrow is not installed: writing manifest.csv only")
    else:
        parquet_path = out_dir / "manifest.parquet"
        _write_atomic(parquet_path, lambda path: frame.to_parquet(path, index=False))

    summary = {
        "out_dir": str(out_dir),
        "manifest": str(csv_path),
        "manifest_parquet": str(parquet_path) if parquet_path else None,
        "photos": len(rows),
        "in_tree": counts["linked"] + counts["copied"],
        "excluded": sum(p.status == EXCLUDED for p in photos),
        **counts,
        "classes": _class_counts(rows),
    }
    logger.info("exported %d photos to %s: %s", len(rows), out_dir, summary)
    return summary


def _run_reasons(session: Session) -> dict[tuple[int, str], str]:
    """The latest run's reason for each photo, by (photo id, prediction kind)."""
    run = latest_run(session)
    if run is None:
        return {}
    rows = session.execute(
        select(Prediction.photo_id, Prediction.kind, Prediction.reason).where(
            Prediction.run_id == run.id
        )
    )
    return {(photo_id, kind): reason for photo_id, kind, reason in rows}


def _last_events(session: Session) -> dict[int, LabelEvent]:
    newest = (
        select(func.max(LabelEvent.id)).group_by(LabelEvent.photo_id).scalar_subquery()
    )
    events = session.scalars(select(LabelEvent).where(LabelEvent.id.in_(newest)))
    return {event.photo_id: event for event in events}


def describe_event(event: LabelEvent) -> str:
    """A label event in a few words, e.g. "review: hot_dog → salad (relabelled)"."""
    if event.old_label == event.new_label:
        change = event.new_label or "no label"
    elif not event.old_label:
        change = f"first labelled {event.new_label}"
    elif not event.new_label:
        change = f"label {event.old_label} taken back"
    else:
        change = f"{event.old_label} → {event.new_label}"
    return f"{event.source}: {change} ({event.new_status})"


def _manifest_row(photo, reasons, event: LabelEvent | None, exported: str) -> dict:
    reason = reasons.get((photo.id, _REASON_KIND.get(photo.split, "")), "")
    if not reason and event is not None:
        reason = describe_event(event)
    changed = event.created_at if event is not None else photo.created_at
    return {
        "photo_id": photo.id,
        "path": photo.path,
        "sha256": photo.sha256,
        "split": photo.split,
        "label": photo.label,
        "original_label": photo.original_label,
        "status": photo.status,
        "reason": reason,
        "last_change": changed.isoformat(timespec="seconds"),
        "exported_path": exported,
    }


def _plan_tree(out_dir: Path, photos: list[Photo]) -> dict[int, Path]:
    """Where each photo that is not excluded goes, by photo id."""
    targets = {}
    taken: dict[Path, set[str]] = {}
    for photo in photos:
        if photo.status == EXCLUDED:
            continue
        folder = _tree_folder(out_dir, photo)
        targets[photo.id] = folder / _free_name(photo, taken.setdefault(folder, set()))
    return targets


def _tree_folder(out_dir: Path, photo: Photo) -> Path:
    folder = out_dir / TREE_FOLDERS.get(photo.split, photo.split)
    if photo.split == UNLABELLED:
        return folder
    label = photo.label
    if label in ("", ".", "..") or any(c in label for c in "/\\\0"):
        raise ValueError(
            f"photo {photo.id} has the label {label!r}, which cannot be a folder "
            "name; relabel it before exporting"
        )
    return folder / label


def _free_name(photo: Photo, taken: set[str]) -> str:
    """The photo's file name, unless its folder has it already.

    Two photos of a class can share a name (from different folders, or
    uploads); the later one gets the start of its SHA-256 added. Names are
    compared case-folded, as a Mac or Windows disk would.
    """
    name = _image_name(photo)
    if name.casefold() in taken:
        stem, suffix = os.path.splitext(name)
        name = f"{stem}-{photo.sha256[:12]}{suffix}"
        counter = 2
        while name.casefold() in taken:
            name = f"{stem}-{photo.sha256[:12]}-{counter}{suffix}"
            counter += 1
    taken.add(name.casefold())
    return name


def _image_name(photo: Photo) -> str:
    """The file name, with an image suffix added when it has none.

    fastai (and most tools) pick image files by suffix; a photo that was
    imported by its content alone would be silently skipped there.
    """
    name = Path(photo.path).name
    kind = mimetypes.guess_type(name)[0] or ""
    if kind.startswith("image/"):
        return name
    try:
        with Image.open(photo.path) as image:
            image_format = image.format or ""
    except (OSError, ValueError):
        return name
    suffixes = [
        ext for ext, fmt in Image.registered_extensions().items() if fmt == image_format
    ]
    return name + (suffixes[0] if suffixes else "")


def _place(source: Path, target: Path) -> str:
    """Hard-link `source` at `target`, or copy it where links are not possible.

    Raises:
        FileNotFoundError: `source` is gone.
    """
    try:
        os.link(source, target)
        return "linked"
    except FileNotFoundError:
        raise
    except OSError:
        # Another file system, or one without hard links.
        shutil.copy2(source, target)
        return "copied"


def _write_atomic(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    partial.replace(path)


def _class_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Photos in the tree per folder and class, e.g. {"train": {"salad": 3}}."""
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        if not row["exported_path"]:
            continue
        folder = TREE_FOLDERS.get(row["split"], row["split"])
        label = row["label"] or "(no label)"
        by_label = counts.setdefault(folder, {})
        by_label[label] = by_label.get(label, 0) + 1
    return counts
