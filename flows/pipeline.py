"""The longshort pipeline, as the DESIGN diagram draws it.

    synthesize ──► sft_base ──► evaluate_base ──► track (MLflow run + registry)

Each stage is a cached Prefect task keyed on its inputs and code
(``flows.caching``); stages pass small records (paths, digests, metrics).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.caching import stage_dir, stage_key
from flows.stages import evaluate_base_task, sft_base_task, synthesize_task, track_task
from longshort.config import load_profile
from longshort.records import StageRecord


def _stage(task_fn: Any, stage: str, workspace: Path, **inputs: Any) -> StageRecord:
    key = stage_key(stage, {**inputs, "workspace": str(workspace)})
    out_dir = str(stage_dir(workspace, stage, key))
    storage = workspace / "prefect-results"
    return task_fn.with_options(result_storage=storage)(key=key, out_dir=out_dir, **inputs)


@flow(name="longshort-pipeline")
def pipeline(profile: str = "demo", overrides: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    logger = get_run_logger()
    cfg = load_profile(profile, overrides)
    ws = cfg.run.workspace.resolve()
    seed = cfg.run.seed

    data = _stage(
        synthesize_task, "synthesize", ws,
        data=cfg.section_dump("data"), generation=cfg.section_dump("generation"),
        base_model=cfg.section_dump("base_model"), seed=seed,
    )  # fmt: skip
    base = _stage(
        sft_base_task, "sft_base", ws,
        train_path=data.outputs["train"], base_model=cfg.section_dump("base_model"),
        tokenizer=cfg.section_dump("tokenizer"), sft=cfg.section_dump("sft_base"), seed=seed,
    )  # fmt: skip
    evaluation = _stage(
        evaluate_base_task, "evaluate_base", ws,
        model_dir=base.outputs["model"], heldout_path=data.outputs["heldout"],
        base_model=cfg.section_dump("base_model"), generation=cfg.section_dump("generation"),
        evaluate=cfg.section_dump("evaluate"), seed=seed,
    )  # fmt: skip

    records = [data, base, evaluation]
    this_run = str(flow_run.id) if flow_run.id else None
    cache_hits = sum(r.flow_run_id != this_run for r in records)
    stages_time = time.perf_counter() - start
    tracked = track_task(cfg.model_dump(mode="json"), records, flow_time_s=stages_time, cache_hits=cache_hits)
    flow_time = time.perf_counter() - start
    logger.info("pipeline done in %.1f s; %d/%d stages from cache", flow_time, cache_hits, len(records))
    return {
        "profile": cfg.run.name,
        "flow_time_s": round(flow_time, 2),
        "cache_hits": cache_hits,
        "n_stages": len(records),
        "stage_times_s": {r.stage: r.duration_s for r in records},
        "metrics": {k: v for r in records for k, v in r.metrics.items()},
        **tracked,
    }
