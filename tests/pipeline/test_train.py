import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select
from torch import nn

from db.engine import session_scope
from db.labels import apply_action
from db.models import CANCELLED, DONE, HOLDOUT, Photo, Prediction, TrainingRun
from pipeline.images import crop_seed
from pipeline.infer import predict_probs
from pipeline.ingest import ingest_folder
from pipeline.model import create_model, load_weights
from pipeline.progress import Progress
from pipeline.train import (
    CancelledError,
    NotTrainableError,
    TrainConfig,
    evaluate,
    seed_everything,
    train_run,
)
from tests.conftest import make_photo_set

QUICK = dict(
    image_size=128,
    frozen_epochs=10,
    unfrozen_epochs=0,
    folds=3,
    tta=False,
    batch_size=16,
)


def _holdout(session):
    return list(
        session.scalars(select(Photo).where(Photo.split == HOLDOUT).order_by(Photo.id))
    )


def test_training_beats_the_untrained_head_and_reloads_identically(engine, workspace):
    data = make_photo_set(workspace / "photos", train_per_class=16, test_per_class=10)
    config = TrainConfig(**{**QUICK, "tta": True, "tta_crops": 2})
    with session_scope(engine) as session:
        ingest_folder(session, data)
        holdout = _holdout(session)
        truth = np.array([p.label == "not_hot_dog" for p in holdout], dtype=int)
        seed_everything(config.seed)
        untrained = create_model(2, head_hidden=config.head_hidden).eval()
        before = (
            predict_probs(untrained, [p.path for p in holdout], 128).argmax(1) == truth
        ).mean()
        run = train_run(session, config)

    with session_scope(engine) as session:
        run = session.get(TrainingRun, run.id)
        assert run.status == DONE
        accuracy = run.metrics["accuracy_holdout"]
        assert accuracy > before and accuracy >= 0.75
        assert np.array(run.metrics["confusion"]).sum() == 20

        # The recipe's settings are stored with the run, in the row and on disk.
        assert run.config == asdict(config)
        saved = json.loads((Path(run.artifact_path).parent / "config.json").read_text())
        assert saved["classes"] == ["hot_dog", "not_hot_dog"]

        # Reloading the saved weights reproduces the recorded predictions: the
        # run computed them from cached features, this from the photos.
        model = load_weights(run.artifact_path, 2)
        seeds = [crop_seed(p.sha256) for p in holdout]
        paths = [p.path for p in holdout]
        probs = predict_probs(model, paths, 128, tta=True, crops=2, crop_seeds=seeds)
        recorded = {
            row.photo_id: row.probs
            for row in session.scalars(
                select(Prediction).where(
                    Prediction.run_id == run.id, Prediction.kind == "holdout"
                )
            )
        }
        assert np.allclose(probs, [recorded[p.id] for p in holdout], atol=1e-4)
        # Every pool photo got an out-of-fold score.
        oof = session.scalars(
            select(Prediction).where(
                Prediction.run_id == run.id, Prediction.kind == "oof"
            )
        ).all()
        assert len(oof) == 32
        assert all(0.0 <= row.score <= 1.0 and row.reason for row in oof)


@pytest.mark.parametrize(
    ("exclude", "message"),
    [
        ("all", "every photo is excluded"),
        ("not_hot_dog", "at least two classes"),
        ("some_not_hot_dog", "'not_hot_dog' has 1 photo; out-of-fold scoring"),
    ],
)
def test_labels_that_cannot_train_are_refused_up_front(
    engine, small_set, exclude, message
):
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        pool = session.scalars(select(Photo).where(Photo.split == "pool")).all()
        if exclude == "all":
            chosen = pool
        elif exclude == "not_hot_dog":
            chosen = [p for p in pool if p.label == "not_hot_dog"]
        else:
            chosen = [p for p in pool if p.label == "not_hot_dog"][1:]
        for photo in chosen:
            apply_action(session, photo.id, "exclude")
    with (
        pytest.raises(NotTrainableError, match=message),
        session_scope(engine) as session,
    ):
        train_run(session, TrainConfig(**QUICK))
    with session_scope(engine) as session:
        assert session.scalars(select(TrainingRun)).all() == []


def test_cancelling_stops_training_and_marks_the_run(engine, small_set):
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
    cancel = Progress(lambda fraction, message: message.startswith("head"))
    with pytest.raises(CancelledError), session_scope(engine) as session:
        train_run(session, TrainConfig(**QUICK), cancel)
    with session_scope(engine) as session:
        run = session.scalars(select(TrainingRun)).one()
        assert run.status == CANCELLED and run.artifact_path is None


def test_unknown_setting_is_named():
    with pytest.raises(ValueError, match="epochz"):
        TrainConfig.from_dict({"epochz": 3})


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"frozen_epochs": 0, "unfrozen_epochs": 0}, "set at least one epoch"),
        ({"frozen_epochs": -1}, "frozen_epochs must be a whole number 0 or more"),
        ({"batch_size": 0}, "batch_size must be a whole number 1 or more, not 0"),
        ({"image_size": 0}, "image_size must be a whole number from 32 to 1024"),
        ({"image_size": 224.0}, "not 224.0"),
        ({"head_lr": -1}, "head_lr must be a number in [0.0, 1.0], not -1"),
        ({"body_lr": 0}, "body_lr must be above 0"),
        ({"head_lr": float("nan")}, "not nan"),
        ({"label_smoothing": 1.0}, "label_smoothing must be a number in [0.0, 1.0)"),
        ({"folds": 1}, "folds must be a whole number 2 or more, not 1"),
        ({"tta": "yes"}, "tta must be true or false, not 'yes'"),
        ({"max_per_class": 0}, "max_per_class must be a whole number 1 or more"),
        ({"crop_views": -1}, "crop_views must be a whole number 0 or more, not -1"),
        ({"head_hidden": 1.5}, "head_hidden must be a whole number 0 or more"),
        ({"head_dropout": 1}, "head_dropout must be a number in [0.0, 1.0), not 1"),
        ({"tta_crops": -2}, "tta_crops must be a whole number 0 or more, not -2"),
    ],
)
def test_settings_that_cannot_train_are_named(values, named):
    with pytest.raises(ValueError) as refused:
        TrainConfig(**values)
    assert named in str(refused.value)


def test_evaluating_on_cached_features_matches_evaluating_on_the_photos(
    engine, small_set
):
    """A head on the ImageNet body scores the same from cached features."""
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        holdout = _holdout(session)
        classes = ["hot_dog", "not_hot_dog"]
        seed_everything(3)
        model = create_model(2, head_hidden=16).eval()
        seen = {}
        for tta, crops in ((False, 0), (True, 0), (True, 2)):
            config = TrainConfig(image_size=96, tta=tta, tta_crops=crops)
            photos, _ = evaluate(model, holdout, classes, config, body_trained=True)
            features, probs = evaluate(model, holdout, classes, config, False)
            assert features == photos
            seen[tta, crops] = probs
            # The photos' path computes every view afresh.
            direct = predict_probs(
                model,
                [p.path for p in holdout],
                96,
                tta=tta,
                crops=crops,
                crop_seeds=[crop_seed(p.sha256) for p in holdout],
            )
            assert np.allclose(probs, direct, atol=1e-4)
    # Each augmentation changes the probabilities.
    assert not np.allclose(seen[False, 0], seen[True, 0], atol=1e-3)
    assert not np.allclose(seen[True, 0], seen[True, 2], atol=1e-3)


def _train_reporting(engine, config):
    reports = []
    progress = Progress(lambda fraction, message: reports.append((fraction, message)))
    with session_scope(engine) as session:
        train_run(session, config, progress)
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    return reports


def _first(reports, phase):
    return min(f for f, message in reports if message.startswith(phase))


def test_progress_shares_the_bar_by_the_work_left(engine, small_set):
    config = TrainConfig(**{**QUICK, "tta": True, "tta_crops": 4})
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
    first = _train_reporting(engine, config)
    again = _train_reporting(engine, config)

    # A first run embeds the pool's views, then the holdout's centre views and
    # test-time crops, inside the evaluation band.
    assert _first(first, "embedding") < _first(first, "head")
    evaluating = [f for f, message in first if message.startswith("evaluating")]
    assert any(evaluating[0] < f < 0.92 for f in evaluating)
    # A retrain finds every view cached: nothing is embedded, the head's
    # epochs start at the left of the bar, and evaluation reads no photo.
    assert not any(message.startswith("embedding") for _, message in again)
    assert _first(again, "head") < 0.1 < _first(first, "head")
    assert not any(
        _first(again, "evaluating") < f < 0.92
        for f, message in again
        if message.startswith("evaluating")
    )


def test_progress_of_whole_network_epochs_keeps_its_band(engine, small_set):
    config = TrainConfig(**{**QUICK, "unfrozen_epochs": 1})
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
    reports = _train_reporting(engine, config)
    body = [f for f, message in reports if message.startswith("all layers")]
    assert 0.25 < min(body) and max(body) <= 0.6
    assert _first(reports, "evaluating") == 0.6


def test_the_same_seed_gives_the_same_run(engine, small_set):
    config = TrainConfig(**{**QUICK, "unfrozen_epochs": 1})
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        first = train_run(session, config)
        second = train_run(session, config)
        assert first.metrics["accuracy_holdout"] == second.metrics["accuracy_holdout"]
        probs = [
            [
                row.probs
                for row in sorted(run.predictions, key=lambda r: r.photo_id)
                if row.kind == "holdout"
            ]
            for run in (first, second)
        ]
    assert np.allclose(probs[0], probs[1], atol=1e-4)


def test_cli_passes_every_setting_and_names_a_bad_one(workspace, monkeypatch, capsys):
    import pipeline.train
    from pipeline.__main__ import main

    seen = {}

    def fake_train_run(session, config, progress):
        seen["config"] = config
        raise LookupError("stopped before training")

    monkeypatch.setattr(pipeline.train, "train_run", fake_train_run)
    argv = ["train", "--no-tta", "--weight-decay", "0.05", "--label-smoothing", "0"]
    argv += ["--crop-views", "2", "--head-hidden", "0", "--head-dropout", "0.25"]
    argv += ["--tta-crops", "3"]
    assert main([*argv, "--frozen-epochs", "3", "--seed", "7"]) == 2
    config = seen["config"]
    assert (config.tta, config.weight_decay, config.label_smoothing) == (False, 0.05, 0)
    assert (config.frozen_epochs, config.seed) == (3, 7)
    assert (config.crop_views, config.head_hidden, config.head_dropout) == (2, 0, 0.25)
    assert config.tta_crops == 3
    assert config.unfrozen_epochs == TrainConfig().unfrozen_epochs

    seen.clear()
    assert main(["train", "--batch-size", "0"]) == 2
    assert (
        "batch_size must be a whole number 1 or more, not 0" in capsys.readouterr().err
    )
    assert seen == {}


@pytest.mark.parametrize("hidden", [0, 16])
def test_saved_weights_reload_with_their_head(tmp_path, hidden):
    from pipeline.model import save_weights

    seed_everything(0)
    model = create_model(3, head_hidden=hidden).eval()
    save_weights(model, tmp_path / "model.pt")
    loaded = load_weights(tmp_path / "model.pt", 3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-5)
    layers = [m for m in loaded.get_classifier().modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in layers] == ([16, 3] if hidden else [3])
