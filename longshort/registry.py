"""The model registry: register a Long⊗Short pair, compare it with production, promote it (DESIGN §4).

Registered models: ``longshort-long`` and ``longshort-short`` (transformers
flavour) and ``longshort-pair`` (the pyfunc of :mod:`models.pair`, which runs the
turn protocol with both). Their versions carry tags that link them: the run id,
the pair's versions, the data digests, the git commit and the profile. A long or
short model whose weights are already registered reuses that version, which keeps
the lineage of the run that logged it and lists every pair using it in
``pair.versions``.

Promotion uses the alias ``@production`` (aliases, not the deprecated stages) and
moves it on all three models: ``longshort-long`` and ``longshort-short`` (the
versions the pair's tags name), then ``longshort-pair``, the one served. The gate
compares ``longshort-pair`` versions only, reading ``pair_accuracy`` and
``pair_mean_tokens`` from the candidate's and production's MLflow runs. There is no
fallback to the long-CoT base model's ``base_accuracy``: that measures a
different system, and promoting a pair on it would compare unlike things. The
candidate passes when

    pair_accuracy(candidate) >= pair_accuracy(production) - tolerance   and
    pair_mean_tokens(candidate) <= pair_mean_tokens(production)

and otherwise the alias stays where it is and :class:`PromotionRefused` carries
the numbers. A gate metric that is missing or not finite (nan, inf) on either side
refuses: it cannot be compared. The first candidate (no production yet) is
promoted if its own metrics are there and finite; "no production yet" means only
that MLflow says the alias or the model does not exist. Any other registry error
(a timeout, a 5xx, a locked database) propagates and nothing moves.

The three moves are one change: the member versions are looked up first (a
missing one refuses, nothing moved), and a failure part-way puts back every alias
already moved. Promoting the pair already at ``@production`` moves nothing (or only
the members that are off it) and leaves its ``promoted_at``/``promoted_over`` tags.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from longshort.io import json_digest, tree_digest
from models.pair import ACCURACY_METRIC, TOKENS_METRIC, PairSettings

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
LONG_MODEL, SHORT_MODEL, PAIR_MODEL = "longshort-long", "longshort-short", "longshort-pair"
PRODUCTION = "production"
DEFAULT_TOLERANCE = 0.02
GATE_METRICS = (ACCURACY_METRIC, TOKENS_METRIC)
# a pair version's digest of its two models and settings; a run that found its pair registered already is tagged
# on that version as ALSO_RUN_TAG + run id (promote and compare find it by that run too)
PAIR_DIGEST_TAG, ALSO_RUN_TAG = "pair_digest", "also_run."  # fmt: skip
# Environment variables whose values must never reach a tag, a param or a log line.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


class RegistryError(RuntimeError):
    """A registry lookup or registration that cannot go on; the message names the model, version or run."""


class PromotionRefused(RegistryError):
    """The candidate failed the gate; ``decision`` has both sides' numbers and the reasons."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        super().__init__(decision.summary())


@dataclass(frozen=True)
class PairVersions:
    run_id: str
    long: str
    short: str
    pair: str


@dataclass(frozen=True)
class Snapshot:
    """One registered pair version and the metrics and tags of the run that produced it."""

    version: str
    run_id: str
    metrics: dict[str, float]
    tags: dict[str, str]
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    candidate: Snapshot
    production: Snapshot | None
    tolerance: float
    passed: bool
    reasons: list[str] = field(default_factory=list)
    promoted: bool = False  # @production moved to this pair on longshort-pair
    moved: tuple[str, ...] = ()  # the models whose @production this call moved (members only: a repair)

    @property
    def is_production(self) -> bool:
        """The candidate is the version ``@production`` already points at."""
        return self.production is not None and self.production.version == self.candidate.version

    def summary(self) -> str:
        c = self.candidate
        head = f"{PAIR_MODEL} v{c.version} (run {c.run_id}): {_numbers(c)}"
        refused = "refused: " + "; ".join(self.reasons)
        if self.production is None:
            return f"{head}; no @{PRODUCTION} yet" + ("" if self.passed else f"; {refused}")
        if self.is_production:
            return f"{head}; already at @{PRODUCTION}"
        p = self.production
        verdict = "passes the gate" if self.passed else refused
        return (
            f"{head} vs @{PRODUCTION} v{p.version} (run {p.run_id}): {_numbers(p)}; "
            f"tolerance {self.tolerance:g}; {verdict}"
        )


def _numbers(s: Snapshot) -> str:
    acc, tok = s.metrics.get(ACCURACY_METRIC), s.metrics.get(TOKENS_METRIC)
    return f"{ACCURACY_METRIC}={acc:.4f}, {TOKENS_METRIC}={tok:.1f}" if None not in (acc, tok) else "metrics missing"


def unusable_metrics(side: str, metrics: Mapping[str, Any]) -> list[str]:
    """Why ``side``'s gate metrics cannot be compared: missing, or not a finite number (nan compares False
    with everything, so a nan would pass both rules). Empty: usable."""
    if missing := [m for m in GATE_METRICS if m not in metrics]:
        return [f"{side}'s run has no metric {missing}; cannot be compared"]
    return [f"{side}'s {name} is {metrics[name]!r}, not a finite number; cannot be compared"
            for name in GATE_METRICS if not _finite(metrics[name])]  # fmt: skip


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# --- registration ----------------------------------------------------------------------------------


def _check_no_secrets(values: Mapping[str, str], where: str) -> None:
    secrets = [v for name in SECRET_ENV if (v := os.environ.get(name))]
    leaked = [k for k, v in values.items() if any(s in str(v) for s in secrets)]
    if leaked:
        raise RegistryError(f"{where}: values of {leaked} contain a credential from the environment; not logging them")


def _git_commit() -> str:
    from longshort.tracking import git_commit  # noqa: PLC0415

    return git_commit()


def _versions_tagged(client: MlflowClient, name: str, tag: str, value: str) -> list[Any]:
    """The versions of ``name`` whose tag ``tag`` is ``value`` (none when the model is not registered yet)."""
    try:
        return [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get(tag) == value]
    except MlflowException as exc:
        # MLflow 3 answers [] for a model that does not exist yet; anything else (a locked database, a 5xx)
        # is not "unregistered": going on would register a duplicate of weights that may be there
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return []


def _register_transformers(
    model_dir: Path, name: str, artifact: str, tags: dict[str, str], digest: str | None = None
) -> str:
    """Log a saved transformers model to the active run and register it; reuse a version with the same digest
    (``digest``: the folder's ``tree_digest``, when the caller has it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    digest = digest or tree_digest(model_dir)
    client = MlflowClient()
    existing = _versions_tagged(client, name, "model_digest", digest)
    if existing:
        # the version keeps the lineage of the run that logged its weights (run_id, git_commit, data.*):
        # only tags it lacks are added. Which pairs use it is in `pair.versions`.
        reused = max(existing, key=lambda v: int(v.version))
        version = str(reused.version)
        log.info("%s: digest %s is already version %s", name, digest[:12], version)
        tags = {k: v for k, v in tags.items() if k not in reused.tags}
    else:
        info = mlflow.transformers.log_model(
            transformers_model={
                "model": AutoModelForCausalLM.from_pretrained(model_dir),
                "tokenizer": AutoTokenizer.from_pretrained(model_dir),
            },
            name=artifact,
            task="text-generation",
            pip_requirements=["torch", "transformers", "accelerate"],
            registered_model_name=name,
        )
        version = str(info.registered_model_version)
    for key, value in {**tags, "model_digest": digest}.items():
        client.set_model_version_tag(name, version, key, value)
    return version


def _link_member(client: MlflowClient, name: str, version: str, pair_v: str) -> None:
    """Tag a long/short version with the pair versions that use it: ``pair.version`` the first (set once),
    ``pair.versions`` all of them, comma-separated (a reused version gains one per pair)."""
    tags = client.get_model_version(name, version).tags
    if "pair.version" not in tags:
        client.set_model_version_tag(name, version, "pair.version", pair_v)
    members = [v for v in tags.get("pair.versions", "").split(",") if v]
    if pair_v not in members:
        client.set_model_version_tag(name, version, "pair.versions", ",".join([*members, pair_v]))


def _stage_folder(src: Path, dest: Path) -> Path:
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dest, copy_function=link_or_copy)
    return dest


def _log_pair_pyfunc(staged: dict[str, Path], config_file: Path, model_signature: Any) -> Any:
    from models.pair import CONFIG_ARTIFACT, LongShortPair  # noqa: PLC0415

    return mlflow.pyfunc.log_model(
        name="pair",
        python_model=LongShortPair(),
        artifacts={**{role: str(path) for role, path in staged.items()}, CONFIG_ARTIFACT: str(config_file)},
        code_paths=[str(REPO_ROOT / "models"), str(REPO_ROOT / "longshort")],
        pip_requirements=["torch", "transformers", "accelerate", "pydantic", "pandas", "math-verify"],
        signature=model_signature,
        registered_model_name=PAIR_MODEL,
    )


def register_pair(
    long_dir: str | Path,
    short_dir: str | Path,
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    *,
    settings: PairSettings | None = None,
) -> PairVersions:
    """Register a version of ``longshort-long``, ``longshort-short`` and ``longshort-pair`` in the active run.

    ``metrics`` must hold ``pair_accuracy`` and ``pair_mean_tokens`` (what the promotion gate reads);
    they are logged to the run. ``tags`` (e.g. ``profile``, ``data.train_md5``) go on the run and on all
    three versions, with ``run_id``, ``git_commit``, the run's own ``data.*`` tags and the pair's versions.
    Without an active run, one named ``register-pair`` is started in the current experiment.
    A long or short model whose folder digest is already registered reuses that version; a pair of the
    same two models, settings and gate metrics (a rerun of a cached pipeline) reuses its pair version,
    tagged with this run (``also_run.<run id>``), where :func:`candidate_for_run` finds it.
    """
    from models.pair import LONG_ARTIFACT, SHORT_ARTIFACT, signature  # noqa: PLC0415

    long_dir, short_dir = Path(long_dir), Path(short_dir)
    for label, folder in (("long", long_dir), ("short", short_dir)):
        if not (folder / "config.json").is_file():
            raise RegistryError(f"{label} model folder {folder} has no config.json (not a saved transformers model)")
    if missing := [m for m in GATE_METRICS if m not in metrics]:
        raise RegistryError(f"register_pair: metrics {missing} are missing (got {sorted(metrics)})")
    if bad := {m: metrics[m] for m in GATE_METRICS if not _finite(metrics[m])}:
        raise RegistryError(f"register_pair: gate metrics {bad} are not finite numbers: the promotion gate "
                            "could not compare this pair, so nothing is registered")  # fmt: skip
    tags = {str(k): str(v) for k, v in tags.items()}
    _check_no_secrets(tags, "register_pair tags")
    settings = settings or PairSettings()

    own_run = mlflow.active_run() is None
    run = mlflow.start_run(run_name="register-pair") if own_run else mlflow.active_run()
    try:
        run_tags = MlflowClient().get_run(run.info.run_id).data.tags
        common = {
            "run_id": run.info.run_id,
            "git_commit": tags.get("git_commit") or run_tags.get("git_commit") or _git_commit(),
            "profile": tags.get("profile") or run_tags.get("profile", "unknown"),
            **{k: v for k, v in run_tags.items() if k.startswith("data.")},
            **tags,
        }
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.set_tags({k: v for k, v in common.items() if k != "run_id"})
        digests = {"long": tree_digest(long_dir), "short": tree_digest(short_dir)}
        long_v = _register_transformers(long_dir, LONG_MODEL, "long_model", common, digests["long"])
        short_v = _register_transformers(short_dir, SHORT_MODEL, "short_model", common, digests["short"])
        links = {"pair.long_version": long_v, "pair.short_version": short_v}
        client = MlflowClient()
        # the same weights served the same way and measured the same (a rerun of a cached pipeline): no second copy
        # of both models. The version keeps the lineage of the run that logged it; this run is recorded on it.
        # Other gate metrics (an evaluation on other problems) make another version: the gate reads its run's
        gate = {m: float(metrics[m]) for m in GATE_METRICS}
        pair_digest = json_digest({**digests, "settings": settings.model_dump(mode="json"), "gate": gate})
        if existing := _versions_tagged(client, PAIR_MODEL, PAIR_DIGEST_TAG, pair_digest):
            pair_v = str(max(existing, key=lambda v: int(v.version)).version)
            client.set_model_version_tag(PAIR_MODEL, pair_v, f"{ALSO_RUN_TAG}{run.info.run_id}", "1")
            mlflow.set_tags({"registered.pair": f"{PAIR_MODEL}/{pair_v}", **links})
            log.info("%s: digest %s is already version %s", PAIR_MODEL, pair_digest[:12], pair_v)
            return PairVersions(run_id=run.info.run_id, long=long_v, short=short_v, pair=pair_v)
        with tempfile.TemporaryDirectory() as tmp:
            # MLflow stores each artifact under its folder's base name: two folders both called `model`
            # would land in one place, so stage them as `long/` and `short/` (hard links where possible)
            staged = {role: _stage_folder(folder, Path(tmp) / role) for role, folder in
                      ((LONG_ARTIFACT, long_dir), (SHORT_ARTIFACT, short_dir))}  # fmt: skip
            config_file = Path(tmp) / "pair_config.json"
            config_file.write_text(settings.model_dump_json(indent=2))
            with warnings.catch_warnings():  # we give a signature on purpose, not type hints or an input example
                warnings.filterwarnings("ignore", message=".*(type hints|input_example|input example).*")
                info = _log_pair_pyfunc(staged, config_file, signature())
        pair_v = str(info.registered_model_version)
        version_tags = {**common, **links, PAIR_DIGEST_TAG: pair_digest, **{f"metric.{k}": str(v) for k, v in metrics.items()}}
        for key, value in version_tags.items():
            client.set_model_version_tag(PAIR_MODEL, pair_v, key, value)
        for name, version in ((LONG_MODEL, long_v), (SHORT_MODEL, short_v)):
            _link_member(client, name, version, pair_v)
        mlflow.set_tags({"registered.pair": f"{PAIR_MODEL}/{pair_v}", **links})
    finally:
        if own_run:
            mlflow.end_run()
    log.info("registered %s v%s (long v%s, short v%s) from run %s",
             PAIR_MODEL, pair_v, long_v, short_v, run.info.run_id)  # fmt: skip
    return PairVersions(run_id=run.info.run_id, long=long_v, short=short_v, pair=pair_v)


# --- lookups ---------------------------------------------------------------------------------------


def client_for_profile(profile: str, overrides: list[str] | None = None) -> MlflowClient:
    """A client on the registry a profile uses: ``MLFLOW_TRACKING_URI`` if set (the services), else the profile's
    ``tracking.tracking_uri``, else the workspace's SQLite file. A SQLite file must exist (nothing is registered
    otherwise; MLflow would create an empty store at a mistyped path). A tracking server that does not answer
    raises ``longshort.endpoints.ServiceUnavailable``."""
    from longshort.config import load_profile  # noqa: PLC0415
    from longshort.tracking import require_tracking_server, tracking_uri, use_store  # noqa: PLC0415

    cfg = load_profile(profile, overrides)
    uri = tracking_uri(cfg.tracking, cfg.run.workspace.resolve())
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        where = (
            "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
            else "tracking.tracking_uri" if cfg.tracking.tracking_uri else "the profile's workspace"
        )  # fmt: skip
        raise RegistryError(f"no MLflow store at {uri} ({where}; run the pipeline first, or set MLFLOW_TRACKING_URI)")
    require_tracking_server(uri)
    use_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _snapshot(client: MlflowClient, version: Any) -> Snapshot:
    run_id = version.run_id or version.tags.get("run_id")
    if not run_id:
        raise RegistryError(f"{PAIR_MODEL} v{version.version} records no run id")
    run = client.get_run(run_id)
    return Snapshot(
        version=str(version.version),
        run_id=run_id,
        metrics=dict(run.data.metrics),
        tags=dict(version.tags),
        aliases=tuple(getattr(version, "aliases", ()) or ()),
    )


def candidate_for_run(run_id: str, client: MlflowClient | None = None) -> Snapshot:
    """The newest ``longshort-pair`` version registered from ``run_id``, or from the one run whose id starts
    with it (``compare`` prints 12 characters)."""
    client = client or MlflowClient()
    found: dict[str, list[Any]] = {}  # run id -> the versions it registered (or found registered already)
    for v in client.search_model_versions(f"name = '{PAIR_MODEL}'"):
        ids = {v.run_id or v.tags.get("run_id") or ""} | {k[len(ALSO_RUN_TAG) :] for k in v.tags if k.startswith(ALSO_RUN_TAG)}
        for rid in ids:
            if run_id and rid.startswith(run_id):
                found.setdefault(rid, []).append(v)
    versions = [v for vs in found.values() for v in vs]
    runs = sorted(found)
    if not versions:
        raise RegistryError(f"run {run_id} registered no version of {PAIR_MODEL}")
    if len(runs) > 1:
        raise RegistryError(f"run id prefix {run_id} matches {len(runs)} runs: {', '.join(runs)}")
    return _snapshot(client, max(versions, key=lambda v: int(v.version)))


def _newest_version(client: MlflowClient, hint: str = "") -> Any:
    """The highest-numbered ``longshort-pair`` version; RegistryError (with ``hint`` appended) when there is none."""
    versions = client.search_model_versions(f"name = '{PAIR_MODEL}'")
    if not versions:
        raise RegistryError(f"no version of {PAIR_MODEL} is registered{hint}")
    return max(versions, key=lambda v: int(v.version))


def latest_candidate(client: MlflowClient | None = None) -> Snapshot:
    client = client or MlflowClient()
    return _snapshot(client, _newest_version(client))


def pair_to_solve(client: MlflowClient, model: str | None = None) -> tuple[str, str]:
    """The registered pair ``longshort solve`` runs when it is given no model folders, and how to name it: ``model``
    (a ``models:/`` URI) as given; else ``longshort-pair@production``; else the newest version, which a pipeline
    run registers before anyone promotes it. Only the registry is read (not the runs, which may be gone)."""
    if model:
        return model, model
    current = _production_version(client)
    if current is not None:
        return f"models:/{PAIR_MODEL}/{current.version}", f"{PAIR_MODEL} v{current.version} (@{PRODUCTION})"
    newest = _newest_version(client, ": run the pipeline, or give --long and --short").version
    return f"models:/{PAIR_MODEL}/{newest}", f"{PAIR_MODEL} v{newest} (the newest; no @{PRODUCTION} yet)"


@contextmanager
def pair_files(uri: str) -> Iterator[tuple[Path, Path, Path]]:
    """The long and short model folders and the settings file of the registered pair at ``uri`` (``models:/...``).

    A local store's files are used where they are. A remote one's (S3, an MLflow server) are downloaded to a
    temporary folder, removed when the block ends. The pair's MLmodel and settings are read first: a model that
    is not a pair, or a pair that decodes with vLLM on a machine without it, is refused before any weights move.
    """
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository  # noqa: PLC0415
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository  # noqa: PLC0415

    from longshort.config import ConfigError  # noqa: PLC0415
    from models.generation import resolve_backend  # noqa: PLC0415
    from models.pair import CONFIG_ARTIFACT, LONG_ARTIFACT, SHORT_ARTIFACT  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="longshort-pair-") as tmp:
        try:
            repo = ModelsArtifactRepository(uri).repo  # the version's own artifacts (no registry files written)
            dst = None if isinstance(repo, LocalArtifactRepository) else tmp

            def fetch(path: str) -> Path:
                return Path(repo.download_artifacts(path, dst))

            try:
                meta = yaml.safe_load(fetch("MLmodel").read_text(encoding="utf-8"))
                files = {k: meta["flavors"]["python_function"]["artifacts"][k]["path"]
                         for k in (LONG_ARTIFACT, SHORT_ARTIFACT, CONFIG_ARTIFACT)}  # fmt: skip
            except (yaml.YAMLError, KeyError, TypeError) as exc:
                raise RegistryError(f"{uri}: not a Long⊗Short pair (its MLmodel names no {LONG_ARTIFACT}, "
                                    f"{SHORT_ARTIFACT} and {CONFIG_ARTIFACT} artifacts: {type(exc).__name__} {exc})") from None  # fmt: skip
            settings_file = fetch(files[CONFIG_ARTIFACT])
            try:
                settings = PairSettings.model_validate_json(settings_file.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise RegistryError(f"{uri}: its {CONFIG_ARTIFACT} is not valid pair settings: {exc}") from None
            try:
                resolve_backend(settings.generation)
            except ConfigError as exc:
                raise RegistryError(f"{uri} was registered to decode with generation.backend "
                                    f"'{settings.generation.backend}' ({exc}): run it on a GPU machine with vLLM, "
                                    "or give --long and --short model folders") from None  # fmt: skip
            long, short = fetch(files[LONG_ARTIFACT]), fetch(files[SHORT_ARTIFACT])
        except MlflowException as exc:
            raise RegistryError(f"{uri}: {exc.message}") from None
        except OSError as exc:  # a store the user cannot read, a full disk for the download
            raise RegistryError(f"{uri}: {exc}") from None
        yield long, short, settings_file


# What MLflow 3 raises when the alias lookup finds nothing: the SQL and file stores raise
# INVALID_PARAMETER_VALUE ("Registered model alias ... not found.") for a missing alias and
# RESOURCE_DOES_NOT_EXIST for a missing model; the REST store re-raises the server's code (RestException).
# A server or proxy error (5xx, a timeout, a non-JSON 4xx) carries another code and is not "no production".
_NO_ALIAS_CODES = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"})


def _production_version(client: MlflowClient) -> Any:
    """The ``longshort-pair`` version ``@production`` points at, or None when the alias (or the model) does not
    exist. Any other registry error propagates: treating it as "no production yet" would promote without the gate."""
    try:
        return client.get_model_version_by_alias(PAIR_MODEL, PRODUCTION)
    except MlflowException as exc:
        if exc.error_code in _NO_ALIAS_CODES:
            return None
        raise


def production(client: MlflowClient | None = None) -> Snapshot | None:
    """The ``@production`` pair with its run (``_production_version``), or None when there is none."""
    client = client or MlflowClient()
    version = _production_version(client)
    return None if version is None else _snapshot(client, version)


# --- the gate --------------------------------------------------------------------------------------


def _check_tolerance(tolerance: float) -> None:
    if not 0.0 <= tolerance <= 1.0:  # also refuses nan, which would switch the accuracy check off
        raise RegistryError(f"tolerance must be an accuracy difference between 0 and 1, got {tolerance}")


def gate(candidate: Mapping[str, float], current: Mapping[str, float], tolerance: float) -> list[str]:
    """Reasons to refuse (empty: promote). Accuracy may drop by at most ``tolerance``; tokens may not rise.
    A gate metric missing or not finite on either side is a reason: the two cannot be compared."""
    _check_tolerance(tolerance)
    if reasons := unusable_metrics("candidate", candidate) + unusable_metrics("production", current):
        return reasons
    acc_c, acc_p = candidate[ACCURACY_METRIC], current[ACCURACY_METRIC]
    # accuracies are shares of a problem count: 54/300 against 60/300 is exactly 0.02 lower, but its float
    # difference is 0.020000000000000018; a margin far below any 1/n tells such a tie from a real drop
    if acc_p - acc_c > tolerance + 1e-9:
        reasons.append(
            f"{ACCURACY_METRIC} {acc_c:.4f} is {acc_p - acc_c:.4f} below production's {acc_p:.4f} "
            f"(tolerance {tolerance:g})"
        )
    tok_c, tok_p = candidate[TOKENS_METRIC], current[TOKENS_METRIC]
    if tok_c > tok_p:
        reasons.append(f"{TOKENS_METRIC} {tok_c:.1f} is higher than production's {tok_p:.1f}")
    return reasons


def evaluate_promotion(
    run_id: str, tolerance: float = DEFAULT_TOLERANCE, client: MlflowClient | None = None
) -> Decision:
    """The gate's decision for the pair registered from ``run_id``, without moving anything."""
    _check_tolerance(tolerance)
    client = client or MlflowClient()
    candidate = candidate_for_run(run_id, client)
    current = production(client)
    if current is None:
        reasons = unusable_metrics("candidate", candidate.metrics)
    elif current.version == candidate.version:
        reasons = []  # already @production: nothing to gate (promote only repairs members that are off it)
    else:
        reasons = gate(candidate.metrics, current.metrics, tolerance)
    return Decision(candidate, current, tolerance, not reasons, reasons)


def _alias_target(client: MlflowClient, name: str) -> str | None:
    """The version ``name@production`` points at; None when the alias or the model does not exist."""
    try:
        return str(client.get_model_version_by_alias(name, PRODUCTION).version)
    except MlflowException as exc:
        if exc.error_code in _NO_ALIAS_CODES:
            return None
        raise


def _check_members(client: MlflowClient, version: str, members: dict[str, str]) -> None:
    """Each member version the pair's tags name exists (else RegistryError naming it: nothing may move)."""
    for name, member in members.items():
        try:
            client.get_model_version(name, member)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise RegistryError(
                f"{name} v{member}, which {PAIR_MODEL} v{version} names as its member, does not exist "
                f"(deleted?); nothing was moved"
            ) from exc


def _move_aliases(client: MlflowClient, targets: dict[str, str], before: dict[str, str | None]) -> list[str]:
    """Point ``@production`` at ``targets`` (in order), skipping those already there; the names moved.

    On a failure, every alias already moved is put back (set to its old version, or deleted if it had
    none) and RegistryError says what failed and what was restored, or which models are left inconsistent.
    """
    moved: list[str] = []
    try:
        for name, version in targets.items():
            if before[name] != version:
                client.set_registered_model_alias(name, PRODUCTION, version)
                moved.append(name)
    except Exception as exc:
        failed = next(n for n in targets if n not in moved and before[n] != targets[n])
        restored, stuck = [], []
        for name in reversed(moved):
            old = before[name]
            try:
                if old is None:
                    client.delete_registered_model_alias(name, PRODUCTION)
                else:
                    client.set_registered_model_alias(name, PRODUCTION, old)
                restored.append(f"{name}@{PRODUCTION} back to {'unset' if old is None else 'v' + old}")
            except Exception as undo:  # noqa: BLE001 - reported below, with the model it concerns
                stuck.append(f"{name}@{PRODUCTION} is v{targets[name]}, was "
                             f"{'unset' if old is None else 'v' + old} ({undo})")  # fmt: skip
        head = f"moving @{PRODUCTION} on {failed} to v{targets[failed]} failed ({exc})"
        if stuck:
            log.error("%s; INCONSISTENT: %s", head, "; ".join(stuck))
            raise RegistryError(
                f"{head}; restoring failed, @{PRODUCTION} is now inconsistent: {'; '.join(stuck)}"
                + (f" (restored: {', '.join(restored)})" if restored else "")
            ) from exc
        raise RegistryError(
            f"{head}; " + (f"restored {', '.join(restored)}" if restored else "nothing had moved")
        ) from exc
    return moved


def promote(run_id: str, tolerance: float = DEFAULT_TOLERANCE, client: MlflowClient | None = None) -> Decision:
    """Move ``@production`` to the pair of ``run_id`` if it passes the gate: on ``longshort-long`` and
    ``longshort-short`` (the versions the pair's tags name), then on ``longshort-pair``, the one served.

    Raises :class:`PromotionRefused` (aliases unchanged) when it does not, and RegistryError when a member
    version is missing (nothing moved) or a move fails (the ones already made are undone).
    The pair already at ``@production`` is not promoted again (``promoted`` False, its ``promoted_at`` and
    ``promoted_over`` tags kept); members whose alias is elsewhere are moved to it (``moved`` names them).
    """
    client = client or MlflowClient()
    decision = evaluate_promotion(run_id, tolerance, client)
    if not decision.passed:
        log.warning("promotion refused: %s", decision.summary())
        raise PromotionRefused(decision)
    version, tags = decision.candidate.version, decision.candidate.tags
    long_v, short_v = tags.get("pair.long_version"), tags.get("pair.short_version")
    if not (long_v and short_v):
        raise RegistryError(f"{PAIR_MODEL} v{version} lacks the tags pair.long_version / pair.short_version")
    members = {LONG_MODEL: long_v, SHORT_MODEL: short_v}
    _check_members(client, version, members)
    targets = {**members, PAIR_MODEL: version}
    before = {name: _alias_target(client, name) for name in targets}
    gated_against = decision.production.version if decision.production else None
    if before[PAIR_MODEL] != gated_against:  # someone moved it since the gate read it
        raise RegistryError(
            f"{PAIR_MODEL}@{PRODUCTION} moved from {gated_against or 'unset'} to {before[PAIR_MODEL] or 'unset'} "
            "while the gate ran; nothing was moved, run it again"
        )
    moved = tuple(_move_aliases(client, targets, before))
    if PAIR_MODEL not in moved:
        what = f"repaired @{PRODUCTION} on {', '.join(moved)}" if moved else "nothing moved"
        log.info("%s v%s is already at @%s: %s", PAIR_MODEL, version, PRODUCTION, what)
        return Decision(decision.candidate, decision.production, tolerance, True, [], promoted=False, moved=moved)
    previous = before[PAIR_MODEL] or "none"
    try:
        client.set_model_version_tag(PAIR_MODEL, version, "promoted_at", datetime.now(timezone.utc).isoformat())
        client.set_model_version_tag(PAIR_MODEL, version, "promoted_over", previous)
    except MlflowException as exc:  # the aliases agree (all moved): say so, not "nothing promoted"
        raise RegistryError(f"{PAIR_MODEL} v{version} is @{PRODUCTION} on all three models, but tagging it "
                            f"promoted_at/promoted_over={previous} failed: {exc}") from exc  # fmt: skip
    log.info("promoted %s v%s to @%s (was %s): %s", PAIR_MODEL, version, PRODUCTION, previous, decision.summary())
    return Decision(decision.candidate, decision.production, tolerance, True, [], promoted=True, moved=moved)


# --- side by side ----------------------------------------------------------------------------------

TAG_ROWS = ("profile", "git_commit", "pair.long_version", "pair.short_version")


def comparison_rows(candidate: Snapshot, current: Snapshot | None) -> list[tuple[str, str, str, str]]:
    """(name, candidate, production, delta) rows: gate metrics first, other shared metrics, then tags."""
    prod_metrics = current.metrics if current else {}
    names = [*GATE_METRICS, *sorted((set(candidate.metrics) | set(prod_metrics)) - set(GATE_METRICS))]
    rows = []
    for name in names:
        c, p = candidate.metrics.get(name), prod_metrics.get(name)
        delta = f"{c - p:+.4g}" if c is not None and p is not None and math.isfinite(c - p) else ""
        if name.endswith(("_ci_low", "_ci_high")):
            delta = ""  # the difference of two runs' interval bounds means nothing
        rows.append((name, "—" if c is None else f"{c:.4g}", "—" if p is None else f"{p:.4g}", delta))
    prod_tags = current.tags if current else {}
    data_tags = sorted(k for k in {*candidate.tags, *prod_tags} if k.startswith("data."))
    for name in (*TAG_ROWS, *data_tags):
        c, p = candidate.tags.get(name, "—"), prod_tags.get(name, "—")
        rows.append((name, c, p, "differs" if current is not None and c != p else ""))
    return rows


def comparison_table(decision: Decision) -> Any:
    """A rich Table: candidate vs production, side by side, with the gate's verdict as its caption."""
    from rich.table import Table  # noqa: PLC0415

    c, p = decision.candidate, decision.production
    table = Table(title=f"{PAIR_MODEL}: candidate vs @{PRODUCTION}")
    table.add_column("")
    table.add_column(f"candidate v{c.version}\nrun {c.run_id[:12]}", justify="right")
    table.add_column(f"production v{p.version}\nrun {p.run_id[:12]}" if p else "production\n(none)", justify="right")
    table.add_column("Δ", justify="right")
    for row in comparison_rows(c, p):
        table.add_row(*row)
    if not decision.passed:
        verdict = "[red]would be refused:[/] " + "; ".join(decision.reasons)
    elif p is None:
        verdict = "no production yet: nothing to compare with, the gate passes"
    elif decision.is_production:
        verdict = f"already at @{PRODUCTION}"
    else:
        verdict = f"[green]passes the gate[/] (tolerance {decision.tolerance:g})"
    table.caption = verdict
    return table


def compare(
    run_id: str | None = None, tolerance: float = DEFAULT_TOLERANCE, client: MlflowClient | None = None
) -> Decision:
    """The candidate (the pair of ``run_id``, default the newest version) against production, gate included."""
    client = client or MlflowClient()
    if run_id is None:
        run_id = latest_candidate(client).run_id
    return evaluate_promotion(run_id, tolerance, client)


def decision_json(decision: Decision) -> str:
    """The decision as JSON (for scripts and CI logs)."""
    def side(s: Snapshot | None) -> dict[str, Any] | None:
        if s is None:
            return None
        return {"version": s.version, "run_id": s.run_id, **{m: s.metrics.get(m) for m in GATE_METRICS}}

    return json.dumps({"candidate": side(decision.candidate), "production": side(decision.production),
                       "tolerance": decision.tolerance, "passed": decision.passed, "promoted": decision.promoted,
                       "moved": list(decision.moved), "reasons": decision.reasons})  # fmt: skip
