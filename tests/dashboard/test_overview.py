from sqlalchemy import select

from db.engine import get_engine, session_scope
from db.labels import apply_action
from db.models import TrainingRun
from tests.conftest import real_photos
from tests.dashboard.conftest import open_page


def metrics(app) -> dict[str, str]:
    return {metric.label: metric.value for metric in app.metric}


def test_counts_relabels_and_skipped_files(small_set):
    (small_set / "train" / "hot_dog" / "empty.jpg").write_bytes(b"")
    app = open_page()
    with session_scope(get_engine()) as session:
        apply_action(session, 1, "relabel", new_label="not_hot_dog")
        apply_action(session, 2, "exclude")
    app.run()

    assert not app.exception
    shown = metrics(app)
    assert shown["Pool photos"] == "12"
    assert shown["Holdout photos"] == "8"
    assert shown["Relabelled so far"] == "1"
    assert shown["Excluded"] == "1"
    assert shown["Latest run's holdout accuracy"] == "no run yet"

    pool, holdout, skipped = (frame.value for frame in app.dataframe)
    assert pool.loc["hot_dog"].to_dict() == {
        "unreviewed": 4,
        "relabelled": 0,
        "excluded": 1,
        "total": 5,
    }
    assert pool.loc["not_hot_dog", "relabelled"] == 1
    assert pool.loc["not_hot_dog", "total"] == 7
    assert holdout["total"].to_dict() == {"hot_dog": 4, "not_hot_dog": 4}
    assert list(skipped["file"]) == [str(small_set / "train/hot_dog/empty.jpg")]
    assert "empty file" in skipped["reason"][0]


def test_latest_run_accuracy(trained):
    with session_scope(get_engine()) as session:
        run = session.scalars(select(TrainingRun)).one()
    app = open_page()
    accuracy = f"{100 * run.metrics['accuracy_holdout']:.1f} %"
    assert metrics(app)[f"Run #{run.id} holdout accuracy"] == accuracy


def test_rescan_imports_photos_added_since_start(small_set):
    app = open_page()
    assert metrics(app)["Pool photos"] == "12"
    [photo] = real_photos("train", "hot_dog", 1, skip=20)
    (small_set / "train" / "hot_dog" / photo.name).symlink_to(photo)

    app.button(key="overview_rescan").click().run()

    assert app.success[0].value.startswith("added 1 photos, 20 already known")
    assert metrics(app)["Pool photos"] == "13"
