"""Review: pool photos the model finds most confusing first, one click each.

Every click is one `apply_action` on the version of the photo the page showed,
committed at once; if someone changed the photo in between, nothing is saved
and the page says what the label is now. A bulk action on the selected cards
is the same, photo by photo, and reports which photos were not saved.

The grid can show the latest run's Grad-CAM heat maps instead of the photos,
to see whether a prediction rests on the food or on the background.
"""

import math
import time
from pathlib import Path

import streamlit as st

from dashboard.components import (
    CLASS_KEYS,
    change_refused,
    event_summary,
    photo_navigation,
    show_flash,
    thumbnail_bytes,
    undo_last_button,
    undo_refused,
)
from db.engine import session_scope
from db.labels import StaleLabelError, apply_action, class_names, undo_event
from db.models import CONFIRMED, EXCLUDED, STATUSES, TrainingRun
from pipeline.heatmap import heatmap_overlay
from pipeline.images import BadImageError
from pipeline.review import (
    REASON_KINDS,
    ReviewFilters,
    ReviewItem,
    apply_to_many,
    queue_position,
    review_queue,
)
from pipeline.runs import latest_run
from pipeline.scoring import score_run

PER_PAGE = 24
COLUMNS = 4
ANY = "any"
SOURCE = "review"


# Keyed by the model file, which names the run unambiguously even across
# databases; `_run` itself is not hashed.
@st.cache_data(max_entries=1000, show_spinner="Working out where the model looked…")
def heatmap_bytes(
    artifact_path: str, path: str, sha256: str, _run: TrainingRun
) -> bytes:
    return heatmap_overlay(_run, path, sha256).read_bytes()


def _flash(kind: str, text: str) -> None:
    st.session_state["review_flash"] = (kind, text)


def _stale_warning(error: StaleLabelError) -> None:
    _flash("warning", change_refused(error, "; see it again below"))


def act(photo_id: int, action: str, version: int, new_label: str | None = None) -> None:
    """Apply one action to the version of the photo that was on screen."""
    try:
        with session_scope() as session:
            event = apply_action(
                session,
                photo_id,
                action,
                new_label=new_label,
                expected_version=version,
                source=SOURCE,
            )
    except StaleLabelError as error:
        _stale_warning(error)
        return
    except (LookupError, ValueError) as error:
        _flash("error", str(error))
        return
    _flash("success", event_summary(event))
    st.session_state["review_acted_on"] = photo_id
    _after_change()


def _selection_key(photo_id: int) -> str:
    return f"select-{photo_id}"


def _selected(shown: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    return [
        (photo_id, version)
        for photo_id, version in shown
        if st.session_state.get(_selection_key(photo_id))
    ]


def _select(photo_ids: tuple[int, ...], value: bool) -> None:
    for photo_id in photo_ids:
        st.session_state[_selection_key(photo_id)] = value


def act_on_selected(
    shown: tuple[tuple[int, int], ...], action: str, new_label: str | None = None
) -> None:
    """Apply one action to every selected card, each on the version it showed."""
    result = apply_to_many(action, _selected(shown), new_label=new_label, source=SOURCE)
    # Photos not saved stay selected, so the reviewer sees which they were.
    _select(tuple(result.done), False)
    if result.stale or result.failed:
        _flash("warning", result.summary())
    else:
        _flash("success", result.summary())
    if result.done:
        _after_change()


def rerank() -> None:
    """Refit the out-of-fold heads on the labels as they are now (about 1 s).

    The flash of the action that triggered it stays; the timing goes to a toast.
    """
    with session_scope() as session:
        run = latest_run(session)
        if run is None:
            return
        started = time.perf_counter()
        count = score_run(session, run, thorough=False)
    seconds = time.perf_counter() - started
    st.toast(f"Re-ranked {count} photos in {seconds:.1f} s")


def _after_change() -> None:
    if st.session_state.get("review_autorank"):
        rerank()


def undo_last(event_id: int | None, version: int | None) -> None:
    """Undo the review action the page showed as the newest, on the version shown.

    If another tab undid it or the photo changed since, nothing is saved.
    """
    if event_id is None:
        _flash("info", "Nothing to undo: every review action is already undone.")
        return
    try:
        with session_scope() as session:
            undo = undo_event(session, event_id, expected_version=version)
    except StaleLabelError as error:
        _flash("warning", undo_refused(event_id, error))
        return
    _flash("success", f"Undone. {event_summary(undo)}")
    st.session_state["review_show_photo"] = undo.photo_id
    _after_change()


def _back_to_start() -> None:
    st.session_state["review_page"] = 1
    st.session_state["review_focus_index"] = 0


def _turn_page(step: int) -> None:
    st.session_state["review_page"] = max(
        1, st.session_state.get("review_page", 1) + step
    )


def _move_focus(step: int) -> None:
    index = st.session_state.get("review_focus_index", 0)
    st.session_state["review_focus_index"] = max(0, index + step)


def _switch_mode() -> None:
    # Keep the reviewer's place when moving between the grid and one photo.
    if st.session_state.get("review_focus"):
        page = st.session_state.get("review_page", 1)
        st.session_state["review_focus_index"] = (page - 1) * PER_PAGE
    else:
        index = st.session_state.get("review_focus_index", 0)
        st.session_state["review_page"] = index // PER_PAGE + 1


def _filter_bar(classes: list[str]) -> ReviewFilters:
    columns = st.columns(4)
    choices = {
        "label": ("Given label", classes),
        "predicted": ("Predicted label", classes),
        "status": ("Status", list(STATUSES)),
        "reason_kind": ("Model's verdict", list(REASON_KINDS)),
    }
    values = {}
    for column, (name, (title, options)) in zip(columns, choices.items(), strict=True):
        value = column.selectbox(
            title,
            [ANY, *options],
            key=f"review_filter_{name}",
            on_change=_back_to_start,
        )
        values[name] = None if value == ANY else value
    return ReviewFilters(**values)


def _show_photo(
    item: ReviewItem, width: int | str, heatmap_run: TrainingRun | None = None
) -> None:
    try:
        if heatmap_run is None:
            picture = thumbnail_bytes(item.path, item.sha256)
        else:
            picture = heatmap_bytes(
                heatmap_run.artifact_path, item.path, item.sha256, heatmap_run
            )
        st.image(picture, width=width)
    except (BadImageError, OSError) as error:
        st.warning(f"Cannot show {item.path}: {error}")


def _describe_item(item: ReviewItem) -> None:
    given = f"given **{item.label}**"
    if item.label != item.original_label:
        given += f" (folder: {item.original_label})"
    if item.predicted_label is None:
        predicted = "predicted –"
    else:
        predicted = f"predicted **{item.predicted_label}** at {item.confidence:.2f}"
    st.markdown(f"{given}  \n{predicted}")
    reason = item.reason
    if item.scored_label is not None and item.scored_label != item.label:
        reason += f" (scored while labelled {item.scored_label})"
    st.caption(reason)
    st.caption(f"#{item.photo_id} · {item.status} · version {item.version}")


def _action_buttons(item: ReviewItem, classes: list[str], keyboard: bool) -> None:
    """Confirm, one Relabel per other class, and Exclude or Restore."""
    prefix = "focus-" if keyboard else ""
    keys = dict(zip(classes, CLASS_KEYS, strict=False)) if keyboard else {}
    st.button(
        f"Confirm {item.label}",
        key=f"{prefix}confirm-{item.photo_id}",
        on_click=act,
        args=(item.photo_id, "confirm", item.version),
        disabled=item.status == CONFIRMED,
        type="primary" if keyboard else "secondary",
        width="stretch",
        shortcut=keys.get(item.label),
    )
    for name in classes:
        if name == item.label:
            continue
        st.button(
            f"Relabel as {name}",
            key=f"{prefix}relabel-{item.photo_id}-{name}",
            on_click=act,
            args=(item.photo_id, "relabel", item.version, name),
            width="stretch",
            shortcut=keys.get(name),
        )
    if item.status == EXCLUDED:
        action, title = "restore", "Restore"
    else:
        action, title = "exclude", "Exclude"
    st.button(
        title,
        key=f"{prefix}{action}-{item.photo_id}",
        on_click=act,
        args=(item.photo_id, action, item.version),
        width="stretch",
        shortcut="x" if keyboard else None,
    )


def _bulk_bar(items: list[ReviewItem], classes: list[str]) -> None:
    """Select cards on this page and apply one action to all of them."""
    shown = tuple((item.photo_id, item.version) for item in items)
    ids = tuple(item.photo_id for item in items)
    count = len(_selected(shown))
    bar = st.columns([1, 1, 1, 2, 2, 2, 2], vertical_alignment="center")
    bar[0].caption(f"{count} selected")
    bar[1].button(
        "Select all", key="review_select_all", on_click=_select, args=(ids, True)
    )
    bar[2].button(
        "Clear",
        key="review_select_none",
        on_click=_select,
        args=(ids, False),
        disabled=count == 0,
    )
    bar[3].button(
        "Confirm selected",
        key="review_bulk_confirm",
        on_click=act_on_selected,
        args=(shown, "confirm"),
        disabled=count == 0,
        width="stretch",
    )
    target = bar[4].selectbox(
        "Relabel selected to",
        classes,
        key="review_bulk_label",
        label_visibility="collapsed",
    )
    bar[5].button(
        f"Relabel selected to {target}",
        key="review_bulk_relabel",
        on_click=act_on_selected,
        args=(shown, "relabel", target),
        disabled=count == 0,
        width="stretch",
    )
    bar[6].button(
        "Exclude selected",
        key="review_bulk_exclude",
        on_click=act_on_selected,
        args=(shown, "exclude"),
        disabled=count == 0,
        width="stretch",
    )


def _grid_view(
    filters: ReviewFilters,
    classes: list[str],
    show: int | None,
    heatmap_run: TrainingRun | None,
) -> None:
    page = st.session_state.get("review_page", 1)
    with session_scope() as session:
        position = None if show is None else queue_position(session, show, filters)
        if position is not None:
            page = position // PER_PAGE + 1
        queue = review_queue(session, filters, (page - 1) * PER_PAGE, PER_PAGE)
        pages = max(1, math.ceil(queue.total / PER_PAGE))
        if page > pages:
            page = pages
            queue = review_queue(session, filters, (page - 1) * PER_PAGE, PER_PAGE)
    st.session_state["review_page"] = page
    if not queue.items:
        st.info("No pool photos match these filters.")
        return

    first = (page - 1) * PER_PAGE + 1
    nav = st.columns([1, 1, 2, 4])
    nav[0].button(
        "← Previous",
        key="review_prev_page",
        on_click=_turn_page,
        args=(-1,),
        disabled=page <= 1,
        shortcut="k",
    )
    nav[1].button(
        "Next →",
        key="review_next_page",
        on_click=_turn_page,
        args=(1,),
        disabled=page >= pages,
        shortcut="j",
    )
    nav[2].number_input("Page", min_value=1, max_value=pages, key="review_page")
    last = first + len(queue.items) - 1
    nav[3].caption(f"Photos {first}–{last} of {queue.total} · page {page} of {pages}")
    _bulk_bar(queue.items, classes)

    for start in range(0, len(queue.items), COLUMNS):
        columns = st.columns(COLUMNS)
        row = queue.items[start : start + COLUMNS]
        for column, item in zip(columns, row, strict=False):
            with column.container(border=True):
                st.checkbox("Select", key=_selection_key(item.photo_id))
                _show_photo(item, "stretch", heatmap_run)
                _describe_item(item)
                _action_buttons(item, classes, keyboard=False)


def _focus_view(
    filters: ReviewFilters,
    classes: list[str],
    acted_on: int | None,
    show: int | None,
    heatmap_run: TrainingRun | None,
) -> None:
    index = st.session_state.get("review_focus_index", 0)
    with session_scope() as session:
        position = None if show is None else queue_position(session, show, filters)
        if position is not None:
            index, acted_on = position, None
        queue = review_queue(session, filters, index, 1)
        # Move on after a decision, unless the photo already left the list
        # (a status filter): then the next one has slid into its place.
        stayed = queue.items and queue.items[0].photo_id == acted_on
        if stayed and index + 1 < queue.total:
            index += 1
            queue = review_queue(session, filters, index, 1)
        if not queue.items and queue.total:
            index = queue.total - 1
            queue = review_queue(session, filters, index, 1)
    st.session_state["review_focus_index"] = index
    if not queue.items:
        st.info("No pool photos match these filters.")
        return

    item = queue.items[0]
    left, right = st.columns([3, 2])
    with left:
        _show_photo(item, 480, heatmap_run)
    with right:
        st.caption(f"Photo {index + 1} of {queue.total}")
        _describe_item(item)
        _action_buttons(item, classes, keyboard=True)
        photo_navigation(
            ("review_prev_photo", "review_next_photo"),
            _move_focus,
            index,
            queue.total,
            "Next →",
            classes,
            "x exclude/restore · u undo · j next · k previous",
        )


def _heatmap_run(run: TrainingRun | None) -> TrainingRun | None:
    """The run whose heat maps to show, or None (with a note why) for photos."""
    if run is None:
        st.info("Heat maps need a trained model: train one on the Train page.")
        return None
    if not run.artifact_path or not Path(run.artifact_path).is_file():
        st.warning(
            f"Run #{run.id}'s model file is missing ({run.artifact_path}), so there "
            "are no heat maps; train again to get them."
        )
        return None
    return run


def review_page() -> None:
    st.title("Review")
    with session_scope() as session:
        classes = class_names(session)
    if not classes:
        st.info(
            "No photos yet: put class folders under DATA_DIR/train and reload the app."
        )
        st.stop()

    show_flash("review_flash", success_as_toast=True)
    acted_on = st.session_state.pop("review_acted_on", None)
    # A photo to bring into view: the one an undo just put back.
    show = st.session_state.pop("review_show_photo", None)
    filters = _filter_bar(classes)
    bar = st.columns([2, 2, 2, 4])
    focus = bar[0].toggle(
        "One photo at a time", key="review_focus", on_change=_switch_mode
    )
    heatmaps = bar[0].toggle(
        "Show where the model looked",
        key="review_heatmap",
        help="Grad-CAM of the latest run: warm colours mark the parts of the "
        "photo that pushed it towards its predicted class. Dimmed margins were "
        "cropped off before the model saw the photo.",
    )
    undo_last_button(bar[1], "review_undo", SOURCE, undo_last)
    bar[2].button("Re-rank now", key="review_rerank", on_click=rerank)
    bar[2].toggle(
        "Re-rank after each change",
        key="review_autorank",
        help="Refits the out-of-fold heads on cached embeddings: about a second.",
    )
    with session_scope() as session:
        run = latest_run(session)
    if run is None:
        bar[3].caption(
            "No finished training run yet, so photos are in import order. "
            "Train one on the Train page to rank them by how confused the model is."
        )
    else:
        bar[3].caption(
            f"Ranked by run #{run.id}'s out-of-fold scores, most confused first."
        )

    heatmap_run = _heatmap_run(run) if heatmaps else None
    if focus:
        _focus_view(filters, classes, acted_on, show, heatmap_run)
    else:
        _grid_view(filters, classes, show, heatmap_run)


review_page()
