"""The longshort pipeline, as the DESIGN diagram draws it.

    synthesize ─► sft_base ─► chunk ─► score (mapped shards) ─► cold_start ─► sft_long ─┐
                                                                            sft_short ─┴► rl ─► evaluate ─► track
                         └─► baseline (single-model GRPO, truncation recipe) ─────────────────────┘

Each stage is a cached Prefect task keyed on its inputs and code
(``flows.caching``); stages pass small records (paths, digests, metrics).
"""

from __future__ import annotations

import os
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.runtime import flow_run

from flows.caching import stage_dir, stage_key
from flows.runners import make_task_runner
from flows.stages import (
    baseline_task,
    chunk_llm,
    chunk_task,
    cold_start_limits,
    cold_start_task,
    evaluate_base_task,
    evaluate_task,
    file_digests,
    merge_scores_task,
    rl_task,
    score_shard_task,
    score_shards,
    sft_base_task,
    sft_role_task,
    shared_shard_backends,
    synthesize_task,
    track_task,
    version_data_task,
)
from longshort.config import Profile, RunConfig, load_profile
from longshort.preflight import preflight
from longshort.records import StageRecord


BASE_SYSTEM = "long-CoT base"  # the reference every other system is compared with (accuracy difference, token ratio)
BASELINE_SYSTEM = "truncation baseline"  # single-model GRPO, reward = correct and length <= L_T


@dataclass
class Progress:
    """The stages of this pipeline run that have finished, and the one running: what a failed run logs."""

    done: list[StageRecord] = field(default_factory=list)
    running: str | None = None

    def start(self, stage: str) -> None:
        self.running = stage

    def finish(self, record: StageRecord) -> None:
        self.done.append(record)
        self.running = None


_PROGRESS: ContextVar[Progress | None] = ContextVar("longshort_pipeline_progress", default=None)


def _progress() -> Progress:
    """This pipeline run's progress; a stage run outside ``pipeline`` (a test calling a subflow) gets a throwaway."""
    return _PROGRESS.get() or Progress()


def _stage(task_fn: Any, stage: str, workspace: Path, key_extra: dict[str, str] | None = None, **inputs: Any) -> StageRecord:
    """Run ``task_fn`` keyed on its inputs (and on ``key_extra``, e.g. digests of files it reads by path)."""
    key = _stage_key(stage, workspace, key_extra, inputs)
    out_dir = str(stage_dir(workspace, stage, key))
    # Prefect's cached result is the record of a folder; a folder removed by hand (to recompute the stage) has no
    # record left, and the stage runs again instead of returning a record of files that are gone
    refresh = StageRecord.load(Path(out_dir)) is None
    progress = _progress()
    progress.start(stage)
    record = task_fn.with_options(result_storage=workspace / "prefect-results", refresh_cache=refresh)(
        key=key, out_dir=out_dir, **inputs
    )
    progress.finish(record)
    return record


def _stage_key(stage: str, workspace: Path, key_extra: dict[str, str] | None, inputs: dict[str, Any]) -> str:
    """The key ``_stage`` runs a stage under: its inputs, the digests in ``key_extra`` and the workspace."""
    return stage_key(stage, {**inputs, **(key_extra or {}), "workspace": str(workspace)})


def _chunk_llm(cfg: Profile, base: StageRecord) -> dict[str, Any]:
    """``chunk.method: llm`` prompts the run's base model (DESIGN §3, Chunk); the rules need no model (and no
    extra input, so their cache key stays as it was)."""
    return {"llm": chunk_llm(cfg, base.outputs["model"])} if cfg.chunk.method == "llm" else {}


def _version_data(cfg: Profile, data: StageRecord) -> dict[str, str] | None:
    """Service profile (infra/services.py sets LONGSHORT_DVC_REMOTE): `dvc repro` the synthesize stage in this
    checkout and push it to S3, when it writes this run's data (params.yaml's `demo` = the profile's)."""
    from tasks.versioning import unversioned_reason  # noqa: PLC0415

    reason = unversioned_reason(cfg.section_dump("data"))
    if reason:
        get_run_logger().warning("dvc: this run's data are not versioned (%s); MLflow's data.* tags hold their digests", reason)
        return None
    outs = {"train": "data/demo/train.jsonl", "heldout": "data/demo/heldout.jsonl"}  # dvc.yaml's synthesize outs
    _progress().start("version_data")
    return version_data_task(["synthesize"], expect={out: data.outputs[split] for split, out in outs.items()})


def shards_run_one_at_a_time(run: RunConfig) -> bool:
    """Whether the score shards run one after another in the flow's process, so that they can share a backend:
    the thread runner with one worker. Dask/Ray run them in other processes; more threads run them at once."""
    return run.task_runner == "threads" and run.max_workers == 1


@flow(name="score")
def score_flow(cfg: Profile, ws: Path, chunks: StageRecord, model: StageRecord) -> tuple[StageRecord, list[StageRecord], str]:
    """Monte Carlo scoring fanned out over shards of traces with Prefect task mapping (a subflow, so
    that its task runner — threads, Dask or Ray — comes from the profile)."""
    shards, shared = score_shards(cfg, chunks, model)
    keys = [
        stage_key("score_shard", {"rows": rows, **shared, "model": model.digests["model"], "shard_no": i})
        for i, (_, rows) in enumerate(shards)
    ]
    out_dirs = [stage_dir(ws, "score_shard", k) for k in keys]
    refresh = any(StageRecord.load(d) is None for d in out_dirs)  # as in _stage; finished shards reuse their folders
    _progress().start("score_shard")
    with shared_shard_backends(enabled=shards_run_one_at_a_time(cfg.run)):  # one model load (one vLLM engine)
        futures = score_shard_task.with_options(result_storage=ws / "prefect-results", refresh_cache=refresh).map(
            key=keys,
            out_dir=[str(d) for d in out_dirs],
            rows=[rows for _, rows in shards],
            shard_no=list(range(len(shards))),
            **{name: unmapped(value) for name, value in shared.items()},
        )
        done = [f.result() for f in futures]
    by_split = {
        s: [r.outputs["scored"] for (split, _), r in zip(shards, done, strict=True) if split == s]
        for s in ("train", "heldout")
    }
    return _stage(merge_scores_task, "merge_scores", ws, shards=by_split), done, str(flow_run.id)


@flow(name="longshort-pipeline")
def pipeline(profile: str = "demo", overrides: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    cfg = load_profile(profile, overrides)
    preflight(cfg)  # a deployment's run fails here, in seconds, like `longshort run` does before Prefect starts
    progress = Progress()
    token = _PROGRESS.set(progress)
    try:
        return _run_stages(cfg, start)
    except BaseException as exc:
        _track_failure(cfg, progress, exc, time.perf_counter() - start)
        raise
    finally:
        _PROGRESS.reset(token)


def _track_failure(cfg: Profile, progress: Progress, error: BaseException, flow_time_s: float) -> None:
    """Log the failed run to MLflow (``tracking.log_failed_pipeline``); a tracking store that fails too is
    logged and the stage's own error is what the flow raises."""
    from longshort import tracking  # noqa: PLC0415

    logger = get_run_logger()
    if progress.running == "track":  # log_pipeline's own run ended FAILED; the store may be what failed
        return
    try:
        run_id = tracking.log_failed_pipeline(cfg, progress.done, progress.running, error, flow_time_s)
    except Exception as exc:  # noqa: BLE001 - the stage's error matters more than the log of it
        logger.warning("could not log the failed run to MLflow: %s: %s", type(exc).__name__, exc)
        return
    logger.error(
        "pipeline failed in %s after %d finished stages; MLflow run %s (status %s)",
        progress.running or "an unknown stage", len(progress.done), run_id, tracking.run_status(error),
    )  # fmt: skip


def _run_stages(cfg: Profile, start: float) -> dict[str, Any]:
    """The stages of ``pipeline``, in order, then the MLflow run of the whole."""
    logger = get_run_logger()
    ws, seed, base_model = cfg.run.workspace.resolve(), cfg.run.seed, cfg.section_dump("base_model")
    files = file_digests(cfg)  # each stage's key_extra

    data = _stage(
        synthesize_task, "synthesize", ws, key_extra=files["synthesize"],
        data=cfg.section_dump("data"), generation=cfg.section_dump("generation"), base_model=base_model, seed=seed,
    )  # fmt: skip
    versioned = _version_data(cfg, data) if os.environ.get("LONGSHORT_DVC_REMOTE") else None
    base = _stage(
        sft_base_task, "sft_base", ws, key_extra=files["sft_base"],
        train_path=data.outputs["train"], base_model=base_model,
        tokenizer=cfg.section_dump("tokenizer"), sft=cfg.section_dump("sft_base"), seed=seed,
    )  # fmt: skip
    base_eval = _stage(
        evaluate_base_task, "evaluate_base", ws,
        model_dir=base.outputs["model"], heldout_path=data.outputs["heldout"], base_model=base_model,
        generation=cfg.section_dump("generation"), evaluate=cfg.section_dump("evaluate"),
        protocol=cfg.section_dump("protocol"), seed=seed,
    )  # fmt: skip
    chunks = _stage(
        chunk_task, "chunk", ws,
        train_path=data.outputs["train"], heldout_path=data.outputs["heldout"], chunk=cfg.section_dump("chunk"),
        n_train=cfg.score.n_train_traces, n_heldout=cfg.score.n_heldout_traces, seed=seed,
        **_chunk_llm(cfg, base),
    )  # fmt: skip
    scored, shards, score_run = score_flow.with_options(task_runner=make_task_runner(cfg.run))(cfg, ws, chunks, base)
    cold = _stage(
        cold_start_task, "cold_start", ws,
        scored_path=scored.outputs["train"], train_path=data.outputs["train"], model_dir=base.outputs["model"],
        base_model=base_model, generation=cfg.section_dump("generation"),
        cold_start=cfg.section_dump("cold_start"), seed=seed, **cold_start_limits(cfg),
    )  # fmt: skip
    pair = {
        role: _stage(
            sft_role_task, f"sft_{role}", ws, key_extra=files[f"sft_{role}"],
            role=role, data_path=cold.outputs[role], model_dir=base.outputs["model"], base_model=base_model,
            sft=cfg.section_dump(f"sft_{role}"), seed=seed,
        )  # fmt: skip
        for role in ("long", "short")
    }
    rl = _stage(
        rl_task, "rl", ws,
        long_dir=pair["long"].outputs["model"], short_dir=pair["short"].outputs["model"],
        train_path=data.outputs["train"], base_model=base_model, protocol=cfg.section_dump("protocol"),
        rl=cfg.section_dump("rl"), n_problems=cfg.rl.n_problems, generation=cfg.section_dump("generation"),
    )  # fmt: skip
    baseline = (
        _stage(
            baseline_task, "baseline", ws, key_extra=files["baseline"],
            model_dir=base.outputs["model"], train_path=data.outputs["train"], base_model=base_model,
            generation=cfg.section_dump("generation"), baseline=cfg.section_dump("baseline"),
        )  # fmt: skip
        if cfg.baseline.enabled
        else None
    )
    systems = {
        BASE_SYSTEM: {"kind": "single", "model": base.outputs["model"]},
        **({BASELINE_SYSTEM: {"kind": "single", "model": baseline.outputs["model"]}} if baseline else {}),
        "Long⊗Short SFT": {"kind": "pair", "long": pair["long"].outputs["model"], "short": pair["short"].outputs["model"]},
        "Long⊗Short RL": {"kind": "pair", "long": rl.outputs["long"], "short": rl.outputs["short"]},
    }
    evaluation = _stage(
        evaluate_task, "evaluate", ws, key_extra=files["evaluate"],
        systems=systems, heldout_path=data.outputs["heldout"], scored_heldout=scored.outputs["heldout"],
        base_model=base_model, generation=cfg.section_dump("generation"), protocol=cfg.section_dump("protocol"),
        evaluate=cfg.section_dump("evaluate"), seed=seed, reference=BASE_SYSTEM,
    )  # fmt: skip

    trained = [pair["long"], pair["short"], rl, *([baseline] if baseline else [])]
    records = [data, base, base_eval, chunks, scored, cold, *trained, evaluation]
    this_run = str(flow_run.id) if flow_run.id else None
    computed = [r for r in [*records, *shards] if r.flow_run_id in (this_run, score_run)]
    cache_hits = len(records) + len(shards) - len(computed)
    _progress().start("track")
    tracked = track_task(
        cfg.model_dump(mode="json"), records, flow_time_s=time.perf_counter() - start, cache_hits=cache_hits
    )
    flow_time = time.perf_counter() - start
    logger.info("pipeline done in %.1f s; %d/%d tasks from cache", flow_time, cache_hits, len(records) + len(shards))
    return {
        "profile": cfg.run.name,
        "flow_time_s": round(flow_time, 2),
        "cache_hits": cache_hits,
        "n_stages": len(records) + len(shards),
        "stage_times_s": {r.stage: r.duration_s for r in records},
        "stage_peak_rss_mb": {r.stage: r.metrics.get("peak_rss_mb") for r in records},  # None: a record from before
        "stage_dirs": {r.stage: r.path for r in records},
        "recomputed": sorted({r.stage for r in computed}),
        "metrics": {k: v for r in records for k, v in r.metrics.items() if k != "peak_rss_mb"},
        "report": evaluation.outputs.get("results.md"),
        **tracked,
        **({"dvc_outputs": versioned} if versioned else {}),
    }
