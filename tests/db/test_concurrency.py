"""Two reviewers on one photo, and many writers on one database file.

Each reviewer gets an engine of their own, as two dashboard processes would;
the relabels go through `apply_action` with the version the reviewer saw.
Job workers write to the same file meanwhile, and must not lock it for long.
"""

import multiprocessing
import os
import queue
import random
import sqlite3
import threading
import time
from collections import Counter
from itertools import pairwise

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.engine import _use_wal, create_db_engine, session_scope
from db.labels import StaleLabelError, apply_action
from db.models import DONE, POOL, RELABELLED, Job, LabelEvent, Photo

LABELS = ("hot_dog", "not_hot_dog")
PROCESSES = 4
RELABELS_PER_PROCESS = 100
SHARED_PHOTOS = 6
RESULT_TIMEOUT_S = 120


def _add_photos(engine, count: int, labels: tuple[str, ...] = LABELS) -> list[int]:
    with session_scope(engine) as session:
        photos = [
            Photo(
                sha256=f"{i:064x}",
                path=f"/photos/{i}.jpg",
                width=10,
                height=10,
                split=POOL,
                original_label=labels[i % len(labels)],
                label=labels[i % len(labels)],
            )
            for i in range(count)
        ]
        session.add_all(photos)
        session.flush()
        return [photo.id for photo in photos]


@pytest.fixture
def two_engines(engine):
    """Two engines on the one database file, each with its own connections."""
    url = os.environ["DATABASE_URL"]
    first, second = create_db_engine(url), create_db_engine(url)
    yield first, second
    first.dispose()
    second.dispose()


def _state(engine, photo_id: int) -> tuple[str, str, int, int]:
    with session_scope(engine) as session:
        photo = session.get(Photo, photo_id)
        events = session.scalar(
            select(func.count()).where(LabelEvent.photo_id == photo_id)
        )
        return photo.label, photo.status, photo.version, events


def test_two_reviewers_on_one_photo_one_wins_the_other_is_told(two_engines):
    first, second = two_engines
    photo_id, *_ = _add_photos(first, 3, labels=(*LABELS, "pizza"))
    with Session(first) as alice, Session(second) as bob:
        # Both have the photo on screen at version 1.
        seen_by_alice = alice.get(Photo, photo_id).version
        seen_by_bob = bob.get(Photo, photo_id).version
        assert seen_by_alice == seen_by_bob == 1

        apply_action(
            alice,
            photo_id,
            "relabel",
            new_label="not_hot_dog",
            expected_version=seen_by_alice,
        )
        alice.commit()
        with pytest.raises(StaleLabelError) as caught:
            apply_action(
                bob,
                photo_id,
                "relabel",
                new_label="pizza",
                expected_version=seen_by_bob,
            )
        bob.rollback()

    assert (caught.value.label, caught.value.version) == ("not_hot_dog", 2)
    assert "not_hot_dog" in str(caught.value)
    assert _state(first, photo_id) == ("not_hot_dog", RELABELLED, 2, 1)


def test_a_reviewer_waiting_on_the_others_commit_gets_the_winners_label(two_engines):
    first, second = two_engines
    photo_id, *_ = _add_photos(first, 3, labels=(*LABELS, "pizza"))
    outcome = {}

    def bob_relabels():
        with Session(second) as bob:
            try:
                apply_action(
                    bob, photo_id, "relabel", new_label="pizza", expected_version=1
                )
                bob.commit()
                outcome["bob"] = "saved"
            except StaleLabelError as error:
                bob.rollback()
                outcome["bob"] = error.label

    with Session(first) as alice:
        apply_action(
            alice, photo_id, "relabel", new_label="not_hot_dog", expected_version=1
        )
        # Alice holds the write lock; Bob's update has to wait for her commit.
        bob = threading.Thread(target=bob_relabels)
        bob.start()
        bob.join(timeout=0.5)
        assert bob.is_alive() and outcome == {}
        alice.commit()
    bob.join(timeout=20)

    assert outcome == {"bob": "not_hot_dog"}
    assert _state(first, photo_id) == ("not_hot_dog", RELABELLED, 2, 1)


def _open_database(url, go, results):
    results.put("ready")
    go.wait()
    try:
        create_db_engine(url).dispose()
        results.put("ok")
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")


def _stop(processes):
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()


def test_processes_opening_a_new_database_at_once_all_get_the_tables(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    context = multiprocessing.get_context("spawn")
    results, go = context.Queue(), context.Event()
    processes = [
        context.Process(target=_open_database, args=(url, go, results), daemon=True)
        for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    try:
        # Start them together, once each has imported, so that they race.
        for _ in processes:
            results.get(timeout=RESULT_TIMEOUT_S)
        go.set()
        outcomes = [results.get(timeout=RESULT_TIMEOUT_S) for _ in processes]
    except queue.Empty:
        pytest.fail(f"a process gave no result in {RESULT_TIMEOUT_S} s")
    finally:
        go.set()
        _stop(processes)

    assert outcomes == ["ok"] * PROCESSES
    engine = create_db_engine(url)
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Photo)) == 0
    engine.dispose()


def _relabel_worker(url, photo_ids, count, seed, results):
    """Relabel `count` times, each at the version read, retrying when stale."""
    engine = create_db_engine(url)
    rng = random.Random(seed)
    changes, stale, errors = Counter(), 0, []
    for _ in range(count):
        photo_id = rng.choice(photo_ids)
        while True:
            try:
                with session_scope(engine) as session:
                    photo = session.get(Photo, photo_id)
                    seen, label = photo.version, photo.label
                    time.sleep(rng.random() * 0.002)  # a reviewer looking
                    new_label = LABELS[1 - LABELS.index(label)]
                    apply_action(
                        session,
                        photo_id,
                        "relabel",
                        new_label=new_label,
                        expected_version=seen,
                        source=f"worker{seed}",
                    )
                changes[photo_id] += 1
                break
            except StaleLabelError:
                stale += 1
            except Exception as error:  # reported to the test, not swallowed
                errors.append(f"{type(error).__name__}: {error}")
                break
    engine.dispose()
    results.put(("relabel", dict(changes), stale, errors))


def _progress_worker(job_id, stop, results):
    """Report job progress every few ms, as a training worker does."""
    import pipeline.jobs

    pipeline.jobs.HEARTBEAT_SECONDS = 0.0
    report = pipeline.jobs._JobReporter(job_id)
    writes, errors, fraction = 0, [], 0.0
    while not stop.is_set():
        fraction = min(0.99, writes / 10_000)
        try:
            report(fraction, f"head: step {writes}")
            writes += 1
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}")
        time.sleep(0.003)
    results.put(("progress", writes, fraction, errors))


def test_many_writers_lose_no_update_and_never_see_a_lock_error(engine):
    url = os.environ["DATABASE_URL"]
    photo_ids = _add_photos(engine, SHARED_PHOTOS)
    with session_scope(engine) as session:
        job = Job(kind="train", state="running")
        session.add(job)
        session.flush()
        job_id = job.id

    context = multiprocessing.get_context("spawn")
    results, stop = context.Queue(), context.Event()
    progress = context.Process(
        target=_progress_worker, args=(job_id, stop, results), daemon=True
    )
    relabellers = [
        context.Process(
            target=_relabel_worker,
            args=(url, photo_ids, RELABELS_PER_PROCESS, seed, results),
            daemon=True,
        )
        for seed in range(PROCESSES)
    ]
    progress.start()
    for process in relabellers:
        process.start()
    try:
        reports = [results.get(timeout=RESULT_TIMEOUT_S) for _ in relabellers]
        stop.set()
        reports.append(results.get(timeout=RESULT_TIMEOUT_S))
    except queue.Empty:
        pytest.fail(f"a writer process gave no result in {RESULT_TIMEOUT_S} s")
    finally:
        stop.set()
        _stop([progress, *relabellers])

    relabel = [r for r in reports if r[0] == "relabel"]
    ((_, writes, last_fraction, progress_errors),) = [
        r for r in reports if r[0] == "progress"
    ]
    errors = [e for r in relabel for e in r[3]] + progress_errors
    assert errors == []
    changes = sum((Counter(r[1]) for r in relabel), Counter())
    assert sum(changes.values()) == PROCESSES * RELABELS_PER_PROCESS
    assert sum(r[2] for r in relabel) > 0, "no reviewer was ever stale: no contention"

    with session_scope(engine) as session:
        versions = dict(session.execute(select(Photo.id, Photo.version)).all())
        events = session.scalars(select(LabelEvent).order_by(LabelEvent.id)).all()
        job = session.get(Job, job_id)
    assert versions == {i: 1 + changes[i] for i in photo_ids}
    assert Counter(event.photo_id for event in events) == changes
    # Each change starts from the label the previous one left.
    for photo_id in photo_ids:
        chain = [e for e in events if e.photo_id == photo_id]
        assert all(a.new_label == b.old_label for a, b in pairwise(chain))
    assert writes > 20
    assert job.progress == pytest.approx(last_fraction)
    assert job.message == f"head: step {writes - 1}"


def _writable(database: str) -> bool:
    """Whether another connection could start writing right now."""
    connection = sqlite3.connect(database, timeout=0, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError as error:
        assert "locked" in str(error)
        return False
    finally:
        connection.close()


def test_training_leaves_the_database_writable_while_it_scores(
    engine, small_set, monkeypatch
):
    import numpy as np

    import pipeline.scoring
    from pipeline.ingest import ingest_folder
    from pipeline.train import TrainConfig, train_run

    with session_scope(engine) as session:
        ingest_folder(session, small_set)
    database = os.environ["DATABASE_URL"].removeprefix("sqlite:///")
    writable_while_embedding = []

    def embeddings(photos, *args, **kwargs):
        # Stands in for minutes of network passes over the whole pool.
        writable_while_embedding.append(_writable(database))
        return np.random.default_rng(0).normal(size=(len(photos), 8))

    monkeypatch.setattr(pipeline.scoring, "imagenet_embeddings", embeddings)
    monkeypatch.setattr(
        pipeline.scoring, "run_embeddings", lambda r, p, m: embeddings(p)
    )
    config = TrainConfig(
        image_size=64, frozen_epochs=1, unfrozen_epochs=1, folds=2, tta=False
    )
    with session_scope(engine) as session:
        run = train_run(session, config)
        assert run.status == DONE

    assert writable_while_embedding == [True, True]


class _LockedCursor:
    """A cursor whose switch to WAL finds the database locked `busy` times."""

    def __init__(self, busy: int, error: str = "database is locked"):
        self.busy, self.error, self.switches = busy, error, 0

    def execute(self, statement):
        if statement == "PRAGMA journal_mode=WAL":
            self.switches += 1
            if self.switches <= self.busy:
                raise sqlite3.OperationalError(self.error)
        self.mode = "wal" if self.switches > self.busy else "delete"
        return self

    def fetchone(self):
        return (self.mode,)


def test_switching_to_wal_waits_out_a_locked_database():
    cursor = _LockedCursor(busy=3)
    _use_wal(cursor, timeout_s=5)
    assert cursor.switches == 4


def test_switching_to_wal_gives_up_after_the_timeout_and_on_other_errors():
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _use_wal(_LockedCursor(busy=10**6), timeout_s=0.2)
    other = _LockedCursor(busy=1, error="disk I/O error")
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        _use_wal(other, timeout_s=5)
    assert other.switches == 1
