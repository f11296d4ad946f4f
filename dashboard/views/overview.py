"""Overview: what the database holds, what was changed, and how the model does.

"How the model does" follows the holdout across runs: accuracy run by run,
the latest run's confusion matrix, and the holdout photos whose prediction
changed since the run before it.
"""

from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard.components import (
    accuracy_chart,
    confusion_frame,
    format_percent,
    photo_thumbnail,
    show_flash,
)
from db.engine import session_scope
from db.models import DONE, EXCLUDED, HOLDOUT, POOL, STATUSES
from db.settings import get_settings
from pipeline.export_data import export_dataset, new_dataset_dir
from pipeline.ingest import ingest_folder
from pipeline.review import list_runs, photo_counts, relabelled_count, skipped_files
from pipeline.runs import BROKEN, FIXED, OTHER, HoldoutFlips, holdout_flips, latest_run

# Thumbnails of flipped holdout photos shown at most, and per row.
MAX_FLIP_PHOTOS = 48
FLIP_COLUMNS = 6


def rescan() -> None:
    data_dir = get_settings().data_dir
    try:
        with session_scope() as session:
            report = ingest_folder(session, data_dir)
    except (FileNotFoundError, ValueError) as error:
        st.session_state["overview_flash"] = ("error", str(error))
        return
    st.session_state["overview_flash"] = (
        "success",
        report.summary().replace("\n", "  \n"),
    )


def export_data() -> None:
    """Write the cleaned set under ARTIFACT_DIR/datasets/<time>."""
    try:
        with session_scope() as session:
            summary = export_dataset(session, new_dataset_dir())
    except (ValueError, OSError) as error:
        st.session_state["overview_flash"] = ("error", f"Export failed: {error}")
        return
    text = (
        f"Wrote the cleaned set to {summary['out_dir']}: {summary['in_tree']} "
        f"photos in train/, test/ and unlabelled/, {summary['excluded']} excluded "
        "ones listed in the manifest only."
    )
    if summary["missing"]:
        text += f" {summary['missing']} files were gone and are left out of the tree."
    st.session_state["overview_flash"] = ("success", text)
    st.session_state["overview_manifest"] = summary["manifest"]


def counts_table(counts: list[dict], split: str) -> pd.DataFrame:
    """Photos of one split: a row per label, a column per status, and a total."""
    frame = pd.DataFrame([row for row in counts if row["split"] == split])
    if frame.empty:
        return frame
    table = frame.pivot_table(
        index="label", columns="status", values="photos", aggfunc="sum", fill_value=0
    )
    table = table.reindex(columns=[s for s in STATUSES if s in table.columns])
    table["total"] = table.sum(axis=1)
    return table


def _flips_table(changes: HoldoutFlips) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "photo": flip.photo_id,
                "file": Path(flip.path).name,
                "given label": flip.given_label,
                f"run #{changes.previous_id} predicted": flip.previous_label,
                f"run #{changes.run_id} predicted": flip.predicted_label,
                "change": flip.change,
            }
            for flip in changes.flips
        ]
    )


def _flip_photos(changes: HoldoutFlips) -> None:
    shown = changes.flips[:MAX_FLIP_PHOTOS]
    if len(changes.flips) > len(shown):
        st.caption(f"The first {len(shown)} of {len(changes.flips)} flipped photos.")
    for start in range(0, len(shown), FLIP_COLUMNS):
        columns = st.columns(FLIP_COLUMNS)
        row = shown[start : start + FLIP_COLUMNS]
        for column, flip in zip(columns, row, strict=False):
            with column:
                photo_thumbnail(flip.path, flip.sha256)
                st.caption(
                    f"#{flip.photo_id} · given {flip.given_label}  \n"
                    f"{flip.previous_label} → **{flip.predicted_label}** "
                    f"({flip.change})"
                )


def _changes_since_previous(changes: HoldoutFlips) -> None:
    st.markdown(f"**What changed on the holdout since run #{changes.previous_id}**")
    counts = st.columns(3)
    counts[0].metric(
        "Fixed", changes.count(FIXED), help="Now right, wrong in the previous run."
    )
    counts[1].metric(
        "Broken", changes.count(BROKEN), help="Now wrong, right in the previous run."
    )
    counts[2].metric(
        "Other flips",
        changes.count(OTHER),
        help="Wrong both times, but as a different class.",
    )
    st.caption(
        f"Of the {changes.compared} holdout photos both runs predicted, "
        f"{len(changes.flips)} changed their predicted label."
    )
    if not changes.flips:
        return
    st.dataframe(_flips_table(changes), hide_index=True, width="stretch")
    if st.toggle("Show the flipped photos", key="overview_flip_photos"):
        _flip_photos(changes)


def _model_section() -> None:
    st.subheader("How the model does on the holdout")
    with session_scope() as session:
        finished = [run for run in list_runs(session) if run.status == DONE]
        changes = None
        if len(finished) > 1:
            changes = holdout_flips(session, finished[0], finished[1])
    if not finished:
        st.info(
            "No finished training run yet: train one on the Train page to see "
            "its holdout accuracy, confusion matrix and what changed between runs."
        )
        return

    latest = finished[0]
    left, right = st.columns(2)
    with left:
        accuracy_chart(finished)
    with right:
        st.markdown(f"**Run #{latest.id}: confusion matrix on the holdout**")
        st.dataframe(confusion_frame(latest), width="stretch")
    if changes is None:
        st.info(
            f"Run #{latest.id} is the only finished run, so there is nothing to "
            "compare it with yet: what changed on the holdout shows after the next."
        )
    else:
        _changes_since_previous(changes)


def overview_page() -> None:
    st.title("Overview")
    show_flash("overview_flash")

    with session_scope() as session:
        counts = photo_counts(session)
        relabelled = relabelled_count(session)
        skipped = skipped_files(session)
        run = latest_run(session)
    if not counts:
        st.info(
            f"No photos in the database yet. Put class folders under "
            f"{get_settings().data_dir}/train (and test/) and press Re-scan."
        )
        st.button("Re-scan the photo folder", key="overview_rescan", on_click=rescan)
        st.stop()

    def total(split: str, status: str | None = None) -> int:
        return sum(
            row["photos"]
            for row in counts
            if row["split"] == split and status in (None, row["status"])
        )

    metrics = st.columns(5)
    metrics[0].metric("Pool photos", total(POOL))
    metrics[1].metric("Holdout photos", total(HOLDOUT))
    metrics[2].metric("Relabelled so far", relabelled)
    metrics[3].metric("Excluded", total(POOL, EXCLUDED))
    if run is None:
        metrics[4].metric("Latest run's holdout accuracy", "no run yet")
    else:
        accuracy = format_percent(run.metrics.get("accuracy_holdout"))
        metrics[4].metric(f"Run #{run.id} holdout accuracy", accuracy)

    left, right = st.columns(2)
    with left:
        st.subheader("Pool (for review and training)")
        st.dataframe(counts_table(counts, POOL), width="stretch")
    with right:
        st.subheader("Holdout (frozen test set)")
        holdout = counts_table(counts, HOLDOUT)
        if holdout.empty:
            st.info(
                "No holdout: add DATA_DIR/test/<class>/ folders to measure accuracy."
            )
        else:
            st.dataframe(holdout, width="stretch")

    _model_section()

    st.subheader(f"Skipped files ({len(skipped)})")
    if skipped:
        st.dataframe(
            pd.DataFrame([{"file": s.path, "reason": s.reason} for s in skipped]),
            hide_index=True,
            width="stretch",
        )
    else:
        st.caption("Every file under the photo folder was imported.")
    st.button("Re-scan the photo folder", key="overview_rescan", on_click=rescan)

    st.subheader("The cleaned set")
    st.button(
        "Export the cleaned set",
        key="overview_export_data",
        on_click=export_data,
        help="A manifest of every photo and a train/ test/ class-folder tree "
        "without the excluded ones, under ARTIFACT_DIR/datasets/.",
    )
    manifest = st.session_state.get("overview_manifest")
    if manifest and Path(manifest).is_file():
        st.download_button(
            "Download manifest.csv",
            data=Path(manifest).read_bytes(),
            file_name="manifest.csv",
            mime="text/csv",
            key="overview_manifest_download",
        )


overview_page()
