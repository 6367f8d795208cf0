"""The service profile end to end, on real servers bound to 127.0.0.1 (DESIGN §7).

infra/services.py starts PostgreSQL, SeaweedFS (S3), an MLflow server, a Prefect
server and a process worker on the pool `gpu` in temporary folders; the worker
runs flows from a scratch git copy of this working tree. One run of the
deployment `longshort-pipeline` (smoke profile) goes through the Prefect API and
the worker; the tests then check each store it wrote to, that DVC's copy of the
data comes back byte for byte in a fresh clone, that a Long⊗Short pair built
from the run's model registers, promotes (and is refused when it should be) and
is served by `mlflow models serve`, and that the S3 secret leaked nowhere.
Everything is stopped by its PID at the end, also when a test fails.

The pipeline registers its own trained pair (checked below); the two candidates that
the promotion tests compare are built from the run's long-CoT model in both roles with
two turn budgets, so that one is measurably cheaper than the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # infra/ is not an installed package
from infra import services  # noqa: E402

pytestmark = [pytest.mark.services, pytest.mark.timeout(1500)]

FLOW_TIMEOUT_S = 900
DEPLOYMENT = "longshort-pipeline/longshort-pipeline"


@dataclass
class Stack:
    state: services.ServiceState
    env: dict[str, str]  # what `python -m infra.services env` prints
    repo: Path  # the worker's checkout
    workspace: Path  # run.workspace of the flow run
    tmp: Path
    flow_run: Any = None
    logs: list[str] | None = None


def _git(repo: Path, *args: str) -> str:
    identity = ["-c", "user.name=longshort-test", "-c", "user.email=test@localhost", "-c", "init.defaultBranch=main"]
    done = subprocess.run(["git", *identity, *args], cwd=repo, capture_output=True, text=True, timeout=120)
    if done.returncode not in (0, 1) or (done.returncode == 1 and args[0] != "grep"):
        raise AssertionError(f"git {' '.join(args)} in {repo} failed: {done.stderr}")
    return done.stdout


def _scratch_checkout(dest: Path) -> Path:
    """A git repository with this working tree's files (committed and new, not ignored)."""
    for rel in _git(REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0"):
        if rel and (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "scratch copy of the working tree")
    return dest


def _flow_run_logs(flow_run_id: Any) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                limit=200, offset=len(messages), sort=LogSort.TIMESTAMP_ASC,
            )  # fmt: skip
            messages += [entry.message for entry in page]
            if len(page) < 200:
                return messages


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    if services.find_postgres_bin() is None:
        message = "PostgreSQL server binaries (initdb, postgres) not found; infra/ensure-postgres.sh installs them"
        if os.environ.get("LONGSHORT_REQUIRE_SERVICES") or os.environ.get("CI"):
            pytest.fail(message)  # CI must run this suite, never skip it quietly
        pytest.skip(message)
    tmp = tmp_path_factory.mktemp("services")
    repo = _scratch_checkout(tmp / "checkout")
    # DVC versions params.yaml's demo split; make it the smoke profile's, the data the deployed run trains on
    from longshort.config import load_profile

    smoke = load_profile("smoke").data.demo.model_dump(mode="json")
    (repo / "params.yaml").write_text(yaml.safe_dump({"profile": "smoke", "demo": smoke}))
    _git(repo, "commit", "-q", "-am", "params: the smoke profile's data")
    state_dir = tmp / "state"
    try:
        state = services.up(
            state_dir, repo_dir=repo, prefect_ui=False, timeout_s=300,
            worker_env={"PREFECT_WORKER_QUERY_SECONDS": "2"},  # pick the run up quickly
        )  # fmt: skip
        yield Stack(state=state, env=services.client_env(state_dir), repo=repo, workspace=tmp / "workspace", tmp=tmp)
    finally:
        services.down(state_dir, purge=True)


@pytest.fixture(scope="module")
def deployed_run(stack: Stack) -> Stack:
    """Deploy `longshort-pipeline` to the pool `gpu` and run it (smoke profile) through the worker."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import deploy

    with temporary_settings(updates={PREFECT_API_URL: stack.env["PREFECT_API_URL"]}):
        deploy(stack.repo, parameters={"profile": "smoke"})
        stack.flow_run = run_deployment(
            DEPLOYMENT,
            parameters={"profile": "smoke", "overrides": [f"run.workspace={stack.workspace}"]},
            timeout=FLOW_TIMEOUT_S, poll_interval=2,
        )  # fmt: skip
        # the flow-run process ships its last log lines as it exits
        deadline = time.monotonic() + 30
        while True:
            stack.logs = _flow_run_logs(stack.flow_run.id)
            # tasks log "Finished in state" too: wait for the flow's own last line
            if any("pipeline done" in m for m in stack.logs) or time.monotonic() > deadline:
                break
            time.sleep(1)
    return stack


def _mlflow_client(stack: Stack):
    from mlflow.tracking import MlflowClient

    uri = stack.env["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _pipeline_run(stack: Stack):
    client = _mlflow_client(stack)
    experiment = client.get_experiment_by_name("longshort-smoke")
    runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'pipeline-smoke'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return experiment, runs[0]


def _bucket_keys(stack: Stack, prefix: str) -> set[str]:
    s3 = services.s3_client(stack.state, stack.env["AWS_ACCESS_KEY_ID"], stack.env["AWS_SECRET_ACCESS_KEY"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=services.BUCKET, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def test_every_service_listens_on_loopback_only(stack: Stack):
    import psutil

    listening = set()
    for name in services.SERVICES:
        leader = psutil.Process(services.Layout(stack.state.state_dir).read_pid(name))
        for proc in (leader, *leader.children(recursive=True)):
            listening |= {(c.laddr.ip, c.laddr.port) for c in proc.net_connections("inet") if c.status == "LISTEN"}
    assert {ip for ip, _ in listening} == {"127.0.0.1"}
    assert set(stack.state.ports.values()) <= {port for _, port in listening}


def test_the_worker_on_pool_gpu_completes_the_deployment_run(deployed_run: Stack):
    run = deployed_run.flow_run
    layout = services.Layout(deployed_run.state.state_dir)
    worker_log, s3_log = layout.log("worker"), layout.log("seaweedfs")
    assert run.state.is_completed(), (
        f"flow run ended {run.state.type}: {run.state.message}\n"
        + "\n".join(deployed_run.logs[-30:]) + f"\n--- {worker_log}:\n" + services._tail(worker_log, 60)
        + f"\n--- {s3_log}:\n" + services._tail(s3_log, 15)
    )  # fmt: skip
    assert run.work_pool_name == "gpu" and run.parameters["profile"] == "smoke"
    assert any(m.startswith("dvc: pushed ['synthesize']") for m in deployed_run.logs)
    assert any("pipeline done" in m for m in deployed_run.logs)


def test_mlflow_server_holds_the_run_in_postgres_and_the_model_in_s3(deployed_run: Stack, tmp_path: Path):
    import mlflow
    import psycopg2

    client = _mlflow_client(deployed_run)
    experiment, run = _pipeline_run(deployed_run)
    assert run.info.status == "FINISHED" and run.data.params["data.demo.n_train"] == "48"
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server chose it, clients proxy
    version = client.get_model_version("longshort-base", "1")
    assert version.tags["run_id"] == run.info.run_id
    assert run.data.tags["registered.base_model"] == "longshort-base/1"

    with psycopg2.connect(host=services.HOST, port=deployed_run.state.ports["postgres"], user=services.DB_USER,
                          dbname="mlflow") as conn, conn.cursor() as cur:  # fmt: skip
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cur.fetchall() == [("FINISHED",)]
        cur.execute("SELECT version FROM model_versions WHERE name = 'longshort-base'")
        assert cur.fetchall() == [(1,)]

    location = client.get_model_version_download_uri("longshort-base", "1")
    assert location.startswith("mlflow-artifacts:/"), location
    prefix = f"mlflow/{location.split(':/', 1)[1].strip('/')}/"
    keys = _bucket_keys(deployed_run, prefix)
    assert f"{prefix}MLmodel" in keys and any(k.endswith(".safetensors") for k in keys), sorted(keys)
    # read back through the server, with no S3 credentials in this process
    mlmodel = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{location}/MLmodel", dst_path=str(tmp_path),
        tracking_uri=deployed_run.env["MLFLOW_TRACKING_URI"],
    )  # fmt: skip
    assert "transformers" in Path(mlmodel).read_text()


def test_dvc_pushed_the_data_and_a_fresh_clone_pulls_it_back(deployed_run: Stack, monkeypatch: pytest.MonkeyPatch):
    from tasks import versioning

    repo = deployed_run.repo
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for o in lock["stages"]["synthesize"]["outs"]}
    assert set(outs) == {"data/demo/train.jsonl", "data/demo/heldout.jsonl"}
    keys = _bucket_keys(deployed_run, "dvc/")
    assert {f"dvc/files/md5/{md5[:2]}/{md5[2:]}" for md5 in outs.values()} <= keys
    synthesized = _stage_records(deployed_run)["synthesize"].digests  # the run's own data: the same bytes
    assert outs == {"data/demo/train.jsonl": synthesized["train_md5"], "data/demo/heldout.jsonl": synthesized["heldout_md5"]}

    _git(repo, "add", "dvc.lock")
    _git(repo, "commit", "-q", "-m", "data: synthesize")
    fresh = deployed_run.tmp / "fresh-clone"
    _git(deployed_run.tmp, "clone", "-q", str(repo), str(fresh))
    assert not (fresh / "data").exists()
    for key, value in deployed_run.env.items():
        monkeypatch.setenv(key, value)
    versioning.configure_remote(fresh, versioning.Remote.from_env())
    versioning.pull(fresh, ["synthesize"])  # the stage the flow versioned (the others need a trained model)
    for path, md5 in outs.items():
        pulled = (fresh / path).read_bytes()
        assert pulled == (repo / path).read_bytes()
        assert hashlib.md5(pulled).hexdigest() == md5


@dataclass
class PairRun:
    first: Any  # registry.PairVersions, promoted
    second: Any  # registry.PairVersions, refused
    metrics: list[dict[str, float]]
    refusal: str
    answer: dict[str, Any]  # what the served model returned
    tracking_uri: str  # the MLflow server's


def _stage_records(stack: Stack) -> dict[str, Any]:
    from longshort.records import StageRecord

    client = _mlflow_client(stack)
    experiment, run = _pipeline_run(stack)
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    return {r.data.tags["stage"]: StageRecord.load(Path(r.data.tags["artifact_dir"])) for r in children}


def _serve_and_ask(stack: Stack, problem: str) -> dict[str, Any]:
    """`mlflow models serve` the @production pair (no S3 credentials: artifacts come through the server)."""
    import urllib.request

    from conftest import free_port, stop_pid, wait_http

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"MLFLOW_TRACKING_URI": stack.env["MLFLOW_TRACKING_URI"], "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}  # it execs the venv's uvicorn
    argv = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/longshort-pair@production",
            "--env-manager", "local", "--host", services.HOST, "--port", str(port), "--workers", "1"]  # fmt: skip
    log_path = stack.tmp / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_http(f"http://{services.HOST}:{port}/ping", 240, proc)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{services._tail(log_path, 40)}") from exc
        body = json.dumps({"dataframe_records": [{"problem": problem}]}).encode()
        request = urllib.request.Request(f"http://{services.HOST}:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())
    finally:
        stop_pid(proc)


@pytest.fixture(scope="module")
def pair_run(deployed_run: Stack) -> PairRun:
    """Two pair candidates from the run's model, measured on held-out problems; promote both; serve @production."""
    import mlflow

    from longshort import registry
    from longshort.config import GenerationConfig, ProtocolConfig
    from models.pair import LongShortPair, PairSettings, pair_metrics
    from tasks.synthesize import read_split

    records = _stage_records(deployed_run)
    model_dir = records["sft_base"].outputs["model"]
    rows = read_split(records["synthesize"].outputs["heldout"])[:8]
    # the second candidate may think twice as long: on this model that costs tokens, so the gate must refuse it
    settings = [
        PairSettings(generation=GenerationConfig(backend="transformers", batch_size=8),
                     protocol=ProtocolConfig(max_turns=2, max_new_tokens_long=budget, max_new_tokens_short=16))
        for budget in (24, 48)
    ]  # fmt: skip
    metrics = []
    for i, pair_settings in enumerate(settings):
        config = deployed_run.tmp / f"pair-{i}.json"
        config.write_text(pair_settings.model_dump_json())
        episodes = LongShortPair().load(model_dir, model_dir, config).solve([r["problem"] for r in rows])
        metrics.append(pair_metrics(episodes, [r["answer"] for r in rows]))
    assert metrics[1]["pair_mean_tokens"] > metrics[0]["pair_mean_tokens"], metrics

    uri = deployed_run.env["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment("longshort-smoke")
    _, pipeline_run = _pipeline_run(deployed_run)
    tags = {k: v for k, v in pipeline_run.data.tags.items() if k.startswith("data.") or k in ("profile", "git_commit")}
    versions = []
    try:
        for i, (pair_settings, measured) in enumerate(zip(settings, metrics)):
            with mlflow.start_run(run_name=f"pair-candidate-{i + 1}"):
                versions.append(registry.register_pair(model_dir, model_dir, measured, tags, settings=pair_settings))
        assert registry.production() is None, "the pipeline is expected to register, not promote"
        registry.promote(versions[0].run_id)
        with pytest.raises(registry.PromotionRefused) as refused:
            registry.promote(versions[1].run_id)
    finally:
        mlflow.set_tracking_uri(None)
    answer = _serve_and_ask(deployed_run, rows[0]["problem"])
    return PairRun(versions[0], versions[1], metrics, str(refused.value), answer, deployed_run.env["MLFLOW_TRACKING_URI"])


def test_pair_versions_and_the_production_alias_live_in_postgres_and_s3(deployed_run: Stack, pair_run: PairRun):
    import psycopg2

    from longshort import registry

    first, second = pair_run.first, pair_run.second
    assert int(second.pair) == int(first.pair) + 1 and first.long == second.long  # same weights: one long version
    with psycopg2.connect(host=services.HOST, port=deployed_run.state.ports["postgres"], user=services.DB_USER,
                          dbname="mlflow") as conn, conn.cursor() as cur:  # fmt: skip
        cur.execute("SELECT name, version FROM model_versions")
        stored = set(cur.fetchall())
        cur.execute("SELECT name, alias, version FROM registered_model_aliases")
        aliases = cur.fetchall()
    expected = {("longshort-base", 1), ("longshort-long", int(first.long)), ("longshort-short", int(first.short)),
                ("longshort-pair", int(first.pair)), ("longshort-pair", int(second.pair))}  # fmt: skip
    assert expected <= stored, stored
    assert sorted(aliases) == [  # the refused candidate moved nothing
        ("longshort-long", "production", int(first.long)), ("longshort-pair", "production", int(first.pair)),
        ("longshort-short", "production", int(first.short)),
    ]  # fmt: skip
    client = _mlflow_client(deployed_run)
    _, pipeline_run = _pipeline_run(deployed_run)
    # the pipeline registers its own RL pair too (tracking.log_pipeline -> register_pair tags its run)
    assert "registered.pair" in pipeline_run.data.tags, sorted(pipeline_run.data.tags)
    name, version = pipeline_run.data.tags["registered.pair"].split("/")
    assert name == registry.PAIR_MODEL and (name, int(version)) in stored
    assert client.get_model_version(name, version).tags["run_id"] == pipeline_run.info.run_id
    pair = client.get_model_version(registry.PAIR_MODEL, first.pair)
    assert pair.tags["pair.long_version"] == first.long and pair.tags["profile"] == "smoke"
    assert pair.tags["data.train_md5"] == pipeline_run.data.tags["data.train_md5"]
    location = client.get_model_version_download_uri(registry.PAIR_MODEL, first.pair)
    prefix = f"mlflow/{location.split(':/', 1)[1].strip('/')}/"
    keys = _bucket_keys(deployed_run, prefix)
    assert f"{prefix}python_model.pkl" in keys, sorted(keys)
    assert any("/artifacts/long/" in k and k.endswith(".safetensors") for k in keys), sorted(keys)


def test_refused_promotion_names_the_numbers(pair_run: PairRun):
    tokens = [f"{m['pair_mean_tokens']:.1f}" for m in pair_run.metrics]
    assert "pair_mean_tokens" in pair_run.refusal and all(t in pair_run.refusal for t in tokens), pair_run.refusal


def test_the_served_production_pair_answers_a_problem(pair_run: PairRun):
    (row,) = pair_run.answer["predictions"]
    assert set(row) >= {"answer", "stop_reason", "tokens", "long_tokens", "short_tokens", "transcript"}
    assert row["tokens"] == row["long_tokens"] + row["short_tokens"] > 0
    assert row["stop_reason"] in ("answer", "turn_cap", "malformed")


def test_solve_runs_the_production_pair_through_the_server_and_leaves_no_download(pair_run: PairRun, tmp_path: Path):
    """`longshort solve PROBLEM` against the MLflow server (artifacts through it, from S3): the @production pair,
    downloaded to a temporary folder that is gone afterwards (a 7B pair is ~30 GB a call)."""
    from longshort.registry import PAIR_MODEL

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"MLFLOW_TRACKING_URI": pair_run.tracking_uri, "TMPDIR": str(scratch), "COLUMNS": "200"}
    argv = [str(Path(sys.executable).parent / "longshort"), "solve", "Start with 3. Then (1) add 2. What is the final number?",
            "-p", "smoke"]  # fmt: skip
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"pair: {PAIR_MODEL} v{pair_run.first.pair} (@production)" in done.stdout
    assert "answer: " in done.stdout and " tokens ─" in done.stdout
    assert list(scratch.iterdir()) == []  # the download was removed


def test_gpu_pool_job_templates_are_accepted_by_the_server(stack: Stack):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            for kind, folder in (("kubernetes", "k8s"), ("docker", "docker")):
                template = json.loads((REPO / "infra" / folder / "base-job-template.json").read_text())
                client.create_work_pool(WorkPoolCreate(name=f"gpu-{folder}", type=kind, base_job_template=template))
                stored = client.read_work_pool(f"gpu-{folder}").base_job_template
                assert stored["job_configuration"] == template["job_configuration"]
    k8s = json.loads((REPO / "infra" / "k8s" / "base-job-template.json").read_text())
    container = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    docker = json.loads((REPO / "infra" / "docker" / "base-job-template.json").read_text())
    requests = docker["variables"]["properties"]["container_create_kwargs"]["default"]["device_requests"]
    assert requests[0]["capabilities"] == [["gpu"]]


def test_the_s3_secret_leaks_nowhere(deployed_run: Stack, pair_run: PairRun):
    secret = deployed_run.env["AWS_SECRET_ACCESS_KEY"]
    client = _mlflow_client(deployed_run)
    experiment, _ = _pipeline_run(deployed_run)
    for run in client.search_runs([experiment.experiment_id]):  # the parent and its stage runs
        assert not any(secret in v for v in (*run.data.params.values(), *run.data.tags.values()))
    for version in client.search_model_versions():  # base, long, short and pair versions
        assert not any(secret in v for v in version.tags.values())
    assert deployed_run.logs and not any(secret in m for m in deployed_run.logs)
    for log in services.Layout(deployed_run.state.state_dir).logs.iterdir():  # every server and the worker
        assert secret not in log.read_text(errors="replace"), log
    assert secret not in (deployed_run.tmp / "serve.log").read_text(errors="replace")
    for repo in (REPO, deployed_run.repo):  # committed files and files that would be committed
        assert _git(repo, "grep", "-I", "-F", "-l", "--untracked", "-e", secret) == ""
    dvc_config = (deployed_run.repo / ".dvc" / "config.local").read_text()
    assert "endpointurl" in dvc_config and secret not in dvc_config
