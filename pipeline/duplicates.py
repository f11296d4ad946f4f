"""Exact and near duplicates, within the pool and across pool and holdout.

A photo in both the pool and the holdout inflates holdout accuracy (the model
has seen it); two copies in the pool count twice in training. Exact copies
are caught at import by content hash (the copy is skipped and points to the
photo it repeats). Near copies (resized, recompressed, lightly edited) are
found by a difference hash a few bits apart, or by ImageNet embeddings that
are almost parallel.

`review_pairs` adds how each file of a pair stands now (split, label, review
status), for a person to decide which copy to keep.
"""

import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import (
    EXCLUDED,
    HOLDOUT,
    NO_LABEL,
    POOL,
    UNLABELLED,
    UNREVIEWED,
    Photo,
    SkippedFile,
)
from pipeline.embeddings import imagenet_embeddings
from pipeline.ingest import SPLIT_FOLDERS, UNLABELLED_FOLDER

logger = logging.getLogger(__name__)

DHASH_MAX_BITS = 6
COSINE_MIN = 0.95

EXACT = "exact"
NEAR = "near"


@dataclass(frozen=True)
class DuplicatePair:
    """Two files that show the same picture.

    `second_path` is a photo in the database, or for an exact copy the
    skipped file that repeated `first`.
    """

    kind: str  # EXACT or NEAR
    first_id: int
    first_path: str
    second_id: int | None
    second_path: str
    cross_split: bool  # one in the pool, the other in the holdout
    evidence: str

    @property
    def where(self) -> str:
        return "pool and holdout" if self.cross_split else "same split"


def folder_split(path: str) -> tuple[str, str]:
    """The split and label a file's place under the photo folder would give it.

    Read from the nearest `train/<class>/`, `test/<class>/` or `unlabelled/`
    folder above the file; a file under none of them counts as a pool photo
    of its own folder's name.
    """
    parts = PurePosixPath(path.replace("\\", "/")).parts[:-1]
    for at in range(len(parts) - 1, -1, -1):
        if parts[at] == UNLABELLED_FOLDER:
            return UNLABELLED, NO_LABEL
        if parts[at] in SPLIT_FOLDERS and at + 1 < len(parts):
            label = unicodedata.normalize("NFC", parts[at + 1])
            return SPLIT_FOLDERS[parts[at]], label
    return POOL, unicodedata.normalize("NFC", parts[-1]) if parts else NO_LABEL


def _hash_matrix(photos: list[Photo]) -> np.ndarray:
    values = np.array([int(p.dhash, 16) for p in photos], dtype=np.uint64)
    xor = values[:, None] ^ values[None, :]  # (N, N) differing bits
    return np.unpackbits(
        xor.view(np.uint8).reshape(len(photos), len(photos), 8), axis=2
    ).sum(axis=2)


def find_duplicates(
    session: Session, use_embeddings: bool = True
) -> list[DuplicatePair]:
    """Every exact and near duplicate pair, cross-split pairs first."""
    photos = list(session.scalars(select(Photo).order_by(Photo.id)))
    by_id = {p.id: p for p in photos}
    pairs: list[DuplicatePair] = []

    # Exact copies: skipped at import, pointing at the photo they repeat.
    for skipped in session.scalars(
        select(SkippedFile).where(SkippedFile.duplicate_of_id.is_not(None))
    ):
        photo = by_id.get(skipped.duplicate_of_id)
        if photo is None:
            continue
        copy_split, _ = folder_split(skipped.path)
        cross = (copy_split == HOLDOUT) != (photo.split == HOLDOUT)
        pairs.append(
            DuplicatePair(
                EXACT,
                photo.id,
                photo.path,
                None,
                skipped.path,
                cross,
                "identical bytes (SHA-256)",
            )
        )

    # Near copies among imported photos.
    hashed = [p for p in photos if p.dhash]
    near: dict[tuple[int, int], str] = {}
    if len(hashed) > 1:
        distance = _hash_matrix(hashed)
        for i, j in zip(
            *np.nonzero(np.triu(distance <= DHASH_MAX_BITS, k=1)), strict=True
        ):
            key = (hashed[i].id, hashed[j].id)
            bits = distance[i, j]
            near[key] = f"difference hash {bits} bit{'' if bits == 1 else 's'} apart"
    if use_embeddings and len(photos) > 1:
        features = imagenet_embeddings(photos)
        cosine = features @ features.T
        for i, j in zip(*np.nonzero(np.triu(cosine >= COSINE_MIN, k=1)), strict=True):
            key = (photos[i].id, photos[j].id)
            text = f"ImageNet embeddings {cosine[i, j]:.3f} cosine"
            near[key] = f"{near[key]}; {text}" if key in near else text
    for (a, b), evidence in near.items():
        first, second = by_id[a], by_id[b]
        pairs.append(
            DuplicatePair(
                NEAR,
                a,
                first.path,
                b,
                second.path,
                first.split != second.split,
                evidence,
            )
        )
    pairs.sort(
        key=lambda pair: (not pair.cross_split, pair.kind != EXACT, pair.first_id)
    )
    logger.info("found %d duplicate pairs", len(pairs))
    return pairs


def catalogue_state(session: Session) -> tuple[int, int, int, int]:
    """Changes whenever a photo is imported or a copy is skipped: a cache key.

    (photos, newest photo id, exact copies skipped, newest skip id). Labels
    and review states are left out: they do not change which files repeat.
    """
    photos = session.execute(select(func.count(Photo.id), func.max(Photo.id))).one()
    skipped = session.execute(
        select(func.count(SkippedFile.id), func.max(SkippedFile.id)).where(
            SkippedFile.duplicate_of_id.is_not(None)
        )
    ).one()
    return (photos[0], photos[1] or 0, skipped[0], skipped[1] or 0)


# Where a reviewer stands on a pair.
ONE_IMPORTED = "one imported"  # an exact copy: the second file was skipped
FROZEN = "frozen"  # both copies in the holdout, which no one may change
COPY_EXCLUDED = "copy excluded"
KEPT = "kept"  # every pool copy's label confirmed (or corrected)
UNDECIDED = "undecided"


@dataclass(frozen=True)
class PairCopy:
    """One file of a duplicate pair, as it stands now."""

    path: str
    sha256: str  # of the file's bytes, for its thumbnail
    split: str
    label: str
    # None for an exact copy skipped at import: it is a file, not a photo.
    photo_id: int | None = None
    status: str | None = None
    version: int | None = None
    width: int | None = None
    height: int | None = None

    @property
    def can_exclude(self) -> bool:
        """Imported and not in the frozen holdout."""
        return self.photo_id is not None and self.split != HOLDOUT


@dataclass(frozen=True)
class PairReview:
    """A duplicate pair with both copies' current split, label and status."""

    pair: DuplicatePair
    first: PairCopy
    second: PairCopy

    @property
    def copies(self) -> tuple[PairCopy, PairCopy]:
        return (self.first, self.second)

    @property
    def to_confirm(self) -> list[PairCopy]:
        """Pool copies no one has reviewed: what keeping both confirms."""
        return [c for c in self.copies if c.split == POOL and c.status == UNREVIEWED]

    @property
    def state(self) -> str:
        if self.second.photo_id is None:
            return ONE_IMPORTED
        if not any(c.can_exclude for c in self.copies):
            return FROZEN
        if any(c.status == EXCLUDED for c in self.copies):
            return COPY_EXCLUDED
        if any(c.split == POOL for c in self.copies) and not self.to_confirm:
            return KEPT
        return UNDECIDED


def _photo_copy(photo: Photo) -> PairCopy:
    return PairCopy(
        path=photo.path,
        sha256=photo.sha256,
        split=photo.split,
        label=photo.label,
        photo_id=photo.id,
        status=photo.status,
        version=photo.version,
        width=photo.width,
        height=photo.height,
    )


def review_pairs(session: Session, pairs: Sequence[DuplicatePair]) -> list[PairReview]:
    """`pairs` with each copy as it stands now, in the same order.

    A pair whose photo is no longer in the database is left out.
    """
    ids = {pair.first_id for pair in pairs} | {pair.second_id for pair in pairs}
    ids.discard(None)
    found = session.scalars(select(Photo).where(Photo.id.in_(ids)))
    photos = {photo.id: photo for photo in found}
    reviews = []
    for pair in pairs:
        first = photos.get(pair.first_id)
        gone = pair.second_id is not None and pair.second_id not in photos
        if first is None or gone:
            continue
        if pair.second_id is None:
            # Same bytes as `first`, so the same thumbnail.
            split, label = folder_split(pair.second_path)
            second = PairCopy(pair.second_path, first.sha256, split, label)
        else:
            second = _photo_copy(photos[pair.second_id])
        reviews.append(PairReview(pair, _photo_copy(first), second))
    return reviews
