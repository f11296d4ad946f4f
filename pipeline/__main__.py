"""Command line: `python -m pipeline ingest | train | score | export | worker`.

Each command calls the same functions as the dashboard.
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

    config = ExportConfig(format=args.format, int8=args.int8)
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

    train = commands.add_parser("train", help="fine-tune on the current labels")
    train.add_argument("--frozen-epochs", dest="frozen_epochs", type=int)
    train.add_argument("--unfrozen-epochs", dest="unfrozen_epochs", type=int)
    train.add_argument("--image-size", dest="image_size", type=int)
    train.add_argument("--batch-size", dest="batch_size", type=int)
    train.add_argument("--head-lr", dest="head_lr", type=float)
    train.add_argument("--body-lr", dest="body_lr", type=float)
    train.add_argument("--seed", type=int)
    train.add_argument("--folds", type=int)
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
    export.set_defaults(func=_export)

    worker = commands.add_parser("worker", help=argparse.SUPPRESS)
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
    except (ValueError, LookupError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
