"""Fixtures for the dashboard's AppTests: the app itself and a trained database.

Training and exporting take seconds, so one run is trained, and once exported,
per test session into template databases; each test that needs one gets its
own copy.
"""

import json
import os
import sqlite3
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from db.engine import get_engine, session_scope
from db.models import Export
from pipeline.ingest import ingest_folder
from pipeline.train import TrainConfig, train_run
from tests.conftest import make_photo_set

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
TIMEOUT = 60
CHECKS = {
    "agreement": 1.0,
    "max_prob_diff": 4e-6,
    "accuracy_holdout": 0.75,
    "size_mb": 18.6,
    "latency_ms_median": 9.8,
}


def open_page(page: str | None = None) -> AppTest:
    """Run the app as `streamlit run` would, then switch to `views/<page>.py`."""
    app = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    if page is not None:
        app.switch_page(f"views/{page}.py").run()
    return app


@pytest.fixture
def no_workers(monkeypatch):
    """Record jobs without starting worker processes.

    The job's pid is this test process, so `reap_dead_jobs` sees a live worker.
    """
    import pipeline.jobs

    monkeypatch.setattr(pipeline.jobs, "_spawn_worker", lambda job_id: os.getpid())


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory):
    """A database with the small photo set imported and one quick run trained."""
    root = tmp_path_factory.mktemp("trained")
    photos = make_photo_set(root / "photos", train_per_class=6, test_per_class=4)
    url = f"sqlite:///{root / 'studio.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DATABASE_URL", url)
        patch.setenv("ARTIFACT_DIR", str(root / "artifacts"))
        patch.setenv("DATA_DIR", str(photos))
        engine = get_engine(url)
        with session_scope(engine) as session:
            ingest_folder(session, photos)
        config = TrainConfig(
            image_size=128, frozen_epochs=1, unfrozen_epochs=0, folds=2, tta=False
        )
        with session_scope(engine) as session:
            train_run(session, config)
        engine.dispose()
    return root


def _copy_database(template: Path, workspace: Path) -> None:
    source = sqlite3.connect(template / "studio.db")
    target = sqlite3.connect(workspace / "studio.db")
    with target:
        source.backup(target)
    source.close()
    target.close()


@pytest.fixture
def trained(workspace, trained_template, monkeypatch):
    """This test's own copy of the trained database; photos and model are shared."""
    _copy_database(trained_template, workspace)
    monkeypatch.setenv("DATA_DIR", str(trained_template / "photos"))
    return workspace


@pytest.fixture(scope="session")
def exported_template(trained_template, tmp_path_factory):
    """The trained database with its run exported once, checked, as ONNX."""
    from pipeline.export import ExportConfig, export_run

    root = tmp_path_factory.mktemp("exported")
    _copy_database(trained_template, root)
    url = f"sqlite:///{root / 'studio.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DATABASE_URL", url)
        patch.setenv("ARTIFACT_DIR", str(root / "artifacts"))
        patch.setenv("DATA_DIR", str(trained_template / "photos"))
        engine = get_engine(url)
        with session_scope(engine) as session:
            export_run(session, 1, ExportConfig(format="onnx", check_limit=4))
        engine.dispose()
    return root


@pytest.fixture
def exported(workspace, trained_template, exported_template, monkeypatch):
    """This test's own copy of the exported database; the model file is shared."""
    _copy_database(exported_template, workspace)
    monkeypatch.setenv("DATA_DIR", str(trained_template / "photos"))
    return workspace


@pytest.fixture
def exports(trained):
    """Two recorded exports of run 1 with files on disk, and one whose file is gone.

    The files hold no model: tests that show a prediction must stand in for
    `predict_with_export`.
    """
    folder = trained / "artifacts" / "exports"
    folder.mkdir(parents=True)
    model, sidecar = folder / "run1.pte", folder / "run1.json"
    model.write_bytes(b"\0" * 2048)
    sidecar.write_text(json.dumps({"labels": ["hot_dog", "not_hot_dog"]}))
    onnx = folder / "run1.onnx"
    onnx.write_bytes(b"\1" * 1024)
    with session_scope(get_engine()) as session:
        session.add_all(
            [
                Export(run_id=1, format="pte", path=str(model),
                       sidecar_path=str(sidecar), size_bytes=2048, checks=CHECKS),
                Export(run_id=1, format="onnx", path=str(onnx), sidecar_path=None,
                       size_bytes=1024, checks={"agreement": 0.995}),
                Export(run_id=1, format="pte", path=str(folder / "gone.pte"),
                       sidecar_path=None, size_bytes=10, checks={}),
            ]
        )  # fmt: skip
    return folder
