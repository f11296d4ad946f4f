"""Duplicates: the same picture twice, both copies side by side.

A pool photo that also sits in the holdout is a leak: the model trains on a
photo it is then tested on, which inflates holdout accuracy. Those pairs come
first. Two copies in the pool count twice in training. Each action here is
one audited label change (source "duplicates", undoable on the History
page): exclude a copy, or keep both by confirming the pool copies' labels.
Holdout photos are frozen and get no buttons.

An exact copy was skipped at import, so only one of the two files is in the
database: it neither trains twice nor leaks, and the pair is shown for
information only.

Comparing ImageNet embeddings embeds every photo the embedding cache lacks
(training caches pool photos, not holdout ones), which takes minutes on a
large set; it stays off until asked for. The pairs found are cached until a
photo is imported.
"""

import math

import streamlit as st

from dashboard.components import change_refused, photo_thumbnail, show_flash
from db.engine import get_engine, session_scope
from db.labels import StaleLabelError, apply_action
from db.models import EXCLUDED, HOLDOUT, POOL
from db.settings import get_settings
from pipeline.duplicates import (
    COPY_EXCLUDED,
    EXACT,
    FROZEN,
    KEPT,
    ONE_IMPORTED,
    UNDECIDED,
    DuplicatePair,
    PairCopy,
    PairReview,
    catalogue_state,
    find_duplicates,
    review_pairs,
)
from pipeline.review import apply_to_many

SOURCE = "duplicates"
PER_PAGE = 10

STATE_TEXT = {
    ONE_IMPORTED: "Only one copy was imported: the other file was skipped for "
    "identical bytes, so the picture trains once and does not leak into the "
    "holdout. Nothing to decide; delete the extra file to drop this entry.",
    FROZEN: "Both copies are in the frozen holdout, which is not changed here; "
    "remove one file from the test/ folder if it should not count twice.",
    COPY_EXCLUDED: "Decided: a copy is excluded and no longer trains.",
    KEPT: "Decided: both kept, the pool copies' labels confirmed.",
}


# `state` (photo and skipped-copy counts and newest ids) changes whenever the
# photo folder is imported again, which is what makes old pairs stale.
@st.cache_data(max_entries=8, show_spinner="Looking for duplicates…")
def duplicate_pairs(
    database_url: str, state: tuple[int, ...], use_embeddings: bool
) -> list[DuplicatePair]:
    with session_scope(get_engine(database_url)) as session:
        return find_duplicates(session, use_embeddings=use_embeddings)


def _flash(kind: str, text: str) -> None:
    st.session_state["duplicates_flash"] = (kind, text)


def act(photo_id: int, action: str, version: int) -> None:
    """Exclude or restore one copy, as of the version the page showed."""
    try:
        with session_scope() as session:
            event = apply_action(
                session, photo_id, action, expected_version=version, source=SOURCE
            )
    except StaleLabelError as error:
        _flash("warning", change_refused(error))
        return
    except (LookupError, ValueError) as error:
        _flash("error", str(error))
        return
    _flash("success", f"Photo #{photo_id} is {event.new_status} now.")


def keep_both(shown: tuple[tuple[int, int], ...]) -> None:
    """Confirm the labels of the pool copies no one has reviewed yet."""
    result = apply_to_many("confirm", shown, source=SOURCE)
    if result.stale or result.failed:
        _flash("warning", result.summary())
        return
    photos = " and ".join(f"#{photo_id}" for photo_id in result.done)
    _flash("success", f"Kept both: confirmed the label of {photos}.")


def _copy_buttons(review: PairReview, copy: PairCopy) -> None:
    pair = review.pair
    key = f"{pair.first_id}-{pair.second_id}-{copy.photo_id}"
    if copy.status == EXCLUDED:
        st.button(
            "Restore this copy",
            key=f"duplicates-restore-{key}",
            on_click=act,
            args=(copy.photo_id, "restore", copy.version),
            width="stretch",
        )
        return
    title = "Exclude the pool copy" if pair.cross_split else "Exclude this copy"
    st.button(
        title,
        key=f"duplicates-exclude-{key}",
        on_click=act,
        args=(copy.photo_id, "exclude", copy.version),
        type="primary" if pair.cross_split else "secondary",
        width="stretch",
    )


def _copy_panel(review: PairReview, copy: PairCopy) -> None:
    photo_thumbnail(copy.path, copy.sha256)
    label = copy.label or "no label yet"
    if copy.photo_id is None:
        st.markdown(f"**{copy.split}** folder · {label}")
        st.caption(f"{copy.path}  \nskipped at import: same bytes as the other file")
        return
    frozen = copy.split == HOLDOUT
    st.markdown(f"**{copy.split}** · {label} · {'frozen' if frozen else copy.status}")
    st.caption(
        f"{copy.path}  \n#{copy.photo_id} · {copy.width}×{copy.height} px · "
        f"version {copy.version}"
    )
    if not frozen and review.state != ONE_IMPORTED:
        _copy_buttons(review, copy)


def _pair_card(review: PairReview) -> None:
    pair = review.pair
    kind = "Exact copies" if pair.kind == EXACT else "Near copies"
    with st.container(border=True):
        st.markdown(f"**{kind}** · {pair.where} · {pair.evidence}")
        if review.state in STATE_TEXT:
            st.caption(STATE_TEXT[review.state])
        elif pair.cross_split:
            st.warning(
                "Undecided: the model trains on the pool copy and is tested on "
                "the holdout one, which inflates holdout accuracy."
            )
        else:
            st.caption("Undecided: the same picture counts twice in training.")
        columns = st.columns(2)
        for column, copy in zip(columns, review.copies, strict=True):
            with column:
                _copy_panel(review, copy)
        if review.state in (UNDECIDED, KEPT):
            shown = tuple((c.photo_id, c.version) for c in review.to_confirm)
            st.button(
                "Keep both",
                key=f"duplicates-keep-{pair.first_id}-{pair.second_id}",
                on_click=keep_both,
                args=(shown,),
                disabled=not shown,
                help="Confirms the label of each pool copy not reviewed yet; "
                "nothing is excluded.",
            )


def _find(state: tuple[int, ...], use_embeddings: bool) -> list[PairReview]:
    database_url = get_settings().database_url
    try:
        pairs = duplicate_pairs(database_url, state, use_embeddings)
    except (OSError, ValueError) as error:
        # Most likely a photo file gone or unreadable since import: of the two
        # ways to compare, only embedding opens the files.
        hint = (
            " Turn the embedding comparison off to see the pairs the difference "
            "hash finds."
            if use_embeddings
            else ""
        )
        st.error(f"Looking for duplicates failed: {error}.{hint}")
        st.stop()
    with session_scope() as session:
        return review_pairs(session, pairs)


def _paged(reviews: list[PairReview]) -> list[PairReview]:
    pages = max(1, math.ceil(len(reviews) / PER_PAGE))
    if st.session_state.get("duplicates_page", 1) > pages:
        st.session_state["duplicates_page"] = pages
    if pages == 1:
        return reviews
    page = st.number_input(
        f"Page (of {pages})", min_value=1, max_value=pages, key="duplicates_page"
    )
    return reviews[(page - 1) * PER_PAGE : page * PER_PAGE]


def duplicates_page() -> None:
    st.title("Duplicates")
    with session_scope() as session:
        state = catalogue_state(session)
    if not state[0]:
        st.info(
            "No photos yet: put class folders under DATA_DIR/train and reload the app."
        )
        st.stop()

    show_flash("duplicates_flash")
    bar = st.columns(2)
    use_embeddings = bar[0].toggle(
        "Also compare ImageNet embeddings",
        key="duplicates_embeddings",
        help="Finds near copies the difference hash misses (crops, colour "
        "edits). Embeds every photo not cached yet, holdout photos included: "
        "minutes on a large set the first time.",
    )
    undecided_only = bar[1].toggle("Only pairs to decide", key="duplicates_undecided")
    reviews = _find(state, use_embeddings)

    leaks = {
        copy.photo_id
        for review in reviews
        if review.pair.cross_split and review.state == UNDECIDED
        for copy in review.copies
        if copy.split == POOL
    }
    metrics = st.columns(3)
    metrics[0].metric("Duplicate pairs", len(reviews))
    metrics[1].metric("Pool and holdout", sum(r.pair.cross_split for r in reviews))
    metrics[2].metric("To decide", sum(r.state == UNDECIDED for r in reviews))
    if leaks:
        count = len(leaks)
        photos = "1 pool photo has" if count == 1 else f"{count} pool photos have"
        st.warning(
            f"{photos} a copy in the holdout. Exclude the pool copy so the "
            "holdout measures photos the model has not seen."
        )
    if undecided_only:
        reviews = [r for r in reviews if r.state == UNDECIDED]
    if not reviews:
        found = "to decide" if undecided_only else "found"
        st.info(f"No duplicate pairs {found}.")
        return

    st.caption(
        "Pairs across the pool and the holdout first, then exact copies, then by "
        "photo id."
    )
    for review in _paged(reviews):
        _pair_card(review)


duplicates_page()
