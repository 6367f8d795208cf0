"""Cache keys for pipeline stages.

A stage's key is a digest of its inputs (config sections, upstream artifact
digests) and of the source of every module the stage runs, plus its task
function in ``flows/stages.py`` and the helpers that write its record: Prefect's
TASK_SOURCE would hash only the task function itself, so a change in
``tasks/sft.py`` would not invalidate the SFT stage. The key also names the
stage's artifact folder, so the cached record and the files it points to
always agree, and a stage whose folder holds a finished record is reused even
when Prefect's result store was wiped.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from longshort.io import json_digest

# The modules whose code decides each stage's output: the stage task's imports in flows/stages.py (module-level
# and inside the function) and theirs, transitively, within flows/tasks/models/longshort; tests/test_caching.py
# recomputes that closure from the source and checks these lists cover it. Every stage writes through
# longshort.io (write_jsonl's bytes, the record's tree_digest) and all but score_shard read their inputs with
# tasks.synthesize.read_split, whose module also runs data.source teacher (models.generation -> models.factory);
# a change there recomputes synthesize, hence everything downstream, anyway.
_READ = ["longshort.io", "tasks.synthesize", "tasks.demo", "tasks.answers", "models.protocol", "models.generation", "models.factory"]  # fmt: skip
STAGE_MODULES: dict[str, list[str]] = {
    "synthesize": [*_READ],
    "sft_base": [*_READ, "tasks.base_model", "tasks.sft", "models.tokenizer"],
    "evaluate_base": [*_READ, "tasks.evaluate"],
    "chunk": [*_READ, "tasks.chunking"],  # models.generation: chunk.method llm
    "score_shard": ["longshort.io", "tasks.importance", "tasks.answers", "models.generation", "models.factory", "models.protocol"],  # fmt: skip
    "merge_scores": [*_READ, "tasks.importance"],
    "cold_start": [*_READ, "tasks.cold_start", "tasks.chunking"],
    "sft_long": [*_READ, "tasks.sft", "tasks.cold_start", "tasks.chunking"],
    "sft_short": [*_READ, "tasks.sft", "tasks.cold_start", "tasks.chunking"],
    "baseline": [*_READ, "tasks.baseline", "tasks.rewards", "tasks.evaluate", "tasks.sft"],
    "rl": [*_READ, "tasks.rl", "tasks.rl_checkpoint", "tasks.rewards", "tasks.sft", "tasks.intervals"],
    "evaluate": [*_READ, "tasks.report", "tasks.evaluate", "tasks.metrics", "tasks.intervals", "tasks.plots", "tasks.benchmarks", "tasks.importance"],  # fmt: skip
}


# The stage's own task in flows/stages.py (what its record holds: outputs, metrics, digests) and the
# helpers every stage runs through: a change there must not reuse records written by the old code.
STAGE_TASKS: dict[str, str] = {
    "synthesize": "synthesize_task", "sft_base": "sft_base_task", "evaluate_base": "evaluate_base_task",
    "chunk": "chunk_task", "score_shard": "score_shard_task", "merge_scores": "merge_scores_task",
    "cold_start": "cold_start_task", "sft_long": "sft_role_task", "sft_short": "sft_role_task",
    "baseline": "baseline_task", "rl": "rl_task", "evaluate": "evaluate_task",
}  # fmt: skip
STAGE_HELPERS = ("_run_stage", "_run_body")


def stage_sources(stage: str) -> dict[str, str]:
    """The source texts a stage's key covers: its modules (whole files) and its functions in ``flows.stages``."""
    sources = {m: inspect.getsource(importlib.import_module(m)) for m in sorted(STAGE_MODULES[stage])}
    stages = importlib.import_module("flows.stages")
    for name in (STAGE_TASKS[stage], *STAGE_HELPERS):
        obj = getattr(stages, name)
        sources[f"flows.stages:{name}"] = inspect.getsource(getattr(obj, "fn", obj))  # a Prefect task's function
    return sources


def code_digest(stage: str) -> str:
    return json_digest(stage_sources(stage))


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    return json_digest({"stage": stage, "inputs": inputs, "code": code_digest(stage)})


def stage_dir(workspace: Path, stage: str, key: str) -> Path:
    return Path(workspace) / "artifacts" / stage / key[:16]


def _key_from_inputs(task_ctx: Any, inputs: dict[str, Any]) -> str:
    return f"{task_ctx.task.name}-{inputs['key']}"


# Every stage task takes a ``key`` argument computed by ``stage_key``.
STAGE_CACHE: CachePolicy = CachePolicy.from_cache_key_fn(_key_from_inputs)
