"""Benchmark stage: the default recipe exported three ways, each file checked on
every holdout photo by its own runtime.

A refused export is still measured: its numbers come from the refusal's
`checks`, and `export_<format>_refused` holds the reason.
"""

import time
from pathlib import Path

from bench.stages import _fresh_database, peak_rss_mb

# Result key suffix -> the `Export.checks` entry it reports.
MEASURES = {
    "size_mb": "size_mb",
    "agreement": "agreement",
    "max_prob_diff": "max_prob_diff",
    "accuracy_holdout": "accuracy_holdout",
    "latency_ms": "latency_ms_median",
    "n_checked": "n_checked",
}


def stage_exports(workdir: Path) -> dict:
    """Train `TrainConfig()` on the real photos, then export pte, pte int8, onnx."""
    from db.engine import session_scope
    from pipeline.export import ExportConfig, ExportRefusedError, export_run
    from pipeline.train import TrainConfig, train_run

    workdir.mkdir(parents=True, exist_ok=True)
    engine = _fresh_database(workdir, "exports")
    with session_scope(engine) as session:
        run_id = train_run(session, TrainConfig()).id

    results = {}
    configs = [
        ExportConfig(format="pte"),
        ExportConfig(format="pte", int8=True),
        ExportConfig(format="onnx"),
    ]
    for config in configs:
        key = f"export_{config.kind}"
        started = time.perf_counter()
        try:
            with session_scope(engine) as session:
                checks = dict(export_run(session, run_id, config).checks)
        except ExportRefusedError as refused:
            checks = dict(refused.checks)
            results[f"{key}_refused"] = str(refused)
        results[f"{key}_seconds"] = round(time.perf_counter() - started, 1)
        for name, field in MEASURES.items():
            results[f"{key}_{name}"] = _rounded(checks.get(field))
        if "pytorch_accuracy_holdout" in checks:
            results["export_pytorch_accuracy_holdout"] = _rounded(
                checks["pytorch_accuracy_holdout"]
            )
    results["exports_peak_rss_mb"] = round(peak_rss_mb(), 1)
    return results


def _rounded(value: float | int | None) -> float | int | None:
    return value if value is None or isinstance(value, int) else round(value, 4)
