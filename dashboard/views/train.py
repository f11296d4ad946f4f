"""Train: fine-tune on the current labels in the background, and compare runs."""

from dataclasses import asdict
from functools import partial

import pandas as pd
import streamlit as st

from dashboard.components import (
    accuracy_chart,
    confusion_frame,
    format_percent,
    format_seconds,
    job_panel,
    run_label,
)
from db.engine import session_scope
from db.models import DONE, TrainingRun
from pipeline.jobs import start_job
from pipeline.report import cleaning_report
from pipeline.review import is_active, list_runs
from pipeline.runs import get_run
from pipeline.train import TrainConfig


def _settings_form(running: bool) -> TrainConfig | None:
    """The form; returns the settings when the user pressed Train."""
    defaults = TrainConfig()
    with st.form("train_settings"):
        st.subheader("Settings")
        first = st.columns(4)
        frozen = first[0].number_input(
            "Head-only epochs",
            key="train_frozen_epochs",
            min_value=0,
            max_value=50,
            value=defaults.frozen_epochs,
            help="Epochs with the pretrained body frozen.",
        )
        unfrozen = first[1].number_input(
            "Whole-network epochs",
            key="train_unfrozen_epochs",
            min_value=0,
            max_value=50,
            value=defaults.unfrozen_epochs,
        )
        image_size = first[2].number_input(
            "Image size (px)",
            key="train_image_size",
            min_value=64,
            max_value=512,
            step=32,
            value=defaults.image_size,
        )
        batch_size = first[3].number_input(
            "Batch size",
            key="train_batch_size",
            min_value=2,
            max_value=256,
            value=defaults.batch_size,
        )
        second = st.columns(4)
        head_lr = second[0].number_input(
            "Head learning rate",
            key="train_head_lr",
            min_value=1e-6,
            max_value=1.0,
            value=defaults.head_lr,
            format="%.1e",
            step=1e-4,
        )
        body_lr = second[1].number_input(
            "Body learning rate",
            key="train_body_lr",
            min_value=1e-7,
            max_value=1.0,
            value=defaults.body_lr,
            format="%.1e",
            step=1e-5,
        )
        weight_decay = second[2].number_input(
            "Weight decay",
            key="train_weight_decay",
            min_value=0.0,
            max_value=1.0,
            value=defaults.weight_decay,
            format="%.3f",
        )
        smoothing = second[3].number_input(
            "Label smoothing",
            key="train_label_smoothing",
            min_value=0.0,
            max_value=0.5,
            value=defaults.label_smoothing,
            format="%.2f",
        )
        third = st.columns(4)
        folds = third[0].number_input(
            "Scoring folds",
            key="train_folds",
            min_value=2,
            max_value=20,
            value=defaults.folds,
            help="Out-of-fold scoring of the pool photos for the Review page.",
        )
        seed = third[1].number_input(
            "Seed", key="train_seed", min_value=0, value=defaults.seed
        )
        limit = third[2].number_input(
            "Photos per class (0 = all)",
            key="train_max_per_class",
            min_value=0,
            value=defaults.max_per_class or 0,
            help="A small number gives a quick trial run.",
        )
        tta = third[3].checkbox(
            "Test-time augmentation",
            key="train_tta",
            value=defaults.tta,
            help="Average each holdout photo's prediction over its centre view, "
            "its mirror image and the test-time crops.",
        )
        fourth = st.columns(4)
        crop_views = fourth[0].number_input(
            "Random crops per photo",
            key="train_crop_views",
            min_value=0,
            max_value=32,
            value=defaults.crop_views,
            help="Views of each photo, besides the centre and its mirror image, "
            "that the head trains on. Computed once per photo and kept.",
        )
        head_hidden = fourth[1].number_input(
            "Head hidden units (0 = linear)",
            key="train_head_hidden",
            min_value=0,
            max_value=4096,
            step=128,
            value=defaults.head_hidden,
        )
        head_dropout = fourth[2].number_input(
            "Head dropout",
            key="train_head_dropout",
            min_value=0.0,
            max_value=0.9,
            value=defaults.head_dropout,
            format="%.2f",
        )
        tta_crops = fourth[3].number_input(
            "Test-time crops",
            key="train_tta_crops",
            min_value=0,
            max_value=32,
            value=defaults.tta_crops,
            help="Random crops of each holdout photo averaged into its prediction "
            "with test-time augmentation. With the body frozen, their features "
            "are computed once per photo and kept.",
        )
        pressed = st.form_submit_button(
            "Train",
            key="train_submit",
            type="primary",
            disabled=running,
            help="A training job is running." if running else None,
        )
    if not pressed:
        return None
    if frozen + unfrozen == 0:
        st.error("Set at least one epoch: head-only or whole-network epochs.")
        return None
    return TrainConfig(
        image_size=int(image_size),
        batch_size=int(batch_size),
        frozen_epochs=int(frozen),
        unfrozen_epochs=int(unfrozen),
        head_lr=float(head_lr),
        body_lr=float(body_lr),
        weight_decay=float(weight_decay),
        label_smoothing=float(smoothing),
        tta=bool(tta),
        tta_crops=int(tta_crops),
        crop_views=int(crop_views),
        head_hidden=int(head_hidden),
        head_dropout=float(head_dropout),
        folds=int(folds),
        seed=int(seed),
        max_per_class=int(limit) or None,
    )


def _start(config: TrainConfig) -> None:
    try:
        with session_scope() as session:
            start_job(session, "train", asdict(config))
    except ValueError as error:
        st.error(str(error))
        return
    # Rerun so the panel above shows the new job's progress.
    st.rerun()


def _config_summary(config: dict) -> str:
    epochs = f"{config.get('frozen_epochs')}+{config.get('unfrozen_epochs')} epochs"
    text = f"{config.get('image_size')} px, {epochs}, seed {config.get('seed')}"
    if config.get("max_per_class"):
        text += f", ≤{config['max_per_class']}/class"
    return text


def _runs_table(runs: list[TrainingRun]) -> None:
    frame = pd.DataFrame(
        [
            {
                "run": run.id,
                "started (UTC)": run.created_at,
                "status": run.status,
                "holdout accuracy": format_percent(run.metrics.get("accuracy_holdout")),
                "train seconds": run.train_seconds,
                "photos trained on": run.n_train,
                "settings": _config_summary(run.config),
            }
            for run in runs
        ]
    )
    st.dataframe(frame, hide_index=True, width="stretch")


def _report_text(run_id: int) -> str:
    with session_scope() as session:
        return cleaning_report(session, get_run(session, run_id))


def _run_details(finished: list[TrainingRun]) -> None:
    by_id = {run.id: run for run in finished}
    # Keyed by the newest run, so a run that just finished becomes the choice.
    run_id = st.selectbox(
        "Run",
        list(by_id),
        format_func=lambda i: run_label(by_id[i]),
        key=f"train_selected_run_{finished[0].id}",
    )
    run = by_id[run_id]
    metrics = st.columns(4)
    metrics[0].metric(
        "Holdout accuracy", format_percent(run.metrics.get("accuracy_holdout"))
    )
    metrics[1].metric("Holdout photos", run.metrics.get("n_holdout", 0))
    metrics[2].metric("Photos trained on", run.n_train)
    seconds = run.train_seconds
    whole = (
        format_seconds((run.finished_at - run.created_at).total_seconds())
        if run.finished_at and run.created_at
        else "–"
    )
    metrics[3].metric(
        "Fit time",
        format_seconds(seconds) if seconds else "–",
        help="The training alone. The whole run, with holdout evaluation "
        f"and out-of-fold scoring, took {whole}; a first run on a photo set "
        "also computes the features it keeps for later runs.",
    )
    # Built only when pressed: the report draws a chart.
    st.download_button(
        "Download cleaning report",
        data=partial(_report_text, run.id),
        file_name=f"cleaning-report-run-{run.id}.md",
        mime="text/markdown",
        key=f"train_report_{run.id}",
        on_click="ignore",
        help="Label changes since the previous run, holdout accuracy before and "
        "after, the most confused classes and a chart (Markdown).",
    )
    left, right = st.columns(2)
    with left:
        st.markdown("**Confusion matrix on the holdout**")
        st.dataframe(confusion_frame(run), width="stretch")
    with right:
        st.markdown("**Settings**")
        st.json({**run.config, "classes": run.classes, "device": run.device})


def train_page() -> None:
    st.title("Train")
    job = job_panel("train", "training")
    config = _settings_form(running=job is not None and is_active(job))
    if config is not None:
        _start(config)

    st.subheader("Runs")
    with session_scope() as session:
        runs = list_runs(session)
    if not runs:
        st.info("No training runs yet: press Train above to make the first one.")
        st.stop()
    _runs_table(runs)
    finished = [run for run in runs if run.status == DONE]
    if not finished:
        st.info("No run has finished yet.")
        st.stop()
    _run_details(finished)
    accuracy_chart(finished)


train_page()
