"""Benchmark stage: does labelling the Label queue's picks beat labelling at random?

On the real pool, a seeded, stratified 10 % of the photos keeps its labels and
the rest moves to the unlabelled split, labels hidden. Then 100 more photos are
labelled in 4 rounds of 25. Before each round the quick head (logistic
regression on the cached ImageNet embeddings, `pipeline.scoring.fit_head`) is
fitted on the photos labelled so far, and the next 25 are chosen either

- by the Label queue ("al"): the head's probabilities for the unlabelled
  photos are stored as a run's suggestions and the top of `label_queue` is
  taken, the order a person sees on the Label page (smallest margin between
  the two most likely classes first); or
- at random ("random"), uniformly from the unlabelled photos.

Each chosen photo is given its folder label with `accept`, as a person on the
Label page would. After the last round the head is fitted once more. Every
head is scored on the whole holdout (the real test split). Each seed draws
its own start set, shared by both arms, and its own random picks.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.stages import _fresh_database, _photos, copy_database, peak_rss_mb

SEEDS = (0, 1, 2)
START_FRACTION = 0.1
ROUNDS = 4
PER_ROUND = 25
ARMS = ("al", "random")


def stratified_start(labels: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random `fraction` of each class's rows.

    Each class keeps at least 2 rows (or all it has), so a head can be fitted
    on the subset.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    chosen = []
    for name in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == name)
        count = min(len(members), max(2, round(fraction * len(members))))
        chosen.append(rng.choice(members, count, replace=False))
    if not chosen:
        return np.zeros(0, dtype=int)
    return np.sort(np.concatenate(chosen))


class _Embeddings:
    """Cached ImageNet embeddings of the pool and holdout, by photo id."""

    def __init__(self, photos):
        from pipeline.embeddings import imagenet_embeddings

        self.row = {photo.id: i for i, photo in enumerate(photos)}
        self.features = imagenet_embeddings(photos)  # (N, 1280)

    def __call__(self, photo_ids) -> np.ndarray:
        return self.features[[self.row[i] for i in photo_ids]]


def _hide_labels(session, photo_ids: list[int]) -> None:
    """Move pool photos to the unlabelled split, as if they had just arrived."""
    from sqlalchemy import update

    from db.models import NO_LABEL, UNLABELLED, Photo

    session.execute(
        update(Photo)
        .where(Photo.id.in_(photo_ids))
        .values(split=UNLABELLED, label=NO_LABEL, original_label=NO_LABEL)
    )


def _queue_picks(session, head, photos, embed, classes, count) -> list[int]:
    """The first `count` photos of the Label queue ranked by the head."""
    from db.models import DONE, TrainingRun, utcnow
    from pipeline.unlabelled import label_queue, store_suggestions

    run = TrainingRun(
        status=DONE,
        config={"quick_head": True},
        classes=classes,
        finished_at=utcnow(),
    )
    session.add(run)
    session.flush()
    probs = np.zeros((len(photos), len(classes)))
    probs[:, head.classes_] = head.predict_proba(embed([p.id for p in photos]))
    store_suggestions(session, run, photos, probs)
    queue = label_queue(session, limit=count, run_id=run.id)
    return [item.photo_id for item in queue.items]


def _label_rounds(engine, arm, truth, embed, holdout, classes, seed) -> list[float]:
    """Holdout accuracy of the quick head before each round and after the last."""
    from db.engine import session_scope
    from pipeline.scoring import fit_head
    from pipeline.unlabelled import accept

    index = {name: i for i, name in enumerate(classes)}
    holdout_x = embed([p.id for p in holdout])
    holdout_y = np.array([index[p.label] for p in holdout])
    rng = np.random.default_rng(seed)
    accuracies = []
    for round_number in range(ROUNDS + 1):
        with session_scope(engine) as session:
            # Fit on the photos labelled so far and score on the holdout.
            labelled = _photos(session, "pool")
            head = fit_head(
                embed([p.id for p in labelled]),
                np.array([index[p.label] for p in labelled]),
            )
            accuracies.append(float((head.predict(holdout_x) == holdout_y).mean()))
            if round_number == ROUNDS:
                break

            # Choose the next photos and label them with their folder label.
            waiting = _photos(session, "unlabelled")
            if arm == "al":
                picks = _queue_picks(session, head, waiting, embed, classes, PER_ROUND)
            else:
                ids = [p.id for p in waiting]
                picks = rng.choice(ids, PER_ROUND, replace=False).tolist()
            for photo_id in picks:
                accept(session, photo_id, truth[photo_id])
    return accuracies


def stage_al(workdir: Path, seeds: Sequence[int] = SEEDS) -> dict:
    """Holdout accuracy after labelling 100 photos the queue chose, or at random."""
    from db.engine import get_engine, session_scope
    from db.labels import class_names
    from pipeline.scoring import fit_head

    # Import the real photos once and embed them all (cached across runs).
    base_engine = _fresh_database(workdir, "al-base")
    with session_scope(base_engine) as session:
        pool, holdout = _photos(session, "pool"), _photos(session, "holdout")
        classes = class_names(session)
        embed = _Embeddings(pool + holdout)
    base_engine.dispose()
    truth = {p.id: p.label for p in pool}
    index = {name: i for i, name in enumerate(classes)}
    holdout_y = np.array([index[p.label] for p in holdout])
    everything = fit_head(
        embed([p.id for p in pool]), np.array([index[p.label] for p in pool])
    )
    full_pool = float(
        (everything.predict(embed([p.id for p in holdout])) == holdout_y).mean()
    )

    # Per seed: one start set, then each arm on its own copy of the database.
    curves: dict[str, list[list[float]]] = {arm: [] for arm in ARMS}
    for seed in seeds:
        start = stratified_start([p.label for p in pool], START_FRACTION, seed)
        kept = {pool[i].id for i in start}
        for arm in ARMS:
            database = workdir / f"al-{arm}-{seed}.db"
            copy_database(workdir / "al-base.db", database)
            engine = get_engine(f"sqlite:///{database}")
            with session_scope(engine) as session:
                _hide_labels(session, [p.id for p in pool if p.id not in kept])
            curves[arm].append(
                _label_rounds(engine, arm, truth, embed, holdout, classes, seed)
            )
            engine.dispose()

    def rounded(values):
        return [round(float(v), 4) for v in values]

    starts = [curve[0] for curve in curves["al"]]
    summary = {
        "al_pool_photos": len(pool),
        "al_start_labelled": len(start),
        "al_added": ROUNDS * PER_ROUND,
        "al_rounds": f"{ROUNDS} x {PER_ROUND}",
        "al_seeds": list(seeds),
        "al_full_pool_accuracy": round(full_pool, 4),
        "al_start_accuracy": round(float(np.mean(starts)), 4),
        "al_start_accuracy_per_seed": rounded(starts),
        "al_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    for arm in ARMS:
        at_end = [curve[-1] for curve in curves[arm]]
        summary[f"{arm}_accuracy_at_100"] = round(float(np.mean(at_end)), 4)
        summary[f"{arm}_accuracy_at_100_per_seed"] = rounded(at_end)
        summary[f"{arm}_accuracy_by_round"] = rounded(np.mean(curves[arm], axis=0))
    return summary
