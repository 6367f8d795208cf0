"""What a pipeline run needs from outside, checked before any stage: a bad input fails in seconds, writing nothing.

Both ways a run starts call :func:`preflight`: ``longshort run`` / ``longshort evaluate`` before Prefect
starts (so a bad profile never starts a server), and the flow ``longshort-pipeline`` itself at its top,
so a deployment's run on a work pool fails as fast, with the same message, before its first stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from longshort.config import Profile, RunConfig

log = logging.getLogger(__name__)


def preflight(cfg: Profile) -> None:
    """Check the optional packages the profile asks for, the local data and benchmark files (every row) and the
    MLflow tracking server. Raises ConfigError, DataError, FileNotFoundError or ServiceUnavailable."""
    import importlib.util  # noqa: PLC0415

    from longshort.config import ConfigError  # noqa: PLC0415
    from longshort.tracking import require_tracking_server, tracking_uri  # noqa: PLC0415
    from tasks.benchmarks import is_local_source, load_benchmark  # noqa: PLC0415
    from tasks.synthesize import load_problems  # noqa: PLC0415

    runner = cfg.run.task_runner
    if runner != "threads" and importlib.util.find_spec(f"prefect_{runner}") is None:
        raise ConfigError(f"run.task_runner is '{runner}' but prefect-{runner} is not installed: pip install prefect-{runner}")
    from models.generation import resolve_backend  # noqa: PLC0415

    if problem := shard_parallelism_problem(cfg.run, resolve_backend(cfg.generation)):
        raise ConfigError(problem)
    if cfg.data.source != "demo" and cfg.data.path:
        load_problems(cfg.data, need_response=cfg.data.source == "traces")
    for bench in cfg.evaluate.benchmarks:
        if is_local_source(bench.source):
            load_benchmark(bench.source, split=bench.split, limit=bench.limit, name=bench.name)
    for where, hub_id in unpinned_hub_sources(cfg):
        log.warning("%s %s has no revision: cached stages keep what it gave if it changes upstream; pin a commit", where, hub_id)
    require_tracking_server(tracking_uri(cfg.tracking, cfg.run.workspace.resolve()))


def unpinned_hub_sources(cfg: Profile) -> list[tuple[str, str]]:
    """``(field, hub id)`` of the hub datasets and the teacher model the profile reads without a revision: their cache
    keys hold the id only, so a dataset or teacher that changes upstream is not read again."""
    from tasks.benchmarks import is_local_source  # noqa: PLC0415

    out = []
    if cfg.data.source != "demo" and cfg.data.hub_id and not cfg.data.path and not cfg.data.revision:
        out.append(("data.hub_id", cfg.data.hub_id))
    teacher = cfg.data.teacher
    if cfg.data.source == "teacher" and teacher and not Path(teacher).exists() and not cfg.data.teacher_revision:
        out.append(("data.teacher", teacher))
    out += [
        (f"evaluate.benchmarks[{i}].source", b.source)
        for i, b in enumerate(cfg.evaluate.benchmarks)
        if not b.revision and not is_local_source(b.source)
    ]
    return out


def shard_parallelism_problem(run: RunConfig, backend: str) -> str | None:
    """Why the scoring shards cannot run side by side on this machine, or None.

    Each mapped shard builds its own generation backend. A vLLM engine claims
    ``generation.gpu_memory_utilization`` of the GPU, so two shards on one machine (threads, or a
    Dask/Ray cluster started locally) start two engines on one GPU and the second fails minutes in.
    A cluster at ``run.cluster_address`` places its workers on their own GPUs.
    """
    if backend != "vllm":
        return None
    if run.task_runner == "threads" and run.max_workers > 1:
        return (f"run.max_workers is {run.max_workers} with the vLLM backend: each scoring shard would start its own "
                "engine on the one GPU; use 1 (vLLM batches a shard's rollouts itself) or a cluster (run.cluster_address)")  # fmt: skip
    if run.task_runner != "threads" and not run.cluster_address:
        return (f"run.task_runner is '{run.task_runner}' without run.cluster_address and the backend is vLLM: a local "
                "cluster runs several shards, each with its own engine, on the one GPU; set run.cluster_address or use threads")  # fmt: skip
    return None
