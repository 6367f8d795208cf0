"""Prefect tasks: each wraps one plain stage function with caching, logging and a record.

A task receives JSON-able config sections and upstream paths, plus ``key`` and
``out_dir`` computed by ``flows.caching``; it returns a small StageRecord.
Nothing here implements an algorithm: that lives in ``tasks/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.caching import STAGE_CACHE
from longshort.config import (
    DataConfig,
    EvaluateConfig,
    GenerationConfig,
    ModelConfig,
    Profile,
    SFTConfig,
    TokenizerConfig,
)
from longshort.io import tree_digest, write_jsonl
from longshort.records import StageRecord


def _run_stage(stage: str, key: str, out_dir: str, body: Callable[[Path], dict[str, Any]]) -> StageRecord:
    """Reuse a finished folder, else run ``body`` and save its record last."""
    logger = get_run_logger()
    done = StageRecord.load(Path(out_dir))
    if done is not None:
        logger.info("%s: reusing finished artifacts in %s", stage, out_dir)
        return done
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fields = body(Path(out_dir))
    record = StageRecord(
        stage=stage,
        key=key,
        path=out_dir,
        flow_run_id=str(flow_run.id) if flow_run.id else None,
        duration_s=round(time.perf_counter() - start, 3),
        **fields,
    )
    record.save()
    logger.info("%s: done in %.1f s; metrics %s", stage, record.duration_s, record.metrics)
    return record


@task(name="synthesize", cache_policy=STAGE_CACHE, persist_result=True)
def synthesize_task(
    key: str, out_dir: str, data: dict, generation: dict, base_model: dict, seed: int
) -> StageRecord:
    from tasks.synthesize import synthesize  # noqa: PLC0415 - keep flow import light

    def body(folder: Path) -> dict[str, Any]:
        files = synthesize(
            DataConfig.model_validate(data),
            folder,
            GenerationConfig.model_validate(generation),
            ModelConfig.model_validate(base_model),
            seed=seed,
        )
        return {
            "outputs": {"train": files.train, "heldout": files.heldout},
            "digests": {"train_md5": files.train_md5, "heldout_md5": files.heldout_md5},
            "metrics": {"n_train": files.n_train, "n_heldout": files.n_heldout},
        }

    return _run_stage("synthesize", key, out_dir, body)


@task(name="sft_base", cache_policy=STAGE_CACHE, persist_result=True)
def sft_base_task(
    key: str, out_dir: str, train_path: str, base_model: dict, tokenizer: dict, sft: dict, seed: int
) -> StageRecord:
    from tasks.base_model import train_base_model  # noqa: PLC0415
    from tasks.synthesize import read_split  # noqa: PLC0415

    def body(folder: Path) -> dict[str, Any]:
        result = train_base_model(
            read_split(train_path),
            ModelConfig.model_validate(base_model),
            TokenizerConfig.model_validate(tokenizer),
            SFTConfig.model_validate(sft),
            folder,
            seed=seed,
        )
        return {
            "outputs": {"model": result.model_dir},
            "digests": {"model": tree_digest(Path(result.model_dir))},
            "metrics": {
                "train_loss": result.train_loss,
                "train_steps": result.steps,
                "train_runtime_s": result.train_runtime_s,
                "train_tokens_per_s": result.train_tokens / max(result.train_runtime_s, 1e-9),
            },
        }

    return _run_stage("sft_base", key, out_dir, body)


@task(name="evaluate_base", cache_policy=STAGE_CACHE, persist_result=True)
def evaluate_base_task(
    key: str,
    out_dir: str,
    model_dir: str,
    heldout_path: str,
    base_model: dict,
    generation: dict,
    evaluate: dict,
    seed: int,
) -> StageRecord:
    from models.generation import make_backend  # noqa: PLC0415
    from tasks.evaluate import evaluate_single_model  # noqa: PLC0415
    from tasks.synthesize import read_split  # noqa: PLC0415

    def body(folder: Path) -> dict[str, Any]:
        cfg = EvaluateConfig.model_validate(evaluate)
        rows = read_split(heldout_path)[: cfg.n_problems]
        backend = make_backend(
            model_dir, ModelConfig.model_validate(base_model), GenerationConfig.model_validate(generation), seed
        )
        think, think_records = evaluate_single_model(backend, rows, think=True, max_new_tokens=cfg.max_new_tokens)
        direct, direct_records = evaluate_single_model(backend, rows, think=False, max_new_tokens=64)
        write_jsonl(folder / "episodes_think.jsonl", think_records)
        write_jsonl(folder / "episodes_nothink.jsonl", direct_records)
        return {
            "outputs": {"think": str(folder / "episodes_think.jsonl"), "nothink": str(folder / "episodes_nothink.jsonl")},
            "metrics": {**think.metrics("base_"), **direct.metrics("base_nothink_")},
        }

    return _run_stage("evaluate_base", key, out_dir, body)


@task(name="track", cache_policy=NO_CACHE)
def track_task(profile: dict, records: list[StageRecord], flow_time_s: float, cache_hits: int) -> dict[str, Any]:
    """Log the run to MLflow and register the base model (idempotent by model digest)."""
    from longshort import tracking  # noqa: PLC0415

    cfg = Profile.model_validate(profile)
    return tracking.log_pipeline(cfg, records, flow_time_s=flow_time_s, cache_hits=cache_hits)
