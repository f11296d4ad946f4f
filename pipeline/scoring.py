"""Out-of-fold "confused" scores for pool photos.

A photo's score is 1 - p(given label), where p comes from a model that did
not train on that photo: a logistic-regression head is fitted on K-1 folds of
cached embeddings and applied to the K-th. An in-sample loss would hide
exactly the mislabelled photos that the network has memorised.

Two paths share this code. The quick one refits heads on the cached ImageNet
embeddings, which no label has touched, in about a second, so the ranking can
follow each relabel. The thorough one, after a retrain, also fits heads on the
run's fine-tuned embeddings and averages the two.
"""

import logging
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from torch import nn

from db.models import EXCLUDED, POOL, Photo, Prediction, TrainingRun
from pipeline.embeddings import imagenet_embeddings, run_embeddings

logger = logging.getLogger(__name__)

OOF = "oof"
HOLDOUT_KIND = "holdout"
# Strong L2 regularisation on unit-length embeddings: a head that cannot fit
# a few wrong labels is what makes those labels stand out.
HEAD_C = 1.0


def fit_head(features: np.ndarray, labels: np.ndarray) -> LogisticRegression:
    """A logistic-regression head on unit-length embeddings, strongly regularised.

    On the cached ImageNet embeddings this is the quick head. Its `classes_`
    are the label indices it saw, which index the columns of `predict_proba`.
    """
    return LogisticRegression(C=HEAD_C, max_iter=3000).fit(features, labels)


def oof_probabilities(
    features: np.ndarray,
    labels: np.ndarray,
    train_mask: np.ndarray,
    num_classes: int,
    folds: int = 10,
    seed: int = 0,
) -> np.ndarray:
    """Out-of-fold class probabilities for every row of `features`.

    Rows in `train_mask` are split into stratified folds (fewer when a class
    has fewer photos than `folds`, never fewer than two); each is predicted by
    a head fitted on the other folds. Rows outside the mask (excluded photos)
    are predicted by the mean of the fold heads.

    Args:
        features: (N, D) L2-normalised embeddings.
        labels: (N,) class indices.
        train_mask: (N,) booleans, the rows whose labels may be learned from.

    Raises:
        ValueError: a class present in the mask has a single photo.
    """
    probs = np.zeros((len(features), num_classes), dtype=np.float64)
    train_idx = np.flatnonzero(train_mask)
    other_idx = np.flatnonzero(~train_mask)
    counts = np.bincount(labels[train_idx], minlength=num_classes)
    n_splits = int(min(folds, counts[counts > 0].min()))
    if n_splits < 2:
        raise ValueError(
            f"out-of-fold scoring needs at least 2 photos per class; counts {counts}"
        )
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for fit_rows, held_rows in splitter.split(train_idx, labels[train_idx]):
        head = fit_head(features[train_idx[fit_rows]], labels[train_idx[fit_rows]])
        cols = head.classes_
        held = train_idx[held_rows]
        probs[np.ix_(held, cols)] = head.predict_proba(features[held])
        if len(other_idx):
            probs[np.ix_(other_idx, cols)] += (
                head.predict_proba(features[other_idx]) / n_splits
            )
    return probs


def describe(given: str, predicted: str, confidence: float, given_prob: float) -> str:
    """The reason shown beside a photo, in a reviewer's words."""
    if predicted != given:
        return (
            f"labelled {given}; a model that never saw this photo says "
            f"{predicted} at {confidence:.2f}"
        )
    if confidence < 0.65:
        return f"labelled {given}; the model is unsure ({given_prob:.2f} for {given})"
    return f"labelled {given}; the model agrees at {confidence:.2f}"


def score_run(
    session: Session,
    run: TrainingRun,
    model: nn.Module | None = None,
    holdout: list[Photo] | None = None,
    holdout_probs: np.ndarray | None = None,
    thorough: bool = True,
) -> int:
    """(Re)compute the run's out-of-fold scores from the labels as they are now.

    Args:
        model: the run's network, if in memory (else loaded when needed).
        holdout, holdout_probs: the run's holdout predictions, to store too.
        thorough: also use the run's fine-tuned embeddings (slower the first
            time; cached after).

    Returns the number of pool photos scored.
    """
    started = time.perf_counter()
    classes = list(run.classes)
    index = {name: i for i, name in enumerate(classes)}
    pool = [
        p
        for p in session.scalars(
            select(Photo).where(Photo.split == POOL).order_by(Photo.id)
        )
        if p.label in index and Path(p.path).exists()
    ]
    pool = limit_per_class(pool, run.config.get("max_per_class"))
    labels = np.array([index[p.label] for p in pool], dtype=np.int64)
    train_mask = np.array([p.status != EXCLUDED for p in pool])
    folds, seed = run.config.get("folds", 10), run.config.get("seed", 0)

    probs = oof_probabilities(
        imagenet_embeddings(pool), labels, train_mask, len(classes), folds, seed
    )
    if thorough and (model is not None or run.artifact_path):
        tuned = run_embeddings(run, pool, model)
        probs = (
            probs
            + oof_probabilities(tuned, labels, train_mask, len(classes), folds, seed)
        ) / 2

    session.execute(
        delete(Prediction).where(Prediction.run_id == run.id, Prediction.kind == OOF)
    )
    for photo, row in zip(pool, probs, strict=True):
        _add_prediction(session, run, photo, OOF, row, classes)
    if holdout is not None and holdout_probs is not None:
        session.execute(
            delete(Prediction).where(
                Prediction.run_id == run.id, Prediction.kind == HOLDOUT_KIND
            )
        )
        for photo, row in zip(holdout, holdout_probs, strict=True):
            _add_prediction(session, run, photo, HOLDOUT_KIND, row, classes)
    session.flush()
    logger.info(
        "run %s: scored %d pool photos out-of-fold in %.1f s",
        run.id,
        len(pool),
        time.perf_counter() - started,
    )
    return len(pool)


def limit_per_class(photos: list[Photo], max_per_class: int | None) -> list[Photo]:
    """The first `max_per_class` photos of each original class (for small trials).

    Counted over original labels, so a relabel does not change which photos a
    limited run uses.
    """
    if max_per_class is None:
        return photos
    kept, counts = [], {}
    for photo in photos:
        if counts.get(photo.original_label, 0) < max_per_class:
            kept.append(photo)
            counts[photo.original_label] = counts.get(photo.original_label, 0) + 1
    return kept


def _add_prediction(session, run, photo, kind, row, classes):
    best = int(np.argmax(row))
    given_prob = float(row[classes.index(photo.label)])
    session.add(
        Prediction(
            run_id=run.id,
            photo_id=photo.id,
            kind=kind,
            probs=[round(float(v), 5) for v in row],
            given_label=photo.label,
            predicted_label=classes[best],
            confidence=float(row[best]),
            score=1.0 - given_prob,
            reason=describe(photo.label, classes[best], float(row[best]), given_prob),
        )
    )
