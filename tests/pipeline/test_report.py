import base64
import re
from datetime import timedelta

import pytest
from sqlalchemy import select

from db.engine import session_scope
from db.labels import accept_label, apply_action, undo_event
from db.models import DONE, FAILED, POOL, UNLABELLED, Photo, TrainingRun, utcnow
from db.settings import get_settings
from pipeline.__main__ import main
from pipeline.ingest import ingest_folder
from pipeline.report import cleaning_report, confused_pairs, label_changes
from pipeline.runs import previous_run
from tests.conftest import CLASSES, add_run, make_photo_set, real_photos


def _add_run(session, accuracy, confusion, counts, status=DONE) -> TrainingRun:
    run = TrainingRun(
        status=status,
        config={},
        classes=list(CLASSES),
        n_train=sum(counts),
        metrics={
            "accuracy_holdout": accuracy,
            "n_holdout": sum(map(sum, confusion)),
            "confusion": confusion,
            "train_class_counts": dict(zip(CLASSES, counts, strict=True)),
        },
        created_at=utcnow(),
    )
    session.add(run)
    session.flush()
    return run


def _pool_ids(session) -> list[int]:
    return list(
        session.scalars(select(Photo.id).where(Photo.split == POOL).order_by(Photo.id))
    )


@pytest.fixture
def two_runs(engine, small_set):
    """Two finished runs, a failed one between them, and cleaning around them.

    Before run 1: photo 1 relabelled. Between runs 1 and 3: photo 2
    relabelled, photo 3 relabelled and put back (no net change), photo 4
    excluded, photo 5 excluded and restored (no net change), photo 6
    confirmed, 2 pool photos imported, 1 photo imported unlabelled and then
    labelled. After run 3: photo 7 relabelled.
    """
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        pool = _pool_ids(session)
        apply_action(session, pool[0], "relabel", new_label="not_hot_dog")
        _add_run(session, 0.75, [[3, 1], [1, 3]], [5, 7])

    make_photo_set(small_set, train_per_class=1, test_per_class=0, skip=6)
    unlabelled = small_set / "unlabelled"
    unlabelled.mkdir()
    [late] = real_photos("train", "hot_dog", 1, skip=20)
    (unlabelled / late.name).symlink_to(late)
    with session_scope(engine) as session:
        apply_action(session, pool[1], "relabel", new_label="not_hot_dog")
        event = apply_action(session, pool[2], "relabel", new_label="not_hot_dog")
        undo_event(session, event.id)
        apply_action(session, pool[3], "exclude")
        apply_action(session, pool[4], "exclude")
        apply_action(session, pool[4], "restore")
        apply_action(session, pool[5], "confirm")
        ingest_folder(session, small_set)
        [new_id] = session.scalars(select(Photo.id).where(Photo.split == UNLABELLED))
        accept_label(session, new_id, "hot_dog")
        _add_run(session, 0.5, [[2, 2], [2, 2]], [7, 5], status=FAILED)
        _add_run(session, 0.875, [[4, 0], [1, 3]], [7, 7])

    with session_scope(engine) as session:
        apply_action(session, pool[6], "relabel", new_label="hot_dog")
    return pool


def _report(run_id: int) -> str:
    with session_scope() as session:
        return cleaning_report(session, session.get(TrainingRun, run_id))


def test_changes_between_runs_are_net_per_photo(engine, two_runs):
    pool = two_runs
    with session_scope(engine) as session:
        run = session.get(TrainingRun, 3)
        previous = previous_run(session, run)
        changes = label_changes(session, previous.created_at, run.created_at)

    assert previous.id == 1  # the failed run 2 is skipped
    assert [c.photo_id for c in changes.relabelled] == [pool[1]]
    assert (changes.relabelled[0].old_label, changes.relabelled[0].new_label) == (
        "hot_dog",
        "not_hot_dog",
    )
    assert [c.photo_id for c in changes.excluded] == [pool[3]]
    assert [c.photo_id for c in changes.confirmed] == [pool[5]]
    assert changes.restored == []
    assert [c.new_label for c in changes.labelled] == ["hot_dog"]
    assert changes.imported == {POOL: 2, UNLABELLED: 1}
    assert changes.added == 3


def test_report_counts_accuracies_and_confused_pair(two_runs):
    report = _report(3)

    assert report.startswith("# Cleaning report: run 3\n")
    assert "Changes between run 1 (started" in report
    assert "| relabelled | 1 |" in report
    assert "| excluded | 1 |" in report
    assert "| added (imported into the pool, or labelled) | 3 |" in report
    assert "| brought back after an exclusion | 0 |" in report
    assert "| confirmed as labelled | 1 |" in report
    assert (
        "Photos imported: 2 into the pool split, 1 into the unlabelled split." in report
    )
    assert (
        "Before (run 1): 75.0 %; after (run 3): 87.5 %; change +12.5 points." in report
    )
    assert "| hot_dog | 75.0 % | 100.0 % | 5 | 7 |" in report
    assert "| not_hot_dog | 75.0 % | 75.0 % | 7 | 7 |" in report
    assert "| all | 75.0 % | 87.5 % | 12 | 14 |" in report
    assert "| hot_dog ↔ not_hot_dog | 1 | 0 | 1 |" in report
    assert "holdout changed" not in report
    # The relabelled photo is listed by name; the one relabelled later is not.
    assert re.search(r"\| #2 \| \S+\.jpg \| hot_dog → not_hot_dog \|", report)
    assert "| #7 |" not in report


def test_report_embeds_a_png_chart(two_runs):
    report = _report(3)
    [encoded] = re.findall(
        r"!\[[^]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", report
    )
    assert base64.b64decode(encoded).startswith(b"\x89PNG\r\n\x1a\n")
    # The chart comes last, after every table.
    assert report.rstrip().endswith(")")


def test_first_run_counts_everything_before_it(two_runs):
    report = _report(1)

    assert "The first finished run" in report
    assert "| relabelled | 1 |" in report
    assert "| excluded | 0 |" in report
    assert "| added (imported into the pool, or labelled) | 12 |" in report
    assert (
        "Photos imported: 8 into the holdout split, 12 into the pool split." in report
    )
    assert "This run: 75.0 % (no previous run to compare)." in report
    assert "| hot_dog | – | 75.0 % | – | 5 |" in report
    assert "| hot_dog ↔ not_hot_dog | 2 | 1 | 1 |" in report
    assert "data:image/png;base64," in report


def test_a_changed_holdout_is_called_out(engine, small_set):
    with session_scope(engine) as session:
        _add_run(session, 0.5, [[1, 1], [1, 1]], [6, 6])
        _add_run(session, 1.0, [[4, 0], [0, 4]], [6, 6])
    report = _report(2)
    assert "The holdout changed between the runs (4 → 8 photos)" in report
    assert "No holdout photo was mistaken for another class." in report


@pytest.mark.parametrize(
    ("confusion", "expected"),
    [
        ([[5, 2, 0], [3, 5, 1], [0, 0, 9]], [("a", "b", 2, 3), ("b", "c", 1, 0)]),
        ([[9, 0, 0], [0, 9, 0], [0, 0, 9]], []),
        ([[1, 0, 4], [1, 1, 0], [4, 0, 1]], [("a", "c", 4, 4), ("a", "b", 0, 1)]),
    ],
)
def test_confused_pairs_most_mistakes_first(confusion, expected):
    run = TrainingRun(classes=["a", "b", "c"], metrics={"confusion": confusion})
    pairs = confused_pairs(run)
    assert [
        (p.first, p.second, p.first_as_second, p.second_as_first) for p in pairs
    ] == expected


def test_cli_writes_the_report(two_runs, tmp_path, capsys):
    out = tmp_path / "out" / "report.md"
    assert main(["report", "--run", "1", "--out", str(out)]) == 0
    assert out.read_text().startswith("# Cleaning report: run 1\n")
    assert str(out) in capsys.readouterr().out

    # By default the latest finished run, beside its weights.
    assert main(["report"]) == 0
    default = get_settings().artifact_dir / "runs" / "3" / "cleaning-report.md"
    assert default.read_text() == _report(3)

    assert main(["report", "--run", "2"]) == 2
    assert "run 2 is failed, not done" in capsys.readouterr().err

    # A folder, or a path through a file, is an error that names the path.
    assert main(["report", "--out", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert main(["report", "--out", str(out / "report.md")]) == 2
    assert str(out) in capsys.readouterr().err
    assert out.read_text().startswith("# Cleaning report: run 1\n")


def test_events_before_the_run_started_only(two_runs):
    # Photo 7's relabel came after run 3 started: no report counts it.
    with session_scope() as session:
        run = session.get(TrainingRun, 3)
        later = label_changes(session, run.created_at, utcnow() + timedelta(hours=1))
    assert [c.photo_id for c in later.relabelled] == [two_runs[6]]


def test_holdout_predictions_that_flipped_are_counted(engine, small_set):
    with session_scope(engine) as session:
        ingest_folder(session, small_set)
        holdout = session.scalars(
            select(Photo).where(Photo.split == "holdout").order_by(Photo.id)
        ).all()
        other = {"hot_dog": "not_hot_dog", "not_hot_dog": "hot_dog"}
        right = {p.id: p.label for p in holdout}
        first = right | {holdout[0].id: other[holdout[0].label]}
        second = right | {p.id: other[p.label] for p in holdout[1:3]}
        add_run(session, first)
        run = add_run(session, second)
        report = cleaning_report(session, run)
    assert (
        f"of the {len(holdout)} holdout photos both runs predicted: "
        "fixed (now right) 1, broken (now wrong) 2, "
        "from one wrong class to another 0." in " ".join(report.split())
    )
