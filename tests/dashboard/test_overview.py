from pathlib import Path

import pyarrow as pa
from sqlalchemy import select

from db.engine import get_engine, session_scope
from db.labels import apply_action
from db.models import HOLDOUT, Photo, TrainingRun
from tests.conftest import add_run, real_photos
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
    assert any("No finished training run yet" in info.value for info in app.info)

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


def holdout_photos() -> list[tuple[int, str]]:
    with session_scope(get_engine()) as session:
        photos = session.scalars(
            select(Photo).where(Photo.split == HOLDOUT).order_by(Photo.id)
        )
        return [(photo.id, photo.label) for photo in photos]


def other_than(label: str) -> str:
    return "not_hot_dog" if label == "hot_dog" else "hot_dog"


def photo_paths(*photo_ids: int) -> list[str]:
    with session_scope(get_engine()) as session:
        return [session.get(Photo, photo_id).path for photo_id in photo_ids]


def frame_with(app, column: str):
    [frame] = [f.value for f in app.dataframe if column in f.value.columns]
    return frame


def chart_points(app) -> dict[int, float]:
    """The accuracy chart's points: run id → holdout accuracy in percent."""
    [chart] = app.get("vega_lite_chart")
    frame = pa.ipc.open_stream(chart.proto.datasets[0].data.data).read_pandas()
    return dict(zip(frame["run"], frame["holdout accuracy (%)"], strict=True))


def test_what_changed_on_the_holdout_since_the_previous_run(small_set):
    app = open_page()
    holdout = holdout_photos()
    (fixed, fixed_label), (broken, broken_label) = holdout[0], holdout[5]
    with session_scope(get_engine()) as session:
        first = add_run(session, {**dict(holdout), fixed: other_than(fixed_label)})
        second = add_run(session, {**dict(holdout), broken: other_than(broken_label)})
    app.run()

    assert not app.exception
    shown = metrics(app)
    assert (shown["Fixed"], shown["Broken"], shown["Other flips"]) == ("1", "1", "0")
    assert any(
        "Of the 8 holdout photos both runs predicted, 2 changed" in caption.value
        for caption in app.caption
    )
    flips = frame_with(app, "change")
    assert flips.to_dict("list") == {
        "photo": [fixed, broken],
        "file": [Path(path).name for path in photo_paths(fixed, broken)],
        "given label": [fixed_label, broken_label],
        f"run #{first.id} predicted": [other_than(fixed_label), broken_label],
        f"run #{second.id} predicted": [fixed_label, other_than(broken_label)],
        "change": ["fixed", "broken"],
    }
    matrix = frame_with(app, "predicted hot_dog")
    assert matrix.values.tolist() == second.metrics["confusion"] == [[4, 0], [1, 3]]
    assert chart_points(app) == {first.id: 87.5, second.id: 87.5}

    assert not app.image
    app.toggle(key="overview_flip_photos").set_value(True).run()
    assert len(app.image) == 2


def test_a_single_run_has_nothing_to_compare(trained):
    with session_scope(get_engine()) as session:
        run = session.scalars(select(TrainingRun)).one()
    app = open_page()
    assert not app.exception
    assert any("is the only finished run" in info.value for info in app.info)
    assert "Fixed" not in metrics(app)
    matrix = frame_with(app, "predicted hot_dog")
    assert matrix.values.tolist() == run.metrics["confusion"]
    assert list(matrix.index) == ["given hot_dog", "given not_hot_dog"]
    assert chart_points(app) == {run.id: 100 * run.metrics["accuracy_holdout"]}
