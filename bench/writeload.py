"""Write load: several processes relabelling in one SQLite file at once.

Each relabel is what a reviewer's click does: read the photo, then
`apply_action` at the version read, committed; a stale version is read again
and retried. The stage reports how long such a commit takes under load and
how many changes were lost: recorded as done yet leaving no version bump, or
made from a stale read (the audit row's old label is not the one the previous
change left).
"""

import itertools
import logging
import random
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PHOTOS = 200
PROCESSES = 4
RELABELS_PER_PROCESS = 500
LABELS = ("hot_dog", "not_hot_dog")
START_TIMEOUT_S = 120
RESULT_TIMEOUT_S = 600


def _create_database(database: Path) -> str:
    """A new database at `database` holding `PHOTOS` pool photos; its URL."""
    from bench.stages import remove_database
    from db.engine import create_db_engine, session_scope
    from db.models import POOL, Photo

    remove_database(database)
    url = f"sqlite:///{database}"
    engine = create_db_engine(url)
    with session_scope(engine) as session:
        session.add_all(
            Photo(
                sha256=f"{i:064x}",
                path=f"/writeload/{i}.jpg",
                width=224,
                height=224,
                split=POOL,
                original_label=LABELS[i % 2],
                label=LABELS[i % 2],
            )
            for i in range(PHOTOS)
        )
    engine.dispose()
    return url


def _relabel_worker(url: str, seed: int, count: int, go, results) -> None:
    """Relabel `count` random photos; put commit latencies and retries."""
    from sqlalchemy import select

    from db.engine import create_db_engine, session_scope
    from db.labels import StaleLabelError, apply_action
    from db.models import Photo

    try:
        engine = create_db_engine(url)
        with session_scope(engine) as session:
            photo_ids = list(session.scalars(select(Photo.id)))
        rng = random.Random(seed)
        results.put(("ready", seed))
        go.wait()

        latencies, stale = [], 0
        for _ in range(count):
            photo_id = rng.choice(photo_ids)
            while True:
                started = time.perf_counter()
                try:
                    with session_scope(engine) as session:
                        photo = session.get(Photo, photo_id)
                        apply_action(
                            session,
                            photo_id,
                            "relabel",
                            new_label=LABELS[1 - LABELS.index(photo.label)],
                            expected_version=photo.version,
                            source=f"writeload{seed}",
                        )
                except StaleLabelError:
                    stale += 1
                    continue
                latencies.append(time.perf_counter() - started)
                break
        engine.dispose()
        results.put(("done", latencies, stale))
    except Exception as error:
        results.put(("error", f"{type(error).__name__}: {error}"))


def _collect(results, count: int, kind: str, timeout: float) -> list[tuple]:
    collected = []
    for _ in range(count):
        message = results.get(timeout=timeout)
        if message[0] == "error":
            raise RuntimeError(f"a writeload process failed: {message[1]}")
        if message[0] != kind:
            raise RuntimeError(f"expected {kind!r} from a process, got {message!r}")
        collected.append(message)
    return collected


def stage_writeload(workdir: Path) -> dict:
    """`PROCESSES` x `RELABELS_PER_PROCESS` relabels at once on `PHOTOS` photos."""
    import multiprocessing

    from sqlalchemy import func, select

    from db.engine import create_db_engine, session_scope
    from db.models import LabelEvent, Photo

    url = _create_database(workdir / "writeload.db")

    # Start the writers and wait until each is connected, so startup is not timed.
    context = multiprocessing.get_context("spawn")
    results, go = context.Queue(), context.Event()
    processes = [
        context.Process(
            target=_relabel_worker,
            args=(url, seed, RELABELS_PER_PROCESS, go, results),
        )
        for seed in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    try:
        _collect(results, PROCESSES, "ready", START_TIMEOUT_S)
        started = time.perf_counter()
        go.set()
        done = _collect(results, PROCESSES, "done", RESULT_TIMEOUT_S)
        seconds = time.perf_counter() - started
    finally:
        go.set()
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()

    # Compare what the writers counted with what the database holds.
    latencies_ms = 1000 * np.array([t for _, times, _ in done for t in times])
    commits = len(latencies_ms)
    engine = create_db_engine(url)
    with session_scope(engine) as session:
        bumps = session.scalar(select(func.sum(Photo.version - 1)))
        events = session.execute(
            select(
                LabelEvent.photo_id, LabelEvent.old_label, LabelEvent.new_label
            ).order_by(LabelEvent.photo_id, LabelEvent.id)
        ).all()
    engine.dispose()
    stale_overwrites = sum(
        1
        for before, after in itertools.pairwise(events)
        if before.photo_id == after.photo_id and before.new_label != after.old_label
    )
    if len(events) != commits:
        logger.warning("%d relabels committed but %d audit rows", commits, len(events))
    return {
        "lost_updates": int(commits - bumps),
        "relabel_audit_rows_missing": commits - len(events),
        "relabel_stale_overwrites": stale_overwrites,
        "relabel_commits": commits,
        "relabel_stale_retries": sum(stale for _, _, stale in done),
        "relabel_commit_p50_ms": round(float(np.percentile(latencies_ms, 50)), 2),
        "relabel_commit_p95_ms": round(float(np.percentile(latencies_ms, 95)), 2),
        "relabel_commit_max_ms": round(float(latencies_ms.max()), 2),
        "writeload_seconds": round(seconds, 2),
    }
