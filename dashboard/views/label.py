"""Label: new photos in, the model's suggestion beside each, one key per class.

Photos without a label (uploaded here, or put under DATA_DIR/unlabelled/) wait
in a queue that starts with those the latest run is least sure about, where a
person's answer helps the next run most. Choosing a class moves the photo into
the pool; it trains with the next run.
"""

import streamlit as st

from dashboard.components import (
    CLASS_KEYS,
    change_refused,
    photo_navigation,
    show_flash,
    thumbnail_bytes,
    undo_last_button,
    undo_refused,
)
from db.engine import session_scope
from db.labels import (
    ACCEPT_SOURCE,
    StaleLabelError,
    apply_action,
    class_names,
    undo_event,
)
from pipeline.images import BadImageError
from pipeline.runs import latest_run
from pipeline.unlabelled import (
    ADDED,
    KNOWN,
    LabelItem,
    UploadResult,
    accept,
    add_uploads,
    label_queue,
    prelabel,
    unsuggested_count,
)

SOURCE = ACCEPT_SOURCE
# The same keys as the Review page, so a hand learns one layout.
UP_NEXT = 6


def _flash(kind: str, text: str) -> None:
    st.session_state["label_flash"] = (kind, text)


def _stale_warning(error: StaleLabelError) -> None:
    _flash("warning", change_refused(error))


def give_label(photo_id: int, version: int, label: str) -> None:
    """Accept or correct the suggestion for the version that was on screen."""
    try:
        with session_scope() as session:
            accept(session, photo_id, label, expected_version=version)
    except StaleLabelError as error:
        _stale_warning(error)
        return
    except (LookupError, ValueError) as error:
        _flash("error", str(error))
        return
    _flash("success", f"Photo #{photo_id}: {label}, now in the pool")


def leave_out(photo_id: int, version: int) -> None:
    try:
        with session_scope() as session:
            apply_action(
                session, photo_id, "exclude", expected_version=version, source=SOURCE
            )
    except StaleLabelError as error:
        _stale_warning(error)
        return
    except (LookupError, ValueError) as error:
        _flash("error", str(error))
        return
    _flash("success", f"Photo #{photo_id} left out")


def undo_last(event_id: int | None, version: int | None) -> None:
    """Undo the label the page showed as the newest, on the version shown.

    If another tab undid it or the photo changed since, nothing is saved.
    """
    if event_id is None:
        _flash("info", "Nothing to undo: no label given here is left to undo.")
        return
    try:
        with session_scope() as session:
            event = undo_event(session, event_id, expected_version=version)
    except StaleLabelError as error:
        _flash("warning", undo_refused(event_id, error))
        return
    st.session_state["label_index"] = 0
    _flash("success", f"Undone: photo #{event.photo_id} waits for a label again")


def _move(step: int) -> None:
    st.session_state["label_index"] = max(
        0, st.session_state.get("label_index", 0) + step
    )


def suggest_labels() -> int | None:
    """Suggest labels with the latest run for photos that have none from it."""
    # TODO: run this as a background job (pipeline.jobs) like training: it
    # holds the page while every photo goes through the model, which is fine
    # for a few uploads but not for a large DATA_DIR/unlabelled/ folder.
    try:
        with st.spinner("Suggesting labels with the latest run…"):
            with session_scope() as session:
                return prelabel(session)
    except (LookupError, FileNotFoundError) as error:
        st.error(f"No suggestions: {error}")
        return None


def _report_uploads(results: list[UploadResult]) -> None:
    added = [r for r in results if r.outcome == ADDED]
    if added:
        st.success(f"Added {len(added)} of {len(results)} photos.")
    for result in results:
        if result.outcome == KNOWN:
            st.info(f"{result.name}: {result.reason}.")
        elif result.outcome != ADDED:
            st.error(f"{result.name} was not added: {result.reason}.")


def upload_form(has_run: bool) -> None:
    with st.form("label_upload", clear_on_submit=True):
        files = st.file_uploader(
            "New photos", accept_multiple_files=True, key="label_files"
        )
        submitted = st.form_submit_button("Add photos")
    if not submitted or not files:
        return
    with session_scope() as session:
        results = add_uploads(session, [(f.name, f.getvalue()) for f in files])
    _report_uploads(results)
    if has_run and any(r.outcome == ADDED for r in results):
        suggest_labels()


def _show_photo(item: LabelItem, width: int | str) -> None:
    try:
        st.image(thumbnail_bytes(item.path, item.sha256), width=width)
    except (BadImageError, OSError) as error:
        st.warning(f"Cannot show {item.path}: {error}")


def _describe(item: LabelItem) -> None:
    if item.suggested is None:
        st.markdown("No suggestion yet")
        return
    st.markdown(f"Suggested **{item.suggested}** at {item.confidence:.2f}")
    st.caption(" · ".join(f"{name} {p:.2f}" for name, p in item.probabilities))


def _label_buttons(item: LabelItem, classes: list[str]) -> None:
    """One button per class, the suggested one first in colour."""
    keys = dict(zip(classes, CLASS_KEYS, strict=False))
    for name in classes:
        accepting = name == item.suggested
        st.button(
            f"Accept {name}" if accepting else f"Label {name}",
            key=f"label-{item.photo_id}-{name}",
            on_click=give_label,
            args=(item.photo_id, item.version, name),
            type="primary" if accepting else "secondary",
            width="stretch",
            shortcut=keys.get(name),
        )
    st.button(
        "Leave out (not usable)",
        key=f"label-exclude-{item.photo_id}",
        on_click=leave_out,
        args=(item.photo_id, item.version),
        width="stretch",
        shortcut="x",
    )


def queue_view(classes: list[str]) -> None:
    index = st.session_state.get("label_index", 0)
    with session_scope() as session:
        queue = label_queue(session, index, 1 + UP_NEXT)
        if not queue.items and queue.total:
            index = queue.total - 1
            queue = label_queue(session, index, 1 + UP_NEXT)
    st.session_state["label_index"] = index
    if not queue.items:
        st.info(
            "Nothing to label: upload photos above, or put files under "
            "DATA_DIR/unlabelled/ and re-scan on the Overview page."
        )
        return

    item = queue.items[0]
    left, right = st.columns([3, 2])
    with left:
        _show_photo(item, 480)
    with right:
        st.caption(f"Photo {index + 1} of {queue.total} · #{item.photo_id}")
        _describe(item)
        _label_buttons(item, classes)
        photo_navigation(
            ("label_prev", "label_next"),
            _move,
            index,
            queue.total,
            "Skip →",
            classes,
            "x leave out · u undo · j skip · k previous",
        )

    upcoming = queue.items[1:]
    if upcoming:
        st.subheader("Up next")
        for column, next_item in zip(st.columns(UP_NEXT), upcoming, strict=False):
            with column:
                _show_photo(next_item, "stretch")
                if next_item.suggested is None:
                    st.caption("no suggestion")
                else:
                    st.caption(f"{next_item.suggested} {next_item.confidence:.2f}")


def label_page() -> None:
    st.title("Label")
    show_flash("label_flash", success_as_toast=True)
    with session_scope() as session:
        classes = class_names(session)
        run = latest_run(session)
    if not classes:
        st.info(
            "No classes yet: put class folders under DATA_DIR/train and reload the "
            "app. New photos are labelled with those classes."
        )
        st.stop()

    upload_form(run is not None)
    bar = st.columns([2, 3, 5])
    undo_last_button(bar[0], "label_undo", SOURCE, undo_last)
    if run is None:
        bar[2].caption(
            "No finished training run yet, so there are no suggestions and photos "
            "come in upload order. Train one on the Train page."
        )
    else:
        with session_scope() as session:
            waiting = unsuggested_count(session, run.id)
        if waiting and bar[1].button(
            f"Suggest labels for {waiting} photos", key="label_suggest"
        ):
            suggest_labels()
        bar[2].caption(
            f"Suggestions from run #{run.id}, least sure first: those teach the "
            "next run the most."
        )
    queue_view(classes)


label_page()
