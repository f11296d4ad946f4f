"""The cleaning report of a training run: what the labels went through since the
previous run, and what that did to holdout accuracy.

"Since the previous run" is the time from the previous finished run's start
to this run's start (for the first run: everything before it). Label changes
are taken from the audit trail as their net effect on each photo over that
time, so a relabel that was undone counts as nothing. The report is Markdown
with its one chart embedded as a PNG data URI, so the single file shows the
chart too in a Markdown viewer; the chart comes last to keep the text
readable as plain text.
"""

import base64
import io
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session, aliased

from db.models import (
    CONFIRMED,
    EXCLUDED,
    NO_LABEL,
    POOL,
    UNLABELLED,
    LabelEvent,
    Photo,
    TrainingRun,
)
from db.settings import get_settings
from pipeline.runs import (
    BROKEN,
    FIXED,
    OTHER,
    HoldoutFlips,
    holdout_flips,
    previous_run,
)

logger = logging.getLogger(__name__)

REPORT_NAME = "cleaning-report.md"
# Photos listed by name per kind of change; the counts always cover them all.
LISTED = 20
TOP_PAIRS = 5
MAX_LABELLED_GROUPS = 14


@dataclass(frozen=True)
class PhotoChange:
    """The net change to one photo over the report's time window."""

    photo_id: int
    path: str
    old_label: str
    new_label: str
    old_status: str
    new_status: str


@dataclass
class LabelChanges:
    """Net label changes between two times, sorted by kind."""

    relabelled: list[PhotoChange] = field(default_factory=list)
    # Left out of training: excluded, or sent back to the unlabelled split.
    excluded: list[PhotoChange] = field(default_factory=list)
    # Excluded before, taking part again.
    restored: list[PhotoChange] = field(default_factory=list)
    # Given their first label on the Label page: they joined the pool.
    labelled: list[PhotoChange] = field(default_factory=list)
    confirmed: list[PhotoChange] = field(default_factory=list)
    # Photos imported, by the split they were imported into.
    imported: dict[str, int] = field(default_factory=dict)

    @property
    def added(self) -> int:
        """Photos new to training: imported into the pool, or labelled."""
        return self.imported.get(POOL, 0) + len(self.labelled)


@dataclass(frozen=True)
class ConfusedPair:
    """Two classes the model mixes up on the holdout, both ways counted."""

    first: str
    second: str
    first_as_second: int  # photos of `first` predicted `second`
    second_as_first: int

    @property
    def total(self) -> int:
        return self.first_as_second + self.second_as_first


def label_changes(
    session: Session, since: datetime | None, until: datetime
) -> LabelChanges:
    """Net label changes and imports from `since` (None: the start) to `until`."""
    in_window = [LabelEvent.created_at < until]
    if since is not None:
        in_window.append(LabelEvent.created_at >= since)
    events = session.scalars(
        select(LabelEvent).where(*in_window).order_by(LabelEvent.id)
    ).all()
    first: dict[int, LabelEvent] = {}
    last: dict[int, LabelEvent] = {}
    for event in events:
        first.setdefault(event.photo_id, event)
        last[event.photo_id] = event

    changes = LabelChanges()
    paths = dict(
        session.execute(select(Photo.id, Photo.path).where(Photo.id.in_(list(last))))
        .tuples()
        .all()
    )
    for photo_id, end in last.items():
        start = first[photo_id]
        change = PhotoChange(
            photo_id,
            paths[photo_id],
            start.old_label,
            end.new_label,
            start.old_status,
            end.new_status,
        )
        kind = _kind(change)
        if kind is not None:
            getattr(changes, kind).append(change)
    changes.imported = _imported(session, since, until)
    return changes


def _kind(change: PhotoChange) -> str | None:
    """Which list of `LabelChanges` a net change belongs in, if any."""
    if change.old_label == NO_LABEL and change.new_label == NO_LABEL:
        return None  # unlabelled throughout: it never took part in training
    newly_excluded = change.old_status != EXCLUDED and change.new_status == EXCLUDED
    if newly_excluded or change.new_label == NO_LABEL:
        return "excluded"
    if change.old_status == EXCLUDED:
        return "restored"
    if change.old_label == NO_LABEL:
        return "labelled"
    if change.old_label != change.new_label:
        return "relabelled"
    if change.new_status == CONFIRMED and change.old_status != CONFIRMED:
        return "confirmed"
    return None


def _imported(session: Session, since: datetime | None, until: datetime) -> dict:
    """Photos imported in the window, by the split they were imported into.

    A photo labelled on the Label page is in the pool now but arrived in the
    unlabelled split; its first-label event (old label empty) tells.
    """
    accepted = aliased(LabelEvent)
    was_unlabelled = exists().where(
        accepted.photo_id == Photo.id, accepted.old_label == NO_LABEL
    )
    conditions = [Photo.created_at < until]
    if since is not None:
        conditions.append(Photo.created_at >= since)
    rows = session.execute(
        select(Photo.split, was_unlabelled, func.count())
        .where(*conditions)
        .group_by(Photo.split, was_unlabelled)
    ).all()
    counts: dict[str, int] = {}
    for split, via_label_page, count in rows:
        into = UNLABELLED if via_label_page else split
        counts[into] = counts.get(into, 0) + count
    return counts


def class_accuracy(run: TrainingRun) -> dict[str, float | None]:
    """Holdout accuracy per class (the confusion matrix's row recall)."""
    confusion = run.metrics.get("confusion") or []
    accuracy = {}
    for i, name in enumerate(run.classes):
        row = confusion[i] if i < len(confusion) else []
        total = sum(row)
        accuracy[name] = row[i] / total if total else None
    return accuracy


def confused_pairs(run: TrainingRun, top: int = TOP_PAIRS) -> list[ConfusedPair]:
    """The class pairs with the most holdout mistakes between them, most first."""
    confusion = run.metrics.get("confusion") or []
    classes = list(run.classes)
    pairs = []
    for i in range(len(confusion)):
        for j in range(i + 1, len(confusion)):
            pair = ConfusedPair(
                classes[i], classes[j], confusion[i][j], confusion[j][i]
            )
            if pair.total:
                pairs.append(pair)
    pairs.sort(key=lambda pair: (-pair.total, pair.first, pair.second))
    return pairs[:top]


def cleaning_report(session: Session, run: TrainingRun) -> str:
    """The Markdown cleaning report of `run` (see the module docstring)."""
    previous = previous_run(session, run)
    since = previous.created_at if previous is not None else None
    changes = label_changes(session, since, run.created_at)
    lines = [f"# Cleaning report: run {run.id}", ""]
    if previous is None:
        lines += [
            f"The first finished run, started {_time(run.created_at)} UTC: "
            "everything done to the labels before it counts.",
            "",
        ]
    else:
        lines += [
            f"Changes between run {previous.id} (started "
            f"{_time(previous.created_at)} UTC) and run {run.id} (started "
            f"{_time(run.created_at)} UTC).",
            "",
        ]
    lines += _changes_section(changes, previous)
    flips = holdout_flips(session, run, previous) if previous else None
    lines += _accuracy_section(run, previous, flips)
    lines += _pairs_section(run)
    lines += _photo_lists(changes)
    lines += ["## Chart", "", _chart_markdown(run, previous), ""]
    return "\n".join(lines)


def write_cleaning_report(
    session: Session, run: TrainingRun, out: Path | None = None
) -> Path:
    """Write the report to `out` (default beside the run's weights); its path."""
    if out is None:
        out = get_settings().artifact_dir / "runs" / str(run.id) / REPORT_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(cleaning_report(session, run), encoding="utf-8")
    logger.info("run %s: cleaning report written to %s", run.id, out)
    return out


def _changes_section(changes: LabelChanges, previous: TrainingRun | None) -> list:
    since = "Since the previous run" if previous is not None else "Before this run"
    imported = ", ".join(
        f"{count} into the {split} split"
        for split, count in sorted(changes.imported.items())
    )
    return [
        "## Label changes",
        "",
        f"{since}:",
        "",
        "| change | photos |",
        "|---|---:|",
        f"| relabelled | {len(changes.relabelled)} |",
        f"| excluded | {len(changes.excluded)} |",
        f"| added (imported into the pool, or labelled) | {changes.added} |",
        f"| brought back after an exclusion | {len(changes.restored)} |",
        f"| confirmed as labelled | {len(changes.confirmed)} |",
        "",
        f"Photos imported: {imported or 'none'}.",
        "",
    ]


def _accuracy_section(
    run: TrainingRun, previous: TrainingRun | None, flips: HoldoutFlips | None
) -> list:
    after = run.metrics.get("accuracy_holdout")
    before = previous.metrics.get("accuracy_holdout") if previous else None
    lines = ["## Holdout accuracy", ""]
    if previous is None:
        lines += [f"This run: {_percent(after)} (no previous run to compare).", ""]
    else:
        lines += [
            f"Before (run {previous.id}): {_percent(before)}; after (run {run.id}): "
            f"{_percent(after)}; change {_points(before, after)}.",
            "",
        ]
        if flips is not None and flips.compared:
            lines += [
                f"Predictions that changed, of the {flips.compared} holdout photos "
                f"both runs predicted: fixed (now right) {flips.count(FIXED)}, "
                f"broken (now wrong) {flips.count(BROKEN)}, "
                f"from one wrong class to another {flips.count(OTHER)}.",
                "",
            ]
        n_before = previous.metrics.get("n_holdout")
        n_after = run.metrics.get("n_holdout")
        if n_before != n_after:
            lines += [
                f"The holdout changed between the runs ({n_before} → {n_after} "
                "photos), so the two accuracies are not on the same photos.",
                "",
            ]

    # Per class, beside the photos of each class the run trained on.
    before_accuracy = class_accuracy(previous) if previous else {}
    before_counts = previous.metrics.get("train_class_counts", {}) if previous else {}
    after_accuracy = class_accuracy(run)
    after_counts = run.metrics.get("train_class_counts", {})
    lines += [
        "| class | accuracy before | accuracy after | trained on before | "
        "trained on after |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in sorted(set(after_accuracy) | set(before_accuracy)):
        lines.append(
            f"| {_cell(name)} | {_percent(before_accuracy.get(name))} | "
            f"{_percent(after_accuracy.get(name))} | {before_counts.get(name, '–')} | "
            f"{after_counts.get(name, '–')} |"
        )
    trained_before = previous.n_train if previous else "–"
    lines.append(
        f"| all | {_percent(before)} | {_percent(after)} | {trained_before} | "
        f"{run.n_train} |"
    )
    return [*lines, ""]


def _pairs_section(run: TrainingRun) -> list:
    lines = ["## Most confused classes", ""]
    if not run.metrics.get("confusion"):
        return [*lines, "This run recorded no confusion matrix.", ""]
    pairs = confused_pairs(run)
    if not pairs:
        return [*lines, "No holdout photo was mistaken for another class.", ""]
    lines += [
        "On this run's holdout predictions; *A as B* counts photos labelled A that "
        "the model called B.",
        "",
        "| classes | mistakes | first as second | second as first |",
        "|---|---:|---:|---:|",
    ]
    for pair in pairs:
        lines.append(
            f"| {_cell(pair.first)} ↔ {_cell(pair.second)} | {pair.total} | "
            f"{pair.first_as_second} | {pair.second_as_first} |"
        )
    return [*lines, ""]


def _photo_lists(changes: LabelChanges) -> list:
    lines = []
    for title, photos in (
        ("Relabelled photos", changes.relabelled),
        ("Excluded photos", changes.excluded),
        ("Labelled photos", changes.labelled),
        ("Photos brought back", changes.restored),
    ):
        if not photos:
            continue
        lines += [
            f"## {title}",
            "",
            "| photo | file | label | status |",
            "|---|---|---|---|",
        ]
        for change in photos[:LISTED]:
            lines.append(
                f"| #{change.photo_id} | {_cell(Path(change.path).name)} | "
                f"{_cell(_arrow(change.old_label, change.new_label))} | "
                f"{_arrow(change.old_status, change.new_status)} |"
            )
        if len(photos) > LISTED:
            lines.append(f"| … | and {len(photos) - LISTED} more | | |")
        lines.append("")
    return lines


def _chart_markdown(run: TrainingRun, previous: TrainingRun | None) -> str:
    """Holdout accuracy per class and overall, before and after, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(f"run {run.id}", class_accuracy(run), run)]
    if previous is not None:
        series.insert(0, (f"run {previous.id}", class_accuracy(previous), previous))
    names = sorted({name for _, accuracy, _ in series for name in accuracy})
    groups = [*names, "all"]
    width = 0.8 / len(series)
    # Many classes share a width a screen can show, without value labels.
    labelled = len(groups) <= MAX_LABELLED_GROUPS
    figure, axes = plt.subplots(
        figsize=(min(16.0, 1.2 + 1.1 * len(groups)), 3.2), dpi=100
    )
    for k, (title, accuracy, source) in enumerate(series):
        values = [accuracy.get(name) for name in names]
        values.append(source.metrics.get("accuracy_holdout"))
        heights = [100 * v if v is not None else 0.0 for v in values]
        positions = [
            i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))
        ]
        bars = axes.bar(positions, heights, width, label=title)
        if labelled:
            axes.bar_label(bars, labels=[_percent(v) for v in values], fontsize=7)
    rotation = 0 if len(groups) <= 4 else 20 if labelled else 90
    axes.set_xticks(range(len(groups)), groups, rotation=rotation, fontsize=8)
    axes.set_ylabel("holdout accuracy (%)")
    axes.set_ylim(0, 122)
    axes.legend(loc="upper center", ncols=len(series), fontsize=8, frameon=False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"![Holdout accuracy per class](data:image/png;base64,{encoded})"


def _arrow(old: str, new: str) -> str:
    old, new = old or "(none)", new or "(none)"
    return new if old == new else f"{old} → {new}"


def _cell(text: str) -> str:
    """`text` safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def _time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _points(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "–"
    return f"{100 * (after - before):+.1f} points"
