"""Benchmark stage: how long the Review grid takes to draw on a warm page.

The page is run the way Streamlit reruns it on every click (AppTest runs the
entry point, which hands over to the Review page), on a fresh database of the
real photos with the first page's thumbnails already made. The first run of
the page warms the caches; the runs after it are timed.
"""

import statistics
import time
from pathlib import Path

from bench.stages import _fresh_database, peak_rss_mb

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
TIMED_RUNS = 5
# The first run imports the photo folder again (idempotent, but it reads it).
TIMEOUT = 600


def _grid_images(app) -> int:
    if app.exception:
        raise RuntimeError(f"the Review page failed: {app.exception[0].value}")
    return len(app.get("image"))


def stage_review(workdir: Path) -> dict:
    """Seconds to rerun the Review page showing a grid of 24 thumbnails."""
    from streamlit.testing.v1 import AppTest

    from db.engine import session_scope
    from pipeline.review import review_queue, thumbnail

    engine = _fresh_database(workdir, "review")
    with session_scope(engine) as session:
        first_page = review_queue(session, limit=24).items
    for item in first_page:
        thumbnail(item.path, item.sha256)

    app = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    started = time.perf_counter()
    app.switch_page("views/review.py").run()
    warm_up = time.perf_counter() - started
    shown = _grid_images(app)
    if shown != len(first_page) or shown != 24:
        raise RuntimeError(f"the Review grid showed {shown} photos, expected 24")

    seconds = []
    for _ in range(TIMED_RUNS):
        started = time.perf_counter()
        app.run()
        seconds.append(time.perf_counter() - started)
        if _grid_images(app) != shown:
            raise RuntimeError("the Review grid changed between runs")
    return {
        "review_grid_seconds": round(statistics.median(seconds), 3),
        "review_grid_seconds_range": [round(min(seconds), 3), round(max(seconds), 3)],
        "review_grid_first_run_seconds": round(warm_up, 3),
        "review_grid_timed_runs": TIMED_RUNS,
        "review_peak_rss_mb": round(peak_rss_mb(), 1),
    }
