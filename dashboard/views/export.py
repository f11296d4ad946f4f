"""Export: write a finished run as a phone-ready model file, checked, to download."""

from functools import partial
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard.components import (
    export_module,
    format_percent,
    job_panel,
    newest_first_choice,
    run_label,
)
from db.engine import session_scope
from db.models import DONE, TrainingRun
from pipeline.jobs import start_job
from pipeline.review import is_active, list_runs

FORMATS = {"pte": "ExecuTorch (.pte)", "onnx": "ONNX (.onnx)"}


def _read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def _start(run_id: int, config) -> None:
    params = {"run_id": run_id, "format": config.format, "int8": config.int8}
    try:
        with session_scope() as session:
            start_job(session, "export", params)
    except ValueError as error:
        st.error(str(error))
        return
    # Rerun so the panel above shows the new job's progress.
    st.rerun()


def _export_form(exporting, finished: list[TrainingRun], running: bool) -> None:
    runs_by_id = {run.id: run for run in finished}
    columns = st.columns([3, 2, 1, 1])
    # Keyed by the newest run, so a run that just finished becomes the choice.
    run_id = columns[0].selectbox(
        "Run",
        list(runs_by_id),
        format_func=lambda i: run_label(runs_by_id[i]),
        key=f"export_run_{finished[0].id}",
    )
    fmt = columns[1].radio(
        "Format",
        list(FORMATS),
        format_func=FORMATS.get,
        horizontal=True,
        key="export_format",
    )
    int8 = columns[2].checkbox(
        "int8",
        key="export_int8",
        disabled=fmt != "pte",
        help="Post-training int8 quantization, about 4x smaller (.pte only).",
    )
    pressed = columns[3].button(
        "Export",
        type="primary",
        key="export_start",
        disabled=running,
        help="An export job is running." if running else None,
    )
    if not pressed:
        return
    try:
        config = exporting.ExportConfig(format=fmt, int8=bool(int8) and fmt == "pte")
    except ValueError as error:
        st.error(str(error))
        return
    _start(run_id, config)


def _checks_frame(exports) -> pd.DataFrame:
    rows = []
    for export in exports:
        checks = export.checks or {}
        size_mb = checks.get("size_mb", export.size_bytes / 1e6)
        rows.append(
            {
                "export": export.id,
                "run": export.run_id,
                "format": export.format,
                "file": Path(export.path).name,
                "size (MB)": round(size_mb, 2),
                "agreement": format_percent(checks.get("agreement")),
                "max prob diff": checks.get("max_prob_diff"),
                "holdout accuracy": format_percent(checks.get("accuracy_holdout")),
                "PyTorch, same input": format_percent(
                    checks.get("pytorch_accuracy_holdout")
                ),
                "median latency (ms)": checks.get("latency_ms_median"),
                "created (UTC)": export.created_at,
            }
        )
    return pd.DataFrame(rows)


def _downloads(export) -> None:
    columns = st.columns(2)
    model = Path(export.path)
    if model.is_file():
        columns[0].download_button(
            f"Download {model.name}",
            data=partial(_read_bytes, str(model)),
            file_name=model.name,
            mime="application/octet-stream",
            key=f"download-model-{export.id}",
            on_click="ignore",
        )
    else:
        columns[0].warning(f"The model file {model} is missing.")
    if export.sidecar_path and Path(export.sidecar_path).is_file():
        sidecar = Path(export.sidecar_path)
        columns[1].download_button(
            f"Download {sidecar.name}",
            data=partial(_read_bytes, str(sidecar)),
            file_name=sidecar.name,
            mime="application/json",
            key=f"download-sidecar-{export.id}",
            on_click="ignore",
        )
    else:
        columns[1].warning("This export has no sidecar JSON file.")


def export_page() -> None:
    st.title("Export")
    exporting = export_module("Exporting")

    job = job_panel("export", "export")
    with session_scope() as session:
        runs = list_runs(session)
        finished = [run for run in runs if run.status == DONE and run.artifact_path]
        exports = list(exporting.list_exports(session))
    if not finished:
        st.info("No finished training run to export yet: train one on the Train page.")
        st.stop()
    _export_form(exporting, finished, running=job is not None and is_active(job))

    st.subheader("Exports")
    if not exports:
        st.info("No exports yet: pick a run and press Export.")
        st.stop()
    st.dataframe(_checks_frame(exports), hide_index=True, width="stretch")
    st.caption(
        "Each file answers one view of a photo, as a phone would, and is compared "
        "with PyTorch on that same view. A run's own holdout accuracy on the Train "
        "page may differ when it averaged each photo over its mirror image and "
        "random crops (test-time augmentation)."
    )
    export = newest_first_choice(
        "Export",
        exports,
        lambda export: f"export #{export.id}: {Path(export.path).name}",
        key="export_selected",
    )
    _downloads(export)
    st.page_link(
        "views/try_it.py",
        label="Try an export on a photo",
        icon=":material/photo_camera:",
    )


export_page()
