"""Import a class-folder photo set into the database.

`DATA_DIR/train/<class>/*` becomes the labelling pool, with the folder name as
the label; `DATA_DIR/test/<class>/*` becomes the frozen holdout. Files are
identified by the SHA-256 of their bytes, so importing again adds nothing
twice. A file that cannot be read as an image is recorded in `skipped_files`
with the reason, and the import goes on.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import HOLDOUT, POOL, Photo, SkippedFile
from pipeline.images import BadImageError, file_sha256, load_rgb

logger = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": POOL, "test": HOLDOUT}


@dataclass
class IngestReport:
    added: int = 0
    already_known: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        text = (
            f"added {self.added} photos, {self.already_known} already known, "
            f"skipped {len(self.skipped)}"
        )
        for path, reason in self.skipped:
            text += f"\n  skipped {path}: {reason}"
        return text


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted(
        p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )


def _files(class_dir: Path) -> list[Path]:
    return sorted(
        p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith(".")
    )


def _record_skip(session: Session, path: str, reason: str, report: IngestReport):
    skipped = session.scalar(select(SkippedFile).where(SkippedFile.path == path))
    if skipped is None:
        session.add(SkippedFile(path=path, reason=reason))
    else:
        skipped.reason = reason
    report.skipped.append((path, reason))
    logger.warning("skipped %s: %s", path, reason)


def ingest_folder(session: Session, data_dir: str | Path) -> IngestReport:
    """Import every photo under `data_dir/train` and `data_dir/test`.

    Raises:
        FileNotFoundError: `data_dir` or its `train/` folder is missing.
        ValueError: `train/` holds no class folders.
    """
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"photo folder {data_dir} does not exist; set DATA_DIR to a folder "
            "with train/<class>/ (and optionally test/<class>/) inside"
        )
    if not (data_dir / "train").is_dir():
        raise FileNotFoundError(
            f"{data_dir} has no train/ folder; expected train/<class>/<photos>"
        )
    if not _class_folders(data_dir / "train"):
        raise ValueError(f"{data_dir / 'train'} has no class folders inside")

    report = IngestReport()
    known_paths = dict(session.execute(select(Photo.path, Photo.sha256)).all())
    known_hashes = dict(session.execute(select(Photo.sha256, Photo.path)).all())
    for folder, split in SPLIT_FOLDERS.items():
        split_dir = data_dir / folder
        if not split_dir.is_dir():
            continue
        for class_dir in _class_folders(split_dir):
            label = class_dir.name
            for path in _files(class_dir):
                key = str(path)
                _ingest_file(
                    session, path, key, split, label, known_paths, known_hashes, report
                )
                if split == POOL:
                    report.classes[label] = report.classes.get(label, 0) + 1
    session.flush()
    logger.info(report.summary().splitlines()[0])
    return report


def _ingest_file(session, path, key, split, label, known_paths, known_hashes, report):
    try:
        sha = file_sha256(path)
    except OSError as error:
        _record_skip(session, key, f"cannot read file: {error}", report)
        return
    if key in known_paths:
        if known_paths[key] == sha:
            report.already_known += 1
        else:
            _record_skip(
                session, key, "file changed since it was imported; its old "
                "version stays in the database", report,
            )
        return
    if sha in known_hashes:
        if known_hashes[sha] == key:
            report.already_known += 1
        else:
            _record_skip(
                session, key, f"same bytes as {known_hashes[sha]} (exact duplicate)",
                report,
            )
        return
    try:
        image = load_rgb(path)
    except BadImageError as error:
        _record_skip(session, key, str(error).removeprefix(f"{path}: "), report)
        return
    photo = Photo(
        sha256=sha,
        path=key,
        width=image.width,
        height=image.height,
        split=split,
        original_label=label,
        label=label,
    )
    session.add(photo)
    known_paths[key] = sha
    known_hashes[sha] = key
    report.added += 1
