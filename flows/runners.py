"""Task runners for mapped stages: local threads by default, a Dask or Ray cluster when configured.

prefect-dask and prefect-ray are not dependencies of longshort: install the one
your cluster runs (``pip install prefect-dask`` / ``prefect-ray``) on the
machines that run flows, and set ``run.task_runner`` and ``run.cluster_address``.
"""

from __future__ import annotations

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from longshort.config import ConfigError, RunConfig


def make_task_runner(cfg: RunConfig) -> TaskRunner:
    if cfg.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=cfg.max_workers)
    try:
        if cfg.task_runner == "dask":
            from prefect_dask import DaskTaskRunner  # noqa: PLC0415 - optional

            return DaskTaskRunner(address=cfg.cluster_address) if cfg.cluster_address else DaskTaskRunner()
        from prefect_ray import RayTaskRunner  # noqa: PLC0415 - optional

        return RayTaskRunner(address=cfg.cluster_address) if cfg.cluster_address else RayTaskRunner()
    except ImportError as exc:
        raise ConfigError(
            f"run.task_runner is '{cfg.task_runner}' but prefect-{cfg.task_runner} is not installed: "
            f"pip install prefect-{cfg.task_runner}"
        ) from exc
