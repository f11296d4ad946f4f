"""History: every label change, newest first, each one undoable.

An Undo applies to the photo as the page showed it: if the event was undone
since (in another tab, say) or the photo changed again, nothing is saved and
the page says what the photo is now.
"""

import math
from pathlib import Path

import streamlit as st

from dashboard.components import show_flash, undo_refused
from db.engine import session_scope
from db.labels import StaleLabelError, class_names, undo_event
from pipeline.review import HistoryRow, event_sources, label_history

PER_PAGE = 50
ANY = "any"


def undo(event_id: int, version: int) -> None:
    """Undo one event, on the version of its photo that was on screen."""
    try:
        with session_scope() as session:
            event = undo_event(session, event_id, expected_version=version)
    except StaleLabelError as error:
        st.session_state["history_flash"] = ("warning", undo_refused(event_id, error))
        return
    except LookupError as error:
        st.session_state["history_flash"] = ("error", str(error))
        return
    st.session_state["history_flash"] = (
        "success",
        f"Undid event #{event_id}: photo #{event.photo_id} is "
        f"{event.new_label or 'unlabelled'} ({event.new_status}) again.",
    )


def _back_to_start() -> None:
    st.session_state["history_page"] = 1


def _change(old: str, new: str) -> str:
    return new if old == new else f"{old} → {new}"


def _row(row: HistoryRow) -> None:
    columns = st.columns([2, 3, 2, 2, 1, 1])
    columns[0].write(row.created_at.strftime("%Y-%m-%d %H:%M:%S"))
    columns[1].write(f"#{row.photo_id} · {Path(row.path).name}")
    columns[2].write(_change(row.old_label, row.new_label))
    columns[3].write(_change(row.old_status, row.new_status))
    columns[4].write(row.source)
    if row.undone_by_id is not None:
        columns[5].caption(f"undone by #{row.undone_by_id}")
    elif row.undoes_id is not None:
        columns[5].caption(f"undoes #{row.undoes_id}")
    else:
        columns[5].button(
            "Undo",
            key=f"history-undo-{row.event_id}",
            on_click=undo,
            args=(row.event_id, row.photo_version),
        )


def history_page() -> None:
    st.title("History")
    show_flash("history_flash")
    with session_scope() as session:
        sources = event_sources(session)
        classes = class_names(session)
    columns = st.columns(2)
    source = columns[0].selectbox(
        "Source", [ANY, *sources], key="history_source", on_change=_back_to_start
    )
    label = columns[1].selectbox(
        "Label (before or after)",
        [ANY, *classes],
        key="history_label",
        on_change=_back_to_start,
    )

    page = st.session_state.get("history_page", 1)
    filters = {
        "source": None if source == ANY else source,
        "label": None if label == ANY else label,
    }
    with session_scope() as session:
        rows, total = label_history(
            session, **filters, offset=(page - 1) * PER_PAGE, limit=PER_PAGE
        )
        pages = max(1, math.ceil(total / PER_PAGE))
        if page > pages:
            page = pages
            rows, total = label_history(
                session, **filters, offset=(page - 1) * PER_PAGE, limit=PER_PAGE
            )
    if not rows:
        filtered = source != ANY or label != ANY
        st.info(
            "No label changes match these filters."
            if filtered
            else "No label changes yet."
        )
        st.stop()

    st.session_state["history_page"] = page
    nav = st.columns([1, 3])
    nav[0].number_input("Page", min_value=1, max_value=pages, key="history_page")
    nav[1].caption(f"{total} changes, newest first · page {page} of {pages}")
    header = st.columns([2, 3, 2, 2, 1, 1])
    for column, title in zip(
        header, ["When (UTC)", "Photo", "Label", "Status", "Source", ""], strict=True
    ):
        column.markdown(f"**{title}**")
    for row in rows:
        _row(row)


history_page()
