"""Register the ``longshort-pipeline`` deployment from Python: what ``prefect deploy`` does with prefect.yaml.

    python -m flows.deploy [--repo DIR] [--pool POOL] [--name NAME] [--set profile=smoke]

The deployment's name, entrypoint, work pool, default parameters and (inactive)
schedule are read from ``prefect.yaml``, so the two paths cannot drift. The flow
is loaded with ``Flow.from_source`` from a local checkout: no image is built, and
the deployment's pull step sets the working directory to that checkout, which
must exist at the same path on the machine of the worker that runs it (a process
worker on this machine, or a GPU host with the repository at the same path).
For a Kubernetes or Docker pool, bake the repository into an image instead (infra/README.md).

``--name`` gives the deployment another name (default prefect.yaml's ``longshort-pipeline``):
a deployment is identified by flow and name, so a second one on another pool
(``--pool gpu-k8s --name longshort-pipeline-k8s``) sits beside the first instead of replacing it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
PREFECT_FILE = REPO / "prefect.yaml"
DEPLOYMENT = "longshort-pipeline"


def deployment_spec(prefect_file: Path = PREFECT_FILE, name: str = DEPLOYMENT) -> dict[str, Any]:
    """The entry of ``deployments:`` in prefect.yaml called ``name``."""
    config = yaml.safe_load(Path(prefect_file).read_text()) or {}
    for spec in config.get("deployments") or []:
        if spec.get("name") == name:
            return spec
    raise ValueError(f"{prefect_file}: no deployment named {name!r} under 'deployments'")


def _schedules(spec: dict[str, Any]) -> list[Any]:
    from prefect.schedules import Cron, Interval  # noqa: PLC0415

    out = []
    for item in spec.get("schedules") or []:
        common = {"timezone": item.get("timezone"), "active": item.get("active", True)}
        if "cron" in item:
            out.append(Cron(item["cron"], **common))
        elif "interval" in item:
            out.append(Interval(item["interval"], **common))
        else:
            raise ValueError(f"prefect.yaml: schedule {item} needs 'cron' or 'interval'")
    return out


def deploy(
    repo_dir: Path | None = None,
    *,
    parameters: dict[str, Any] | None = None,
    work_pool: str | None = None,
    name: str | None = None,
    prefect_file: Path = PREFECT_FILE,
) -> str:
    """Create or update the deployment on the Prefect API in ``PREFECT_API_URL``; return its id.

    ``repo_dir``: the checkout flow runs start in (default: ``$LONGSHORT_REPO_DIR``, else this
    repository); ``parameters`` override prefect.yaml's defaults (e.g. ``{"profile": "smoke"}``);
    ``name``: the deployment's name (default prefect.yaml's); a deployment of the same flow with the
    same name is updated, one with another name is left alone.
    """
    from prefect import Flow  # noqa: PLC0415

    spec = deployment_spec(prefect_file)
    source = Path(repo_dir or os.environ.get("LONGSHORT_REPO_DIR") or REPO).resolve()
    pipeline = Flow.from_source(source=str(source), entrypoint=spec["entrypoint"])
    deployment_id = pipeline.deploy(
        name=name or spec["name"],
        work_pool_name=work_pool or spec["work_pool"]["name"],
        work_queue_name=spec["work_pool"].get("work_queue_name"),
        job_variables=spec["work_pool"].get("job_variables") or {},
        parameters={**(spec.get("parameters") or {}), **(parameters or {})},
        schedules=_schedules(spec),
        description=spec.get("description"),
        tags=spec.get("tags") or [],
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,  # a process pool is exactly what we mean here
    )
    return str(deployment_id)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=None, help="checkout the worker runs flows from")
    parser.add_argument("--pool", default=None, help="work pool (default: prefect.yaml's, 'gpu')")
    parser.add_argument("--name", default=None,
                        help=f"deployment name (default: {DEPLOYMENT}); another name adds a deployment instead of replacing it")
    parser.add_argument("--set", dest="params", action="append", default=[], help="parameter, e.g. profile=smoke")
    args = parser.parse_args(argv)
    if bad := [p for p in args.params if "=" not in p]:
        parser.error(f"--set needs name=value, got {bad}")
    params = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.params)}
    if args.name is not None and not args.name.strip():
        parser.error("--name must not be empty")
    deployment_id = deploy(args.repo, parameters=params, work_pool=args.pool, name=args.name)
    print(f"deployment {args.name or DEPLOYMENT} {deployment_id}")  # noqa: T201 - CLI output


if __name__ == "__main__":
    main()
