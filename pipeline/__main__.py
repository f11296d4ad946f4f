"""Command line: `python -m pipeline <command>`.

Commands: ingest, train, score, export, export-data, report, upload, prelabel,
accept (and worker, which runs a background job). Each calls the same
functions as the dashboard.
"""

import argparse
import json
import logging
import sys

from db.engine import get_engine, session_scope
from db.settings import get_settings

logger = logging.getLogger("pipeline")


def _ingest(args) -> int:
    from pipeline.ingest import ingest_folder

    settings = get_settings()
    data_dir = args.data_dir or settings.data_dir
    with session_scope(get_engine()) as session:
        report = ingest_folder(session, data_dir)
    print(report.summary())
    return 0


def _train(args) -> int:
    from pipeline.train import TrainConfig, train_run

    values = {
        k: v
        for k, v in vars(args).items()
        if k in TrainConfig.__dataclass_fields__ and v is not None
    }
    config = TrainConfig.from_dict(values)
    progress = _console_progress()
    with session_scope(get_engine()) as session:
        run = train_run(session, config, progress)
        print(json.dumps({"run_id": run.id, **run.metrics}, indent=2))
    return 0


def _score(args) -> int:
    from pipeline.runs import get_run
    from pipeline.scoring import score_run

    with session_scope(get_engine()) as session:
        run = get_run(session, args.run)
        count = score_run(session, run, thorough=not args.quick)
        print(f"run {run.id}: scored {count} pool photos out-of-fold")
    return 0


def _export(args) -> int:
    from pipeline.export import ExportConfig, export_run
    from pipeline.runs import get_run

    options = {"format": args.format, "int8": args.int8}
    if args.min_int8_agreement is not None:
        if not args.int8:
            raise ValueError("--min-int8-agreement applies only with --int8")
        options["min_int8_agreement"] = args.min_int8_agreement
    config = ExportConfig(**options)
    with session_scope(get_engine()) as session:
        run = get_run(session, args.run)
        export = export_run(session, run.id, config, _console_progress())
        print(
            json.dumps(
                {
                    "export_id": export.id,
                    "path": export.path,
                    "sidecar": export.sidecar_path,
                    **export.checks,
                },
                indent=2,
            )
        )
    return 0


def _export_data(args) -> int:
    from pipeline.export_data import export_dataset, new_dataset_dir

    out_dir = args.out or new_dataset_dir()
    with session_scope(get_engine()) as session:
        summary = export_dataset(session, out_dir)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def _report(args) -> int:
    from pathlib import Path

    from pipeline.report import write_cleaning_report
    from pipeline.runs import get_run

    with session_scope(get_engine()) as session:
        run = get_run(session, args.run)
        path = write_cleaning_report(session, run, Path(args.out) if args.out else None)
    print(f"run {run.id}: cleaning report written to {path}")
    return 0


def _upload(args) -> int:
    from pathlib import Path

    from pipeline.unlabelled import ADDED, REFUSED, add_uploads

    files = [(Path(name).name, Path(name).read_bytes()) for name in args.files]
    with session_scope(get_engine()) as session:
        results = add_uploads(session, files)
    for result in results:
        if result.outcome == ADDED:
            print(f"{result.name}: added as photo #{result.photo_id}")
        elif result.outcome == REFUSED:
            print(f"{result.name}: refused: {result.reason}")
        else:
            print(f"{result.name}: {result.reason}")
    return 1 if any(r.outcome == REFUSED for r in results) else 0


def _prelabel(args) -> int:
    from pipeline.runs import get_run
    from pipeline.unlabelled import label_queue, prelabel

    with session_scope(get_engine()) as session:
        run = get_run(session, args.run)
        count = prelabel(session, run, redo=args.redo)
        queue = label_queue(session, limit=args.show, run_id=run.id)
    print(f"run {run.id}: suggested labels for {count} photos; {queue.total} to label")
    for item in queue.items:
        print(f"  #{item.photo_id} {item.reason or '-'}  {item.path}")
    return 0


def _accept(args) -> int:
    from pipeline.unlabelled import accept

    with session_scope(get_engine()) as session:
        event = accept(session, args.photo_id, args.label)
    print(f"photo #{event.photo_id} labelled {event.new_label}; it is in the pool now")
    return 0


def _worker(args) -> int:
    from pipeline.jobs import run_job

    state = run_job(args.job_id)
    return 0 if state in ("done", "cancelled") else 1


def _console_progress():
    from pipeline.progress import Progress

    last = {"message": None}

    def show(fraction: float, message: str) -> bool:
        if message != last["message"]:
            print(f"[{100 * fraction:5.1f} %] {message}", file=sys.stderr, flush=True)
            last["message"] = message
        return False

    return Progress(show)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Seefood Studio pipeline. Paths come from DATA_DIR, "
        "DATABASE_URL and ARTIFACT_DIR (see README).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser(
        "ingest", help="import photos from DATA_DIR/train and DATA_DIR/test"
    )
    ingest.add_argument("--data-dir", help="class-folder photo set (default DATA_DIR)")
    ingest.set_defaults(func=_ingest)

    train = commands.add_parser(
        "train",
        help="fine-tune on the current labels",
        epilog="Options left out take the defaults the Train page shows; every "
        "run stores the settings it used.",
    )
    for flag, kind, text in (
        ("--frozen-epochs", int, "epochs of the new head alone, body frozen"),
        ("--unfrozen-epochs", int, "epochs of all layers after that"),
        ("--image-size", int, "square input side in pixels (32 to 1024)"),
        ("--batch-size", int, "photos per step"),
        ("--head-lr", float, "peak learning rate of the head"),
        ("--body-lr", float, "peak learning rate of the body when unfrozen"),
        ("--weight-decay", float, "weight decay"),
        ("--label-smoothing", float, "label smoothing, from 0 up to 1"),
        ("--seed", int, "random seed; the same seed gives the same run"),
        ("--folds", int, "folds of the out-of-fold scoring (2 or more)"),
        ("--crop-views", int, "random crops per photo the head trains on"),
        ("--head-hidden", int, "units of the head's hidden layer (0: linear head)"),
        ("--head-dropout", float, "dropout before and inside the head, below 1"),
        ("--tta-crops", int, "random crops per holdout photo with --tta"),
    ):
        train.add_argument(flag, dest=flag[2:].replace("-", "_"), type=kind, help=text)
    train.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="average each holdout photo's prediction over its centre view, its "
        "mirror image and --tta-crops random crops",
    )
    train.add_argument(
        "--max-per-class",
        dest="max_per_class",
        type=int,
        help="use at most this many photos per class (quick trials)",
    )
    train.set_defaults(func=_train)

    score = commands.add_parser(
        "score", help="recompute out-of-fold scores from the current labels"
    )
    score.add_argument("--run", type=int, help="run id (default: latest finished)")
    score.add_argument(
        "--quick",
        action="store_true",
        help="ImageNet embeddings only (about a second; the dashboard's rerank)",
    )
    score.set_defaults(func=_score)

    export = commands.add_parser("export", help="export a run for phones, checked")
    export.add_argument("--run", type=int, help="run id (default: latest finished)")
    export.add_argument("--format", choices=("pte", "onnx"), default="pte")
    export.add_argument(
        "--int8", action="store_true", help="int8 post-training quantization (pte only)"
    )
    export.add_argument(
        "--min-int8-agreement",
        dest="min_int8_agreement",
        type=float,
        help="refuse an int8 file whose top class matches PyTorch's on fewer "
        "holdout photos than this share (default 0.98)",
    )
    export.set_defaults(func=_export)

    export_data = commands.add_parser(
        "export-data",
        help="write the cleaned set: manifest and a train/ test/ class-folder tree",
    )
    export_data.add_argument(
        "--out", help="a new or empty folder (default ARTIFACT_DIR/datasets/<time>)"
    )
    export_data.set_defaults(func=_export_data)

    report = commands.add_parser(
        "report",
        help="write a run's cleaning report: label changes since the previous run, "
        "holdout accuracy before and after, most confused classes (Markdown)",
    )
    report.add_argument("--run", type=int, help="run id (default: latest finished)")
    report.add_argument(
        "--out",
        help="file to write (default ARTIFACT_DIR/runs/<id>/cleaning-report.md)",
    )
    report.set_defaults(func=_report)

    upload = commands.add_parser(
        "upload", help="add photo files to the unlabelled split, as the dashboard does"
    )
    upload.add_argument("files", nargs="+", help="image files")
    upload.set_defaults(func=_upload)

    prelabel = commands.add_parser(
        "prelabel", help="suggest labels for unlabelled photos with a run's model"
    )
    prelabel.add_argument("--run", type=int, help="run id (default: latest finished)")
    prelabel.add_argument(
        "--redo", action="store_true", help="also photos the run suggested before"
    )
    prelabel.add_argument(
        "--show", type=int, default=10, help="list this many, least sure first"
    )
    prelabel.set_defaults(func=_prelabel)

    accept = commands.add_parser(
        "accept", help="give an unlabelled photo its label; it joins the pool"
    )
    accept.add_argument("photo_id", type=int)
    accept.add_argument("label")
    accept.set_defaults(func=_accept)

    worker = commands.add_parser(
        "worker", help="run one recorded job (the dashboard starts these)"
    )
    worker.add_argument("job_id", type=int)
    worker.set_defaults(func=_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, LookupError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
