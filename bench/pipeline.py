"""The demo pipeline cold and cached: wall time and peak memory (RSS) per stage, and rerun / cold.

    .venv/bin/python bench/pipeline.py [--profile demo] [--workdir DIR] [--keep] [--quick]

Runs ``flows.pipeline.pipeline`` (what ``make run`` / ``longshort run`` run) twice, each in a
fresh Python process, in a fresh temporary workspace (``--set run.workspace=<tmp>/workspace``;
MLflow's sqlite store and the artifacts go there, and Prefect's ephemeral API keeps its database
under ``<tmp>/prefect-home``, so nothing outside the temp folder is read or written):

1. cold: every stage computes;
2. rerun: the same profile again, nothing changed: every stage must come from the cache.

For the cold run it prints each stage's compute time (``stage_times_s``, the stage record's
``duration_s``) and peak RSS while it ran (``stage_peak_rss_mb``, the ``peak_rss_mb`` metric that
``flows.stages`` records: the process's resident memory sampled every 0.1 s plus the kernel's
high-water mark), the Monte Carlo score shards summed, the flow time, the process's wall time
(imports and Prefect start-up included) and its peak RSS; then the rerun's flow and wall times,
its cache hits, and the ratios rerun / cold. ``--quick`` runs the smoke profile instead of demo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
from flows.pipeline import pipeline
summary = pipeline(profile=sys.argv[1], overrides=sys.argv[3:])
summary["process_wall_s"] = time.perf_counter() - start
summary["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
with open(sys.argv[2], "w") as f:
    json.dump(summary, f, default=str)
"""


def run_once(profile: str, overrides: list[str], root: Path, name: str, verbose: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LONGSHORT_DVC_REMOTE", "PREFECT_API_URL")}
    env.update(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    out = root / f"summary-{name}.json"
    log = root / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, profile, str(out), *overrides],
            cwd=REPO, env=env, stdout=None if verbose else f, stderr=subprocess.STDOUT if not verbose else None,
        )  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "" if verbose else "\n".join(log.read_text().splitlines()[-40:])
        sys.exit(f"{name} run failed (exit {proc.returncode}); log {log}\n{tail}")
    summary = json.loads(out.read_text())
    summary["outer_wall_s"] = wall
    return summary


def shard_records(workspace: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((workspace / "artifacts" / "score_shard").glob("*/record.json"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra section.field=value overrides")
    ap.add_argument("--workdir", type=Path, help="temp folder to use (default: a new one under the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the workspace afterwards")
    ap.add_argument("--verbose", action="store_true", help="show the pipeline's logs (default: into <workdir>/*.log)")
    ap.add_argument("--quick", action="store_true", help="the smoke profile (seconds) instead of demo")
    args = ap.parse_args()
    profile = "smoke" if args.quick else args.profile

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    root.mkdir(parents=True, exist_ok=True)
    workspace = root / "workspace"
    if workspace.exists():
        sys.exit(f"{workspace} exists: the cold run needs an empty workspace")
    overrides = [f"run.workspace={workspace}", *args.overrides]
    try:
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f}; profile {profile}; workspace {workspace}"
        )
        cold = run_once(profile, overrides, root, "cold", args.verbose)
        shards = shard_records(workspace)
        rerun = run_once(profile, overrides, root, "rerun", args.verbose)

        print("\ncold run, per stage (compute time, peak RSS of the process while the stage ran):")
        print(f"  {'stage':<14} {'time s':>9} {'peak RSS MB':>12}")
        times, peaks = cold["stage_times_s"], cold.get("stage_peak_rss_mb", {})
        for stage in times:
            print(f"  {stage:<14} {times[stage]:9.1f} {peaks.get(stage) or float('nan'):12.0f}")
        if shards:
            shard_time = sum(r["duration_s"] for r in shards)
            shard_peak = max((r["metrics"].get("peak_rss_mb") or 0) for r in shards)
            print(f"  {'score_shard':<14} {shard_time:9.1f} {shard_peak:12.0f}   ({len(shards)} shards, times summed, max RSS)")
        total = sum(times.values()) + (sum(r["duration_s"] for r in shards) if shards else 0)
        print(f"  {'sum of stages':<14} {total:9.1f}")
        print(
            f"cold:  flow {cold['flow_time_s']:8.1f} s, process wall {cold['outer_wall_s']:8.1f} s, process peak RSS "
            f"{cold['process_peak_rss_mb']:6.0f} MB, from cache {cold['cache_hits']}/{cold['n_stages']}"
        )
        print(
            f"rerun: flow {rerun['flow_time_s']:8.1f} s, process wall {rerun['outer_wall_s']:8.1f} s, process peak RSS "
            f"{rerun['process_peak_rss_mb']:6.0f} MB, from cache {rerun['cache_hits']}/{rerun['n_stages']}, "
            f"recomputed {rerun['recomputed'] or 'nothing'}"
        )
        print(
            f"rerun / cold: flow time {rerun['flow_time_s'] / cold['flow_time_s']:.3f} "
            f"({cold['flow_time_s'] / rerun['flow_time_s']:.1f}x faster), process wall "
            f"{rerun['outer_wall_s'] / cold['outer_wall_s']:.3f} ({cold['outer_wall_s'] / rerun['outer_wall_s']:.1f}x faster)"
        )
        print(f"(load average now {os.getloadavg()[0]:.1f})")
        if rerun["recomputed"]:
            sys.exit(f"the rerun recomputed {rerun['recomputed']}: the cache did not hold")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
