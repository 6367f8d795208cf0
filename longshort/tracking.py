"""MLflow: one parent run per pipeline run, a nested run per stage, registered models.

The default store is SQLite in the workspace (no server); a profile or
``MLFLOW_TRACKING_URI`` points it at a shared server. Registration is
idempotent: a model folder whose digest is already registered under the name
is not logged again, and the run links to the existing version.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from longshort.config import HELDOUT, ConfigError, Profile, TrackingConfig, check_tracking_uri
from longshort.endpoints import require_reachable
from longshort.io import file_lock, restore_environ
from longshort.records import StageRecord

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# a field whose own name holds one of these words, as a whole word (max_new_tokens and vocab_size are settings, a
# field named api_token or hf_token would be a secret); no profile field holds one today
SECRET_FIELD = re.compile(r"(?:^|_)(?:secret|password|token|credentials?|access_key|api_key)(?:_|$)", re.IGNORECASE)
PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)


def tracking_uri(cfg: TrackingConfig, workspace: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri or f"sqlite:///{Path(workspace).resolve()}/mlflow.db"


def require_tracking_server(uri: str) -> None:
    """The tracking URI must be a store MLflow can register models in (else ConfigError) and, when it is
    http(s), answer (retried as ``longshort.endpoints`` says), else ServiceUnavailable."""
    try:
        check_tracking_uri(uri)
    except ValueError as exc:
        where = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") == uri else "tracking.tracking_uri"
        raise ConfigError(f"{where}: {exc}") from None
    require_reachable(uri, "MLflow tracking server", path="/health")


def use_store(uri: str) -> None:
    """Point MLflow's tracking and registry at ``uri`` for this process.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into the environment, which
    ``tracking_uri`` reads as the user's choice: a second run in the same process (another workspace)
    would then log to the first run's store. The variables are put back as the user had them.
    """
    before = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    restore_environ(before)


def configure(profile: Profile) -> str:
    """Point MLflow at the profile's store and experiment; return the tracking URI."""
    ws = profile.run.workspace.resolve()
    uri = tracking_uri(profile.tracking, ws)
    require_tracking_server(uri)
    use_store(uri)
    if mlflow.get_experiment_by_name(profile.tracking.experiment) is None:
        location = profile.tracking.artifact_location
        if location is None and uri.startswith("sqlite:"):
            location = (ws / "mlartifacts").as_uri()  # a server picks its own artifact root
        mlflow.create_experiment(profile.tracking.experiment, artifact_location=location)
    mlflow.set_experiment(profile.tracking.experiment)
    return uri


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"section.field": "value"}``, leaving out anything that looks secret."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif not SECRET_FIELD.search(str(key)):
            out[name] = str(value)[:PARAM_VALUE_MAX]
    return out


def find_registered_version(name: str, digest: str) -> Any | None:
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException as exc:
        # MLflow 3 answers [] for a model not registered yet; a locked database or a 5xx is not "unregistered"
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    return next((v for v in versions if v.tags.get("model_digest") == digest), None)


def register_transformers_model(model_dir: str, name: str, digest: str, tags: dict[str, str]) -> str:
    """Log a saved transformers model to the active run and register it; returns the version."""
    existing = find_registered_version(name, digest)
    if existing is not None:
        log.info("model %s with digest %s is already version %s", name, digest[:12], existing.version)
        return str(existing.version)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-generation",
        pip_requirements=["torch", "transformers", "accelerate"],
        registered_model_name=name,
    )
    version = str(info.registered_model_version)
    client = MlflowClient()
    for key, value in {**tags, "model_digest": digest}.items():
        client.set_model_version_tag(name, version, key, value)
    return version


PAIR_SYSTEM = "Long⊗Short RL"  # the system registered as longshort-pair


def _log_history(record: StageRecord) -> None:
    """An RL stage's per-step metrics as MLflow step series (the reward curve): ``rl.<role>.*``, ``baseline.*``,
    and the RL probe's fixed-batch measurements as ``rl.probe.*`` (step 0 = the SFT pair)."""
    from longshort.io import iter_jsonl  # noqa: PLC0415

    for output in ("history", "probes"):
        path = record.outputs.get(output)
        if not path or not Path(path).is_file():
            continue
        for _, row in iter_jsonl(Path(path)):
            step = int(row.get("step", 0))
            if output == "probes":
                prefix = "rl.probe"
            else:
                prefix = f"rl.{row.get('role', 'pair')}" if record.stage == "rl" else record.stage
            mlflow.log_metrics(
                {f"{prefix}.{k}": float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                step=step,
            )


def pair_gate_metrics(metrics: dict[str, float]) -> dict[str, float] | None:
    """The numbers the promotion gate reads, from the evaluation of the RL pair on the held-out split."""
    from tasks.report import slug  # noqa: PLC0415

    prefix = f"{HELDOUT}.{slug(PAIR_SYSTEM)}"
    if f"{prefix}.accuracy" not in metrics:
        return None
    return {"pair_accuracy": metrics[f"{prefix}.accuracy"], "pair_mean_tokens": metrics[f"{prefix}.mean_tokens"]}


def log_pipeline(profile: Profile, records: list[StageRecord], flow_time_s: float, cache_hits: int) -> dict[str, Any]:
    """One parent run with params, metrics, data digests and git commit; a nested run per stage.

    The evaluation's tables and plots are the run's artifacts; the base model and
    the pair (long, short, and the ``longshort-pair`` pyfunc) are registered.

    Pipeline runs on this machine that share a workspace log one at a time (a file lock in the
    workspace): the SQLite store is created and migrated once, not by two processes at once, and a
    model digest that one run registers is found, not registered a second time, by the other.
    """
    with file_lock(profile.run.workspace.resolve() / "mlflow.lock"):
        return _log_pipeline(profile, records, flow_time_s, cache_hits)


def _run_tags(profile: Profile, records: list[StageRecord], commit: str) -> dict[str, str]:
    """The parent run's tags: profile, git commit and the data digests (once synthesize has run)."""
    data = next((r.digests for r in records if r.stage == "synthesize"), {})
    return {"profile": profile.run.name, "git_commit": commit, **{f"data.{k}": v for k, v in data.items()}}


def _log_stages(profile: Profile, records: list[StageRecord], tags: dict[str, str], flow_time_s: float) -> None:
    """Into the active parent run: tags, the flattened profile as params, a nested run per stage and every
    stage's metrics on the parent."""
    mlflow.set_tags(tags)
    mlflow.log_params(flatten(profile.model_dump(mode="json")))
    # the parent holds every stage's metrics; a name that several stages log (peak_rss_mb) is logged once per
    # stage as STAGE.NAME, not once per stage under one name at one step (where the last write would win)
    seen = Counter(k for record in records for k in record.metrics)
    for record in records:
        with mlflow.start_run(run_name=record.stage, nested=True):
            mlflow.set_tags({"stage": record.stage, "cache_key": record.key, "artifact_dir": record.path})
            mlflow.log_metrics({k: float(v) for k, v in record.metrics.items()})
            mlflow.log_metric("duration_s", record.duration_s)
            if record.stage in ("rl", "baseline"):
                _log_history(record)
        mlflow.log_metrics({(f"{record.stage}.{k}" if seen[k] > 1 else k): float(v) for k, v in record.metrics.items()})
    peak = [float(r.metrics["peak_rss_mb"]) for r in records if "peak_rss_mb" in r.metrics]
    mlflow.log_metrics({"flow_time_s": flow_time_s, **({"peak_rss_mb": max(peak)} if peak else {})})


def run_status(error: BaseException) -> str:
    """FAILED for an error, KILLED for a stop from outside (KeyboardInterrupt, SystemExit, Prefect's signals)."""
    return "FAILED" if isinstance(error, Exception) else "KILLED"


ERROR_TAG_MAX = 5000  # MLflow keeps tag values up to 8000 characters; the traceback is in the flow run's logs


def log_failed_pipeline(
    profile: Profile, records: list[StageRecord], failed_stage: str | None, error: BaseException, flow_time_s: float
) -> str:
    """A pipeline run that stopped part-way, as an MLflow run of status FAILED, or KILLED when stopped from outside
    (Ctrl-C, Prefect's termination signal on a cancelled run: a BaseException that is not an Exception): the
    same params and tags as a finished run, the stages that finished before it as nested runs with their
    metrics, and tags naming the stage that failed and the error. Nothing is registered. Returns the run id.

    Comparing runs in the UI then shows the failed attempts beside the finished ones; the rerun that
    resumes the pipeline (from its cached stages and checkpoints) is a run of its own.
    """
    with file_lock(profile.run.workspace.resolve() / "mlflow.lock"):
        configure(profile)
        status = run_status(error)
        run = mlflow.start_run(run_name=f"pipeline-{profile.run.name}")
        try:
            failure = {
                "failed_stage": failed_stage or "unknown",
                "error": f"{type(error).__name__}: {error}"[:ERROR_TAG_MAX],
            }
            _log_stages(profile, records, {**_run_tags(profile, records, git_commit()), **failure}, flow_time_s)
        finally:
            mlflow.end_run(status)
        return run.info.run_id


def _log_pipeline(profile: Profile, records: list[StageRecord], flow_time_s: float, cache_hits: int) -> dict[str, Any]:
    uri = configure(profile)
    by_stage = {r.stage: r for r in records}
    commit = git_commit()
    tags = _run_tags(profile, records, commit)
    with mlflow.start_run(run_name=f"pipeline-{profile.run.name}") as run:
        _log_stages(profile, records, tags, flow_time_s)
        mlflow.log_metric("cache_hits", cache_hits)
        if "evaluate" in by_stage:
            mlflow.log_artifacts(by_stage["evaluate"].path, artifact_path="report")
        result: dict[str, Any] = {"mlflow_run_id": run.info.run_id, "tracking_uri": uri}
        if profile.tracking.register_models and "sft_base" in by_stage:
            sft = by_stage["sft_base"]
            version = register_transformers_model(
                sft.outputs["model"],
                profile.tracking.base_model_name,
                sft.digests["model"],
                {"run_id": run.info.run_id, "profile": profile.run.name, "git_commit": commit, **tags},
            )
            mlflow.set_tag("registered.base_model", f"{profile.tracking.base_model_name}/{version}")
            result["base_model_version"] = version
        gate = pair_gate_metrics(by_stage["evaluate"].metrics) if "evaluate" in by_stage else None
        if profile.tracking.register_models and "rl" in by_stage and gate is not None:
            from longshort.registry import register_pair  # noqa: PLC0415
            from models.pair import PairSettings  # noqa: PLC0415

            rl = by_stage["rl"]
            settings = PairSettings.from_profile(profile)
            versions = register_pair(rl.outputs["long"], rl.outputs["short"], gate, tags, settings=settings)
            result.update(pair_version=versions.pair, long_version=versions.long, short_version=versions.short)
    return result
