"""Out-of-fold "confused" scores for pool photos.

A photo's score is 1 - p(given label), where p comes from a model that did
not train on that photo: the run's pooled embeddings are cached, and a
logistic-regression head is fitted on K-1 folds and applied to the K-th. An
in-sample loss would hide exactly the mislabelled photos that the network has
memorised.
"""

import logging
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from torch import nn

from db.models import EXCLUDED, POOL, Photo, Prediction, TrainingRun
from pipeline.infer import embed
from pipeline.model import load_weights

logger = logging.getLogger(__name__)

OOF = "oof"
HOLDOUT_KIND = "holdout"


def _head(seed: int):
    return make_pipeline(
        StandardScaler(),
        LogisticRegression(C=0.05, max_iter=2000, random_state=seed),
    )


def oof_probabilities(features: np.ndarray, labels: np.ndarray, train_mask: np.ndarray,
                      num_classes: int, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold class probabilities for every row of `features`.

    Rows in `train_mask` are split into stratified folds; each is predicted by
    a head fitted on the other folds. Rows outside the mask (excluded photos)
    are predicted by the mean of the fold heads.

    Args:
        features: (N, D) embeddings.
        labels: (N,) class indices.
        train_mask: (N,) booleans, the rows whose labels may be learned from.
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
        head = _head(seed).fit(features[train_idx[fit_rows]],
                               labels[train_idx[fit_rows]])
        cols = head.classes_
        probs[np.ix_(train_idx[held_rows], cols)] = head.predict_proba(
            features[train_idx[held_rows]])
        if len(other_idx):
            probs[np.ix_(other_idx, cols)] += head.predict_proba(
                features[other_idx]) / n_splits
    return probs


def describe(given: str, predicted: str, confidence: float, given_prob: float) -> str:
    """The reason shown beside a photo, in a reviewer's words."""
    if predicted != given:
        return (f"labelled {given}; a model that never saw this photo says "
                f"{predicted} at {confidence:.2f}")
    if confidence < 0.65:
        return f"labelled {given}; the model is unsure ({given_prob:.2f} for {given})"
    return f"labelled {given}; the model agrees at {confidence:.2f}"


def _embeddings_path(run: TrainingRun) -> Path:
    return Path(run.artifact_path).with_name("embeddings.npz")


def cached_embeddings(run: TrainingRun, photos: list[Photo],
                      model: nn.Module | None = None) -> np.ndarray:
    """The run's embeddings of `photos`, computed once and kept beside the model."""
    path = _embeddings_path(run) if run.artifact_path else None
    if path is None and model is None:
        raise ValueError(f"run {run.id} has no saved model to embed with")
    ids = np.array([p.id for p in photos], dtype=np.int64)
    if path is not None and path.exists():
        cache = np.load(path)
        position = {int(i): n for n, i in enumerate(cache["ids"])}
        if all(int(i) in position for i in ids):
            return cache["features"][[position[int(i)] for i in ids]]
    if model is None:
        model = load_weights(run.artifact_path, len(run.classes))
    size = run.config.get("image_size", 224)
    features = embed(model, [p.path for p in photos], size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name("embeddings.partial.npz")
        np.savez(partial, ids=ids, features=features)
        partial.replace(path)
    return features


def score_run(session: Session, run: TrainingRun, model: nn.Module | None = None,
              holdout: list[Photo] | None = None,
              holdout_probs: np.ndarray | None = None) -> int:
    """(Re)compute the run's out-of-fold scores from the labels as they are now.

    Returns the number of pool photos scored. Embeddings are cached, so a
    rescore after a relabel takes seconds.
    """
    classes = list(run.classes)
    index = {name: i for i, name in enumerate(classes)}
    pool = [p for p in session.scalars(
        select(Photo).where(Photo.split == POOL).order_by(Photo.id))
        if p.label in index and Path(p.path).exists()]
    pool = limit_per_class(pool, run.config.get("max_per_class"))
    if run.artifact_path is None and model is None:
        raise ValueError(f"run {run.id} has no saved model to score with")

    features = cached_embeddings(run, pool, model)
    labels = np.array([index[p.label] for p in pool], dtype=np.int64)
    train_mask = np.array([p.status != EXCLUDED for p in pool])
    probs = oof_probabilities(features, labels, train_mask, len(classes),
                              run.config.get("folds", 5), run.config.get("seed", 0))

    session.execute(delete(Prediction).where(Prediction.run_id == run.id,
                                             Prediction.kind == OOF))
    for photo, row in zip(pool, probs):
        _add_prediction(session, run, photo, OOF, row, classes)
    if holdout is not None and holdout_probs is not None:
        session.execute(delete(Prediction).where(Prediction.run_id == run.id,
                                                 Prediction.kind == HOLDOUT_KIND))
        for photo, row in zip(holdout, holdout_probs):
            _add_prediction(session, run, photo, HOLDOUT_KIND, row, classes)
    session.flush()
    logger.info("run %s: scored %d pool photos out-of-fold", run.id, len(pool))
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
    session.add(Prediction(
        run_id=run.id, photo_id=photo.id, kind=kind,
        probs=[round(float(v), 5) for v in row], given_label=photo.label,
        predicted_label=classes[best], confidence=float(row[best]),
        score=1.0 - given_prob,
        reason=describe(photo.label, classes[best], float(row[best]), given_prob),
    ))
