"""The benchmark stages, one per process: `python -m bench.stages NAME WORKDIR`.

Every stage reads the real photos from DATA_DIR and prints one JSON line.
"""

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def remove_database(database: Path) -> None:
    """Delete an SQLite file with its WAL and shared-memory files.

    A WAL left beside a new file of the same name would be replayed into it.
    """
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)


def copy_database(source: Path, database: Path) -> None:
    """A fresh copy of the (checkpointed, closed) database `source`."""
    import shutil

    remove_database(database)
    shutil.copy(source, database)


def _fresh_database(workdir: Path, name: str):
    """A new database of the real photos in `workdir`, pointed to by the env."""
    database = workdir / f"{name}.db"
    remove_database(database)
    os.environ["DATABASE_URL"] = f"sqlite:///{database}"
    os.environ["ARTIFACT_DIR"] = str(workdir / f"{name}-artifacts")
    from db.engine import get_engine, session_scope
    from db.settings import get_settings
    from pipeline.ingest import ingest_folder

    engine = get_engine()
    with session_scope(engine) as session:
        ingest_folder(session, get_settings().data_dir)
    return engine


def _photos(session, split):
    from sqlalchemy import select

    from db.models import Photo

    return list(
        session.scalars(select(Photo).where(Photo.split == split).order_by(Photo.id))
    )


def stage_baselines(workdir: Path) -> dict:
    """Zero-shot ImageNet 'hotdog' class and a linear probe on frozen features."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from db.engine import session_scope
    from pipeline.infer import pooled_features, run_model
    from pipeline.model import IMAGENET_HOTDOG, create_model

    engine = _fresh_database(workdir, "baselines")
    with session_scope(engine) as session:
        pool, holdout = _photos(session, "pool"), _photos(session, "holdout")
        pool_y = np.array([p.label == "hot_dog" for p in pool])
        holdout_y = np.array([p.label == "hot_dog" for p in holdout])
        pool_paths = [p.path for p in pool]
        holdout_paths = [p.path for p in holdout]

    model = create_model(None).eval()

    def logits_and_features(m, x):
        features = pooled_features(m, x)
        return torch.cat([m.get_classifier()(features), features], dim=1)

    started = time.perf_counter()
    holdout_out = run_model(model, holdout_paths, fn=logits_and_features)
    zero_shot = holdout_out[:, :1000].argmax(1) == IMAGENET_HOTDOG
    pool_out = run_model(model, pool_paths, fn=logits_and_features)
    probe = LogisticRegression(C=0.05, max_iter=3000).fit(pool_out[:, 1000:], pool_y)
    probe_accuracy = float((probe.predict(holdout_out[:, 1000:]) == holdout_y).mean())
    return {
        "zero_shot_accuracy": round(float((zero_shot == holdout_y).mean()), 4),
        "linear_probe_accuracy": round(probe_accuracy, 4),
        "linear_probe_seconds": round(time.perf_counter() - started, 1),
        "baselines_peak_rss_mb": round(peak_rss_mb(), 1),
    }


def stage_train(workdir: Path) -> dict:
    """The project's default retrain on the whole pool, scored on the holdout.

    Trained twice with the same seed: first with no cached ImageNet features
    (the first training on a photo set computes them), then again with them
    cached, as every later retrain of the loop runs. The two accuracies show
    whether a seed reproduces its run.
    """
    import shutil

    from db.engine import session_scope
    from pipeline.train import TrainConfig, train_run

    shutil.rmtree(workdir / "train-artifacts", ignore_errors=True)
    engine = _fresh_database(workdir, "train")
    metrics, devices, walls = [], set(), []
    for _ in range(2):
        started = time.perf_counter()
        with session_scope(engine) as session:
            run = train_run(session, TrainConfig())
            metrics.append(dict(run.metrics))
            devices.add(run.device)
        walls.append(time.perf_counter() - started)
    first, second = metrics
    return {
        "accuracy_holdout": round(first["accuracy_holdout"], 4),
        "train_seconds": first["train_seconds"],
        "accuracy_holdout_repeat": round(second["accuracy_holdout"], 4),
        "retrain_seconds": second["train_seconds"],
        # The whole run as the Train page waits for it: fit, holdout
        # evaluation, out-of-fold scoring, saving.
        "run_seconds": round(walls[0], 1),
        "rerun_seconds": round(walls[1], 1),
        "train_device": ", ".join(sorted(devices)),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def confident_learning_ranking(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Confident learning's label issues, ranked: flagged photos first.

    A photo is flagged when some other class's probability reaches that
    class's threshold (its mean probability over photos labelled with it) and
    the most confident such class is not the given one. Within each group,
    lower probability of the given label ranks higher.
    """
    num_classes = probs.shape[1]
    thresholds = np.array(
        [
            probs[labels == j, j].mean() if (labels == j).any() else 1.0
            for j in range(num_classes)
        ]
    )
    above = probs >= thresholds[None, :]
    masked = np.where(above, probs, -1.0)
    confident = masked.argmax(axis=1)
    flagged = above.any(axis=1) & (confident != labels)
    self_confidence = probs[np.arange(len(labels)), labels]
    return np.lexsort((self_confidence, ~flagged))


def precision_recall(ranking: np.ndarray, flipped: np.ndarray) -> tuple[float, float]:
    k = len(flipped)
    precision = np.isin(ranking[:k], flipped).mean()
    recall = np.isin(flipped, ranking[: 2 * k]).mean()
    return float(precision), float(recall)


def stage_noise(workdir: Path, seeds=(0, 1, 2), fraction: float = 0.1) -> dict:
    """Flip 10 % of the pool's labels; how well does each ranking find them?"""

    from sqlalchemy import update

    from db.engine import get_engine, session_scope
    from db.models import Photo, TrainingRun
    from pipeline.embeddings import imagenet_embeddings
    from pipeline.infer import predict_probs
    from pipeline.model import load_weights
    from pipeline.scoring import oof_probabilities, score_run
    from pipeline.train import TrainConfig, train_run

    base_engine = _fresh_database(workdir, "noise-base")
    with session_scope(base_engine) as session:
        imagenet_embeddings(_photos(session, "pool"))  # cache once for all seeds
    base_db = workdir / "noise-base.db"
    base_engine.dispose()
    results: dict[str, list[float]] = {}

    def add(name, value):
        results.setdefault(name, []).append(value)

    for seed in seeds:
        database = workdir / f"noise-{seed}.db"
        copy_database(base_db, database)
        os.environ["DATABASE_URL"] = f"sqlite:///{database}"
        engine = get_engine()
        with session_scope(engine) as session:
            pool = _photos(session, "pool")
            classes = sorted({p.label for p in pool})
            rng = np.random.default_rng(seed)
            flipped = rng.choice(len(pool), round(fraction * len(pool)), replace=False)
            for i in flipped:
                other = [c for c in classes if c != pool[i].label]
                session.execute(
                    update(Photo)
                    .where(Photo.id == pool[i].id)
                    .values(label=str(rng.choice(other)))
                )
        with session_scope(engine) as session:
            pool = _photos(session, "pool")
            labels = np.array([classes.index(p.label) for p in pool])
            everyone = np.ones(len(pool), bool)

            # Quick path: out-of-fold heads on ImageNet embeddings.
            quick = oof_probabilities(
                imagenet_embeddings(pool), labels, everyone, len(classes)
            )
            quick_score = 1 - quick[np.arange(len(pool)), labels]
            p, r = precision_recall(np.argsort(-quick_score, kind="stable"), flipped)
            add("quick_precision_at_k", p)
            add("quick_recall_at_2k", r)

            # A model trained on the noisy labels: thorough path and top losses.
            run = train_run(session, TrainConfig(seed=seed))
            run_id = run.id
        with session_scope(engine) as session:
            run = session.get(TrainingRun, run_id)
            rows = {row.photo_id: row for row in run.predictions if row.kind == "oof"}
            thorough = np.array([rows[p.id].probs for p in pool])
            score = 1 - thorough[np.arange(len(pool)), labels]
            p, r = precision_recall(np.argsort(-score, kind="stable"), flipped)
            add("noise_precision_at_k", p)
            add("noise_recall_at_2k", r)
            p, _ = precision_recall(
                confident_learning_ranking(thorough, labels), flipped
            )
            add("confident_learning_precision_at_k", p)

            model = load_weights(run.artifact_path, len(classes))
            insample = predict_probs(
                model, [p.path for p in pool], run.config["image_size"]
            )
            loss = -np.log(np.clip(insample[np.arange(len(pool)), labels], 1e-12, 1))
            p, _ = precision_recall(np.argsort(-loss, kind="stable"), flipped)
            add("topk_insample_precision_at_k", p)

            # Rerank after one relabel, embeddings cached: the dashboard's path.
            session.execute(
                update(Photo)
                .where(Photo.id == pool[flipped[0]].id)
                .values(label=pool[flipped[0]].original_label)
            )
            started = time.perf_counter()
            score_run(session, run, thorough=False)
            add("rerank_seconds", time.perf_counter() - started)
        engine.dispose()

    summary = {key: round(float(np.mean(values)), 4) for key, values in results.items()}
    summary.update(
        {
            f"{key}_per_seed": [round(v, 4) for v in values]
            for key, values in results.items()
            if "precision" in key
        }
    )
    summary["noise_seeds"] = list(seeds)
    summary["noise_flipped_per_seed"] = round(fraction * len(pool))
    summary["noise_peak_rss_mb"] = round(peak_rss_mb(), 1)
    return summary


def _stage_writeload(workdir: Path) -> dict:
    from bench.writeload import stage_writeload

    return stage_writeload(workdir)


def _stage_review(workdir: Path) -> dict:
    from bench.review import stage_review

    return stage_review(workdir)


def _stage_exports(workdir: Path) -> dict:
    from bench.exports import stage_exports

    return stage_exports(workdir)


def _stage_al(workdir: Path) -> dict:
    from bench.active_learning import stage_al

    return stage_al(workdir)


STAGES = {
    "review": _stage_review,
    "exports": _stage_exports,
    "baselines": stage_baselines,
    "train": stage_train,
    "noise": stage_noise,
    "writeload": _stage_writeload,
    "al": _stage_al,
}


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    name, workdir = sys.argv[1], Path(sys.argv[2])
    result = STAGES[name](workdir)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
