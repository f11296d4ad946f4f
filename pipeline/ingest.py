"""Import a class-folder photo set into the database.

`DATA_DIR/train/<class>/*` becomes the labelling pool, with the folder name as
the label; `DATA_DIR/test/<class>/*` becomes the frozen holdout, and files
anywhere under `DATA_DIR/unlabelled/` join the unlabelled split with no label
(`NO_LABEL`) until a person gives them one. Class names are stored in Unicode
NFC form, so a folder copied from a Mac (which names files in NFD) gives the
same class as one made elsewhere. Files are identified by the SHA-256 of their
bytes, so importing again adds nothing twice. A file that cannot be read as
an image is recorded in `skipped_files` with the reason, and the import goes
on; once it imports, that record goes.
"""

import logging
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import HOLDOUT, NO_LABEL, POOL, UNLABELLED, Photo, SkippedFile
from pipeline.images import BadImageError, dhash, file_sha256, load_rgb

logger = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": POOL, "test": HOLDOUT}
UNLABELLED_FOLDER = "unlabelled"


@dataclass
class IngestReport:
    added: int = 0
    already_known: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)
    empty_folders: list[str] = field(default_factory=list)
    # Files found under unlabelled/, imported or known before.
    unlabelled: int = 0

    def summary(self) -> str:
        text = (
            f"added {self.added} photos, {self.already_known} already known, "
            f"skipped {len(self.skipped)}"
        )
        for path, reason in self.skipped:
            text += f"\n  skipped {path}: {reason}"
        for folder in self.empty_folders:
            text += f"\n  class folder {folder} holds no files"
        if self.unlabelled:
            text += f"\n  {self.unlabelled} files under unlabelled/ await a label"
        return text


def _class_folders(split_dir: Path) -> list[Path]:
    return sorted(
        p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )


def _files(class_dir: Path) -> list[Path]:
    """Files in `class_dir`, including broken links, so that they get reported."""
    return sorted(
        p
        for p in class_dir.rglob("*")
        if (p.is_file() or (p.is_symlink() and not p.exists()))
        and not p.name.startswith(".")
    )


def _record_skip(
    session: Session,
    path: str,
    reason: str,
    report: IngestReport,
    duplicate_of: int | None = None,
):
    skipped = session.scalar(select(SkippedFile).where(SkippedFile.path == path))
    if skipped is None:
        skipped = SkippedFile(path=path, reason=reason)
        session.add(skipped)
    skipped.reason = reason
    skipped.duplicate_of_id = duplicate_of
    report.skipped.append((path, reason))
    logger.warning("skipped %s: %s", path, reason)


def class_name(folder: Path) -> str:
    """The label a class folder gives its photos: its name, in NFC form."""
    return unicodedata.normalize("NFC", folder.name)


def ingest_folder(session: Session, data_dir: str | Path) -> IngestReport:
    """Import every photo under `data_dir/train`, `data_dir/test` and
    `data_dir/unlabelled`.

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
    known = _KnownPhotos(session)
    for folder, split in SPLIT_FOLDERS.items():
        split_dir = data_dir / folder
        if not split_dir.is_dir():
            continue
        for class_dir in _class_folders(split_dir):
            label = class_name(class_dir)
            files = _files(class_dir)
            if not files:
                report.empty_folders.append(_printable(class_dir))
                logger.warning("class folder %s holds no files", _printable(class_dir))
            for path in files:
                _ingest_file(session, path, split, label, known, report)
            if split == POOL:
                report.classes[label] = report.classes.get(label, 0) + len(files)
    unlabelled_dir = data_dir / UNLABELLED_FOLDER
    if unlabelled_dir.is_dir():
        files = _files(unlabelled_dir)
        for path in files:
            _ingest_file(session, path, UNLABELLED, NO_LABEL, known, report)
        report.unlabelled = len(files)
    session.flush()
    logger.info(report.summary().splitlines()[0])
    return report


def ingest_files(
    session: Session, paths: Iterable[str | Path], split: str, label: str
) -> IngestReport:
    """Import the given files (such as uploads) into `split` with `label`.

    The same rules as `ingest_folder`: known content is not added twice, and a
    file that cannot be used is recorded in `skipped_files` with the reason.
    """
    report = IngestReport()
    known = _KnownPhotos(session)
    for path in paths:
        _ingest_file(session, Path(path).absolute(), split, label, known, report)
    session.flush()
    return report


class _KnownPhotos:
    """Paths and content hashes already in the database, kept up to date."""

    def __init__(self, session: Session):
        rows = session.execute(select(Photo.id, Photo.path, Photo.sha256)).all()
        self.sha_by_path = {path: sha for _, path, sha in rows}
        self.by_sha = {sha: (photo_id, path) for photo_id, path, sha in rows}
        self.skipped = set(session.scalars(select(SkippedFile.path)))

    def add(self, photo: Photo) -> None:
        self.sha_by_path[photo.path] = photo.sha256
        self.by_sha[photo.sha256] = (photo.id, photo.path)


def _printable(path: Path) -> str:
    """`path` as text that can be stored and shown, whatever bytes its name has."""
    return (
        str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    )


def _forget_skip(session: Session, key: str, known: _KnownPhotos) -> None:
    """Drop the skip record of a file that imports now (fixed or restored)."""
    if key in known.skipped:
        session.execute(delete(SkippedFile).where(SkippedFile.path == key))
        known.skipped.discard(key)


def _ingest_file(session, path: Path, split, label, known: _KnownPhotos, report):
    key = str(path)
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        # Names in another encoding (an old zip, a Windows share) cannot be
        # stored as text; stopping the whole import for one would lose the rest.
        reason = "file or folder name is not valid UTF-8; rename it"
        _record_skip(session, _printable(path), reason, report)
        return
    try:
        sha = file_sha256(path)
    except OSError as error:
        _record_skip(session, key, f"cannot read file: {error}", report)
        return
    if key in known.sha_by_path:
        if known.sha_by_path[key] == sha:
            report.already_known += 1
            _forget_skip(session, key, known)
        else:
            reason = "file changed since it was imported; the old version stays"
            _record_skip(session, key, reason, report)
        return
    if sha in known.by_sha:
        photo_id, original = known.by_sha[sha]
        reason = f"same bytes as {original} (exact duplicate)"
        _record_skip(session, key, reason, report, duplicate_of=photo_id)
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
        dhash=dhash(image),
    )
    session.add(photo)
    _forget_skip(session, key, known)
    session.flush()
    known.add(photo)
    report.added += 1
