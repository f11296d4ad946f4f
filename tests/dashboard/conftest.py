"""Fixtures for the dashboard's AppTests: the app itself and a trained database.

Training takes seconds, so one run is trained per test session into a template
database; each test that needs it gets its own copy.
"""

import os
import sqlite3
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from db.engine import get_engine, session_scope
from pipeline.ingest import ingest_folder
from pipeline.train import TrainConfig, train_run
from tests.conftest import make_photo_set

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
TIMEOUT = 60


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


@pytest.fixture
def trained(workspace, trained_template, monkeypatch):
    """This test's own copy of the trained database; photos and model are shared."""
    source = sqlite3.connect(trained_template / "studio.db")
    target = sqlite3.connect(workspace / "studio.db")
    with target:
        source.backup(target)
    source.close()
    target.close()
    monkeypatch.setenv("DATA_DIR", str(trained_template / "photos"))
    return workspace
