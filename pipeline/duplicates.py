"""Exact and near duplicates, within the pool and across pool and holdout.

A photo in both the pool and the holdout inflates holdout accuracy (the model
has seen it); two copies in the pool count twice in training. Exact copies
are caught at import by content hash (the copy is skipped and points to the
photo it repeats). Near copies (resized, recompressed, lightly edited) are
found by a difference hash a few bits apart, or by ImageNet embeddings that
are almost parallel.
"""

import logging
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import HOLDOUT, Photo, SkippedFile
from pipeline.embeddings import imagenet_embeddings

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
        copy_in_holdout = "/test/" in skipped.path.replace("\\", "/")
        cross = copy_in_holdout != (photo.split == HOLDOUT)
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
            near[key] = f"difference hash {distance[i, j]} bits apart"
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
