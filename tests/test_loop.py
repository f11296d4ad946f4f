"""The whole loop on real photos, the way a user drives it headless:
ingest -> train -> score -> relabel -> retrain -> export, through the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import func, select

from db.engine import session_scope
from db.labels import apply_action
from db.models import DONE, Export, LabelEvent, Photo, Prediction, TrainingRun
from db.settings import PROJECT_ROOT
from pipeline.export import load_exported
from pipeline.images import preprocess_file
from pipeline.model import load_weights
from tests.conftest import make_photo_set

TRAIN_ARGS = [
    "--image-size",
    "128",
    "--frozen-epochs",
    "2",
    "--unfrozen-epochs",
    "1",
    "--batch-size",
    "16",
    "--folds",
    "3",
]


def cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ingest_train_score_relabel_retrain_export(engine, workspace):
    make_photo_set(workspace / "photos", train_per_class=10, test_per_class=6)

    # Ingest: 20 pool + 12 holdout rows; a second import adds nothing.
    assert "added 32 photos" in cli("ingest").stdout
    assert "added 0 photos, 32 already known" in cli("ingest").stdout

    # Train: a finished run with metrics, weights and out-of-fold scores.
    first = json.loads(cli("train", *TRAIN_ARGS).stdout)
    with session_scope(engine) as session:
        run = session.get(TrainingRun, first["run_id"])
        assert run.status == DONE and Path(run.artifact_path).is_file()
        assert run.metrics["n_holdout"] == 12
        assert run.metrics["train_class_counts"] == {"hot_dog": 10, "not_hot_dog": 10}
        oof = session.scalars(
            select(Prediction).where(
                Prediction.run_id == run.id, Prediction.kind == "oof"
            )
        ).all()
        assert len(oof) == 20
        # The reviewer takes the most confused photo and gives it the other class.
        worst = max(oof, key=lambda row: row.score)
        photo = session.get(Photo, worst.photo_id)
        old_label = photo.label
        new_label = "hot_dog" if old_label == "not_hot_dog" else "not_hot_dog"
        apply_action(session, photo.id, "relabel", new_label=new_label)
        photo_id = photo.id
        excluded = next(row.photo_id for row in oof if row.photo_id != photo_id)
        apply_action(session, excluded, "exclude")

    # Score again from the current labels: the relabelled photo's row follows.
    cli("score", "--run", str(first["run_id"]))
    with session_scope(engine) as session:
        row = session.scalars(
            select(Prediction).where(
                Prediction.run_id == first["run_id"],
                Prediction.photo_id == photo_id,
                Prediction.kind == "oof",
            )
        ).one()
        assert row.given_label == new_label
        assert session.scalar(select(func.count()).select_from(LabelEvent)) == 2

    # Retrain on the cleaned labels: a second run that used them.
    second = json.loads(cli("train", *TRAIN_ARGS).stdout)
    assert second["run_id"] != first["run_id"]
    counts = {"hot_dog": 10, "not_hot_dog": 10}
    counts[old_label] -= 1
    counts[new_label] += 1
    counts[_label(engine, excluded)] -= 1
    with session_scope(engine) as session:
        run = session.get(TrainingRun, second["run_id"])
        assert run.metrics["train_class_counts"] == counts
        assert run.n_train == 19
        given = session.scalars(
            select(Prediction.given_label).where(
                Prediction.run_id == run.id,
                Prediction.photo_id == photo_id,
                Prediction.kind == "oof",
            )
        ).one()
        assert given == new_label
        runs = session.scalars(select(TrainingRun).order_by(TrainingRun.id)).all()
        assert [r.status for r in runs] == [DONE, DONE]

    # Export: a checked .pte beside its sidecar, agreeing with PyTorch.
    exported = json.loads(cli("export", "--format", "pte").stdout)
    with session_scope(engine) as session:
        export = session.get(Export, exported["export_id"])
        run = session.get(TrainingRun, export.run_id)
        assert export.run_id == second["run_id"]
        assert export.checks["agreement"] >= 0.99
        sidecar = json.loads(Path(export.sidecar_path).read_text())
        assert sidecar["labels"] == ["hot_dog", "not_hot_dog"]
        holdout = session.scalars(
            select(Photo).where(Photo.split == "holdout").order_by(Photo.id).limit(4)
        ).all()
        model = load_weights(run.artifact_path, 2)
        program = load_exported(export.path)
        for photo in holdout:
            x = preprocess_file(photo.path, 128)[None]
            with torch.inference_mode():
                expected = torch.softmax(model(torch.from_numpy(x)), 1)[0].numpy()
            assert np.abs(program(x) - expected).max() < 1e-4


def _label(engine, photo_id: int) -> str:
    with session_scope(engine) as session:
        return session.get(Photo, photo_id).label
