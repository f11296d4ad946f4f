"""Run every benchmark stage in its own process and print one table.

Each stage is a separate process so that its peak memory (max RSS) is its
own. Results go to `bench/results.json`; the table goes to stdout.

    python -m bench                 # all stages
    python -m bench --only train    # one stage (name as in STAGES)
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"
STAGES = ("baselines", "train", "noise", "writeload", "review", "exports", "al")


def run_stage(name: str, workdir: Path) -> dict:
    started = time.perf_counter()
    output = subprocess.run(
        [sys.executable, "-m", "bench.stages", name, str(workdir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    if output.returncode != 0:
        sys.stderr.write(output.stderr[-4000:])
        raise SystemExit(f"benchmark stage {name!r} failed ({output.returncode})")
    result = json.loads(output.stdout.strip().splitlines()[-1])
    result[f"{name}_stage_seconds"] = round(time.perf_counter() - started, 1)
    return result


def machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = psutil.virtual_memory().total / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB"


def print_table(results: dict) -> None:
    rows = [
        (
            "zero-shot ImageNet 'hotdog' class",
            results.get("zero_shot_accuracy"),
            None,
            results.get("baselines_peak_rss_mb"),
        ),
        (
            "logistic regression, frozen features",
            results.get("linear_probe_accuracy"),
            results.get("linear_probe_seconds"),
            results.get("baselines_peak_rss_mb"),
        ),
        (
            "default fastai train, features not cached",
            results.get("accuracy_holdout"),
            results.get("train_seconds"),
            results.get("peak_rss_mb"),
        ),
        (
            "default fastai retrain, features cached",
            results.get("accuracy_holdout_repeat"),
            results.get("retrain_seconds"),
            results.get("peak_rss_mb"),
        ),
    ]
    print(f"\n{'method':<40} {'holdout acc':>11} {'seconds':>9} {'peak RSS MB':>12}")
    for name, accuracy, seconds, rss in rows:
        acc = "-" if accuracy is None else f"{100 * accuracy:.1f} %"
        sec = "-" if seconds is None else f"{seconds:.1f}"
        mem = "-" if rss is None else f"{rss:.0f}"
        print(f"{name:<40} {acc:>11} {sec:>9} {mem:>12}")
    extra = {
        k: v
        for k, v in results.items()
        if k.startswith(
            (
                "noise_",
                "quick_",
                "export_",
                "topk_",
                "confident_",
                "rerank",
                "review_",
                "lost_",
                "relabel_",
                "al_",
                "random_",
                "run_",
                "rerun_",
            )
        )
    }
    for key, value in sorted(extra.items()):
        print(f"{key:<52} {value}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--only", choices=STAGES, action="append")
    parser.add_argument("--workdir", default=str(ROOT / "data" / "bench"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() and args.only else {}
    for name in args.only or STAGES:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.update(run_stage(name, workdir))
    results["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results["machine"] = machine()
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True))
    print(f"machine: {results['machine']}; date: {results['date']}")
    print_table(results)
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
