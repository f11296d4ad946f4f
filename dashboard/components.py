"""Pieces several pages share: job progress, a run's holdout results, thumbnails,
undo buttons."""

import altair as alt
import pandas as pd
import streamlit as st

from db.engine import session_scope
from db.labels import AlreadyUndoneError, StaleLabelError, last_event
from db.models import CANCELLED, DONE, Job, LabelEvent, TrainingRun
from db.settings import get_settings
from pipeline.images import BadImageError
from pipeline.jobs import reap_dead_jobs, request_cancel
from pipeline.review import estimate_seconds_left, is_active, latest_job, thumbnail

REFRESH_SECONDS = 2.0


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def run_label(run: TrainingRun) -> str:
    """How a run is named in choices: its id, when, and its holdout accuracy."""
    accuracy = format_percent(run.metrics.get("accuracy_holdout"))
    return f"run #{run.id} · {run.created_at:%Y-%m-%d %H:%M} · {accuracy}"


def confusion_frame(run: TrainingRun) -> pd.DataFrame:
    """Rows are the holdout's given labels, columns what the model predicted."""
    classes = list(run.classes)
    return pd.DataFrame(
        run.metrics.get("confusion") or [[0] * len(classes)] * len(classes),
        index=[f"given {name}" for name in classes],
        columns=[f"predicted {name}" for name in classes],
    )


def accuracy_chart(finished: list[TrainingRun]) -> None:
    """Holdout accuracy of each finished run, in run order."""
    points = [
        {
            "run": run.id,
            "holdout accuracy (%)": round(100 * run.metrics["accuracy_holdout"], 2),
        }
        for run in sorted(finished, key=lambda run: run.id)
        if run.metrics.get("accuracy_holdout") is not None
    ]
    if not points:
        return
    st.markdown("**Holdout accuracy across runs**")
    # Runs as ordered categories (whole-number ticks), each one a visible
    # point, so that a single run shows too.
    chart = (
        alt.Chart(pd.DataFrame(points))
        .mark_line(point=alt.OverlayMarkDef(size=80))
        .encode(
            x=alt.X("run:O", title="run", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("holdout accuracy (%):Q", scale=alt.Scale(zero=False)),
            tooltip=["run", "holdout accuracy (%)"],
        )
    )
    st.altair_chart(chart, width="stretch")


def newest_first_choice(label: str, items: list, format_func, key: str):
    """A selectbox over `items` (rows with an `id`, newest first); the chosen row.

    Keyed by the newest row's id, so a row that just appeared becomes the choice.
    """
    by_id = {item.id: item for item in items}
    chosen = st.selectbox(
        label,
        list(by_id),
        format_func=lambda i: format_func(by_id[i]),
        key=f"{key}_{items[0].id}",
    )
    return by_id[chosen]


def export_module(unavailable: str):
    """`pipeline.export`, or a note that `unavailable` is missing and a stop.

    Imported on demand so the other pages work where the export toolchain is
    absent.
    """
    try:
        import pipeline.export as exporting
    except ImportError as error:
        st.info(f"{unavailable} is not available in this installation: {error}.")
        st.stop()
    return exporting


@st.cache_data(max_entries=1000, show_spinner=False)
def thumbnail_bytes(path: str, sha256: str) -> bytes:
    return thumbnail(path, sha256).read_bytes()


def photo_thumbnail(path: str, sha256: str, width: int | str = "stretch") -> None:
    """The photo's thumbnail, or a warning naming the file that cannot be shown."""
    try:
        st.image(thumbnail_bytes(path, sha256), width=width)
    except (BadImageError, OSError) as error:
        st.warning(f"Cannot show {path}: {error}")


def show_flash(key: str, success_as_toast: bool = False) -> None:
    """Show once the (kind, text) a button's callback left in session state.

    `kind` names the Streamlit call: success, info, warning or error. Pages
    worked through one photo after another show success as a toast, which
    does not push the next photo down.
    """
    kind, text = st.session_state.pop(key, (None, None))
    if kind == "success" and success_as_toast:
        st.toast(text)
    elif kind in ("success", "info", "warning", "error"):
        getattr(st, kind)(text)


def event_summary(event: LabelEvent) -> str:
    """One label event as a reviewer reads it: photo, label change, new status."""
    old, new = event.old_label or "unlabelled", event.new_label or "unlabelled"
    change = new if old == new else f"{old} → {new}"
    return f"Photo #{event.photo_id}: {change} ({event.new_status})"


def undo_last_button(container, key: str, source: str, on_click) -> None:
    """An "Undo last" button (key u) bound to the newest event from `source` now.

    The click calls `on_click(event_id, photo_version)` for the event this run
    of the page saw, or `(None, None)` if there was none: a tab drawn before
    another tab's undo must not reach past it to an older event it never showed.
    """
    with session_scope() as session:
        event = last_event(session, source=source)
        if event is None:
            args, tip = (None, None), "Nothing to undo."
        else:
            args = (event.id, event.photo.version)
            tip = f"Undo event #{event.id}. {event_summary(event)}"
    container.button(
        "Undo last", key=key, on_click=on_click, args=args, help=tip, shortcut="u"
    )


def change_refused(error: StaleLabelError, then: str = "") -> str:
    """Why a change to a photo saved nothing: another one came first."""
    return (
        f"Photo #{error.photo_id} was changed since this page showed it: it is now "
        f"**{error.label or 'unlabelled'}** ({error.status}). Nothing was saved"
        f"{then}."
    )


def undo_refused(event_id: int, error: StaleLabelError) -> str:
    """Why undoing event `event_id` saved nothing, and what the photo is now."""
    now = f"is now **{error.label or 'unlabelled'}** ({error.status})"
    if isinstance(error, AlreadyUndoneError):
        return (
            f"Cannot undo event #{event_id}: event #{error.undo_id} already undid "
            f"it, and photo #{error.photo_id} {now}. Nothing was saved."
        )
    return (
        f"Cannot undo event #{event_id}: photo #{error.photo_id} changed after this "
        f"page showed it and {now}. Nothing was saved; undo the later change first."
    )


def _cancel(job_id: int) -> None:
    with session_scope() as session:
        request_cancel(session, job_id)


@st.fragment(run_every=REFRESH_SECONDS)
def _live_job(job_id: int, noun: str) -> None:
    # Reruns on its own every few seconds, so the rest of the page stays usable
    # while the worker reports progress through the job row.
    with session_scope() as session:
        reap_dead_jobs(session)
        job = session.get(Job, job_id)
    if job is None or not is_active(job):
        st.rerun()  # the whole page: show the outcome and what the job produced

    st.progress(job.progress, text=f"{noun} job #{job.id}: {job.message or job.state}")
    left = estimate_seconds_left(job)
    pace = (
        "estimating time left…"
        if left is None
        else f"about {format_seconds(left)} left"
    )
    columns = st.columns([3, 1])
    if job.cancel_requested:
        columns[0].caption("Cancelling: the worker stops at its next progress report.")
    else:
        columns[0].caption(f"{100 * job.progress:.0f} % · {pace}")
    columns[1].button(
        "Cancel",
        key=f"cancel-job-{job.id}",
        on_click=_cancel,
        args=(job.id,),
        disabled=job.cancel_requested,
    )


def job_panel(kind: str, noun: str) -> Job | None:
    """Show the newest `kind` job: live progress while it runs, else how it ended.

    Returns the job (None if there never was one) as read from the job table,
    so a browser refresh shows the same thing.
    """
    with session_scope() as session:
        job = latest_job(session, kind)
    if job is None:
        return None
    if is_active(job):
        _live_job(job.id, noun)
        return job

    ended = job.finished_at.strftime("%Y-%m-%d %H:%M") if job.finished_at else "?"
    text = f"Last {noun} job #{job.id} ({ended} UTC): {job.message or job.state}"
    if job.state == DONE:
        st.success(text)
    elif job.state == CANCELLED:
        st.warning(text)
    else:
        log = get_settings().artifact_dir / "jobs" / f"{job.id}.log"
        st.error(f"{text}. The worker's log is {log}.")
    return job


# Digits pick a class in one-photo views; "c" and "r" are reserved by Streamlit.
CLASS_KEYS = "123456789"


def photo_navigation(
    keys: tuple[str, str],
    on_move,
    index: int,
    total: int,
    next_label: str,
    classes: list[str],
    other_keys: str,
) -> None:
    """Previous/next buttons (keys k and j) and the keyboard legend of a
    one-photo view."""
    nav = st.columns(2)
    nav[0].button(
        "← Previous",
        key=keys[0],
        on_click=on_move,
        args=(-1,),
        disabled=index <= 0,
        shortcut="k",
        width="stretch",
    )
    nav[1].button(
        next_label,
        key=keys[1],
        on_click=on_move,
        args=(1,),
        disabled=index + 1 >= total,
        shortcut="j",
        width="stretch",
    )
    legend = ", ".join(f"{CLASS_KEYS[i]} {name}" for i, name in enumerate(classes[:9]))
    st.caption(f"Keys: {legend} · {other_keys}")
