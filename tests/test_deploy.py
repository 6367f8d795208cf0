"""Deployment: the work-pool job templates (infra/), ``python -m flows.deploy`` and the flow's own pre-flight.

The templates are rendered with Prefect's own code: ``BaseJobConfiguration.from_template_and_values``
(how every worker merges a pool's template, its defaults and a deployment's job variables) and
``apply_values``; where prefect-docker / prefect-kubernetes are installed, with their workers'
configuration classes too. Deploying and running the flow use the session's real Prefect server.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "infra" / "docker" / "base-job-template.json"
K8S = REPO / "infra" / "k8s" / "base-job-template.json"
SERVICE_ENV = ("MLFLOW_TRACKING_URI", "LONGSHORT_DVC_REMOTE", "LONGSHORT_S3_ENDPOINT_URL")


def _template(path: Path) -> dict[str, Any]:
    import jsonschema

    template = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    return template


def _render(template: dict[str, Any], values: dict[str, Any], cls: Any = None) -> Any:
    """The job configuration a worker builds for a flow run from ``template`` and a deployment's ``values``."""
    import jsonschema
    from prefect.workers.base import BaseJobConfiguration

    jsonschema.Draft202012Validator(template["variables"]).validate(values)  # what the server checks
    return asyncio.run((cls or BaseJobConfiguration).from_template_and_values(template, values, client=object()))


def _resolved(template: dict[str, Any], values: dict[str, Any], key: str) -> Any:
    """``job_configuration[key]`` with the variables' defaults and ``values`` applied."""
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    defaults = {k: v["default"] for k, v in props.items() if v.get("default") is not None}
    return apply_values(template["job_configuration"][key], {**defaults, **values})


def test_docker_template_passes_the_service_environment_to_the_container():
    template = _template(DOCKER)
    bare = _render(template, {}).env
    assert bare["LONGSHORT_REPO_DIR"] == "/opt/longshort" and bare["HF_HOME"] == "/cache/huggingface"
    assert not set(SERVICE_ENV) & set(bare)  # unset variables set nothing (the run falls back to the workspace's SQLite)

    values = {"mlflow_tracking_uri": "http://mlflow:5000", "dvc_remote": "s3://bucket/dvc",
              "s3_endpoint_url": "http://s3:8333", "env": {"LONGSHORT_RETRIES": "5"}}  # fmt: skip
    env = _render(template, values).env
    assert {k: env[k] for k in SERVICE_ENV} == {"MLFLOW_TRACKING_URI": "http://mlflow:5000",
                                                "LONGSHORT_DVC_REMOTE": "s3://bucket/dvc",
                                                "LONGSHORT_S3_ENDPOINT_URL": "http://s3:8333"}  # fmt: skip
    assert env["LONGSHORT_RETRIES"] == "5" and env["LONGSHORT_REPO_DIR"] == "/opt/longshort"  # merged, not replaced
    env = _render(template, {**values, "env": {"MLFLOW_TRACKING_URI": "http://other:5000"}}).env
    assert env["MLFLOW_TRACKING_URI"] == "http://other:5000"  # a deployment's env wins


def test_docker_template_mounts_a_persistent_workspace_and_hf_cache():
    template = _template(DOCKER)
    assert _resolved(template, {}, "volumes") == [
        "longshort-workspace:/opt/longshort/workspace",
        "longshort-hf-cache:/cache/huggingface",
        "/etc/longshort/aws:/root/.aws:ro",
    ]
    values = {"workspace_volume": "/srv/longshort/ws", "hf_home": "/hf"}
    assert _resolved(template, values, "volumes")[:2] == ["/srv/longshort/ws:/opt/longshort/workspace", "longshort-hf-cache:/hf"]
    assert _render(template, values).env["HF_HOME"] == "/hf"


def test_k8s_template_reads_the_secret_and_mounts_the_workspace_claim():
    template = _template(K8S)
    env = _render(template, {"env": {"EXTRA": "1"}}).env
    assert env["HF_HOME"] == "/cache/huggingface" and env["LONGSHORT_REPO_DIR"] == "/opt/longshort" and env["EXTRA"] == "1"
    manifest = _resolved(template, {"workspace_claim": "ws", "hf_home": "/hf"}, "job_manifest")
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "longshort-credentials", "optional": False}}]
    secret_doc = template["variables"]["properties"]["credentials_secret"]["description"]
    assert all(name in secret_doc for name in SERVICE_ENV)  # the service variables come from the Secret
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "ws"}} in pod["volumes"]
    assert {"name": "workspace", "mountPath": "/opt/longshort/workspace"} in container["volumeMounts"]
    assert {"name": "workspace", "mountPath": "/hf", "subPath": "hf-cache"} in container["volumeMounts"]
    assert not [v for v in pod["volumes"] if v["name"] != "dshm" and "emptyDir" in v]  # nothing that dies with the pod


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_templates_render_with_the_workers_own_configuration(kind):
    """With prefect-docker / prefect-kubernetes installed (the worker hosts), their job configurations accept the templates."""
    from prefect.client.schemas.objects import FlowRun

    if kind == "docker":
        worker = pytest.importorskip("prefect_docker.worker")
        cfg = _render(_template(DOCKER), {"mlflow_tracking_uri": "http://mlflow:5000"}, worker.DockerWorkerJobConfiguration)
    else:
        worker = pytest.importorskip("prefect_kubernetes.worker")
        cfg = _render(_template(K8S), {"gpu_count": 2}, worker.KubernetesWorkerJobConfiguration)
    cfg.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="fr", flow_id=uuid.uuid4(), deployment_id=uuid.uuid4()))
    if kind == "docker":
        assert cfg.env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert "longshort-workspace:/opt/longshort/workspace" in cfg.volumes
    else:
        container = cfg.job_manifest["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HF_HOME"] == "/cache/huggingface" and env["LONGSHORT_REPO_DIR"] == "/opt/longshort"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 2


# --- python -m flows.deploy --name, on a real Prefect server


def _pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


@pytest.mark.slow
def test_a_second_name_adds_a_deployment_instead_of_replacing_the_first(prefect_server, capsys):
    from prefect.client.orchestration import get_client

    from flows import deploy

    for pool in ("gpu", "gpu-second"):
        _pool(pool)
    deploy.main(["--repo", str(REPO), "--set", "profile=smoke"])
    deploy.main(["--repo", str(REPO), "--pool", "gpu-second", "--name", "longshort-pipeline-second"])
    again = deploy.deploy(REPO, parameters={"profile": "smoke"})  # the default name again: an update
    printed = dict(line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.startswith("deployment "))
    with get_client(sync_client=True) as client:
        first = client.read_deployment_by_name("longshort-pipeline/longshort-pipeline")
        second = client.read_deployment_by_name("longshort-pipeline/longshort-pipeline-second")
    assert str(first.id) == printed["longshort-pipeline"] == again
    assert str(second.id) == printed["longshort-pipeline-second"] != again
    assert (first.work_pool_name, second.work_pool_name) == ("gpu", "gpu-second")
    assert first.parameters["profile"] == "smoke" and second.parameters["profile"] == "demo"


def test_deploy_refuses_an_empty_name(capsys):
    from flows import deploy

    with pytest.raises(SystemExit) as exited:
        deploy.main(["--name", " "])
    assert exited.value.code == 2 and "--name must not be empty" in capsys.readouterr().err


# --- the flow checks its inputs before any stage, also when a deployment (not `longshort run`) starts it


@pytest.mark.slow
def test_the_flow_itself_fails_fast_on_a_bad_profile(prefect_server, tmp_path):
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import pipeline

    data = tmp_path / "traces.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "answer": "2", "response": "<think>2</think>"}) + "\n{oops}\n")
    workspace = tmp_path / "ws"
    cases = [(["data.source=traces", f"data.path={data}", "cold_start.compressor=verbatim"], f"{data}:2: not valid JSON")]
    if importlib.util.find_spec("prefect_dask") is None:
        cases.append((["run.task_runner=dask"], "prefect-dask is not installed"))
    for overrides, message in cases:
        state = pipeline(profile="smoke", overrides=[*overrides, f"run.workspace={workspace}"], return_state=True)
        assert state.is_failed()
        with pytest.raises(Exception, match=message.replace("[", r"\[")) as failed:
            state.result()
        assert type(failed.value).__name__ in ("ConfigError", "DataError"), failed.value
        assert not workspace.exists()  # no stage ran
    APILogHandler().flush()  # send the failed runs' logs while the server is up, not at exit after it stopped
