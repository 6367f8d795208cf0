"""Registry, the `longshort-pair` pyfunc and promotion, on a real SQLite MLflow store.

One small trained model (``trained_tiny``) serves as both the long and the short
model: that exercises the registration, the protocol inside the pyfunc and the
alias moves honestly, though the pair's answers are only as good as that model.
The gate's inputs are the metrics logged on each candidate's run: the first
candidate's are measured by running the pair on held-out problems, later
candidates get numbers chosen relative to it to put each gate rule on its edge.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh SQLite tracking + registry store and experiment; the active MLflow URIs point at it
    for the test (conftest's ``mlflow_state`` restores them, also when the test fails)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.create_experiment("registry-test", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("registry-test")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)  # conftest's mlflow_state puts the URIs back


@pytest.fixture(scope="module")
def heldout(demo_rows_small):
    _, rows = demo_rows_small
    return rows[:6]


@pytest.fixture(scope="module")
def measured(trained_tiny, heldout) -> tuple[dict[str, float], list]:
    """The pair's real metrics and episodes on held-out problems (trained_tiny as long and short)."""
    from models.pair import LongShortPair, pair_metrics

    settings = _settings()
    path = Path(trained_tiny).parent / "pair_config.json"
    path.write_text(settings.model_dump_json())
    pair = LongShortPair().load(trained_tiny, trained_tiny, path)
    episodes = pair.solve([r["problem"] for r in heldout])
    return pair_metrics(episodes, [r["answer"] for r in heldout]), episodes


def _settings():
    from longshort.config import GenerationConfig, ProtocolConfig
    from models.pair import PairSettings

    return PairSettings(
        generation=GenerationConfig(backend="transformers", batch_size=8),
        protocol=ProtocolConfig(max_turns=4, max_new_tokens_long=48, max_new_tokens_short=24),
    )


def _register(model_dir: str, metrics: dict[str, float], run_name: str, **tags: str):
    import mlflow

    from longshort import registry

    with mlflow.start_run(run_name=run_name):
        mlflow.set_tags({"data.train_md5": "abc123", "profile": "smoke"})
        return registry.register_pair(model_dir, model_dir, metrics, tags, settings=_settings())


def _production_version(client) -> str:
    from longshort.registry import PAIR_MODEL

    return str(client.get_model_version_by_alias(PAIR_MODEL, "production").version)


def test_register_pair_links_three_versions_to_the_run(store, trained_tiny, measured):
    from longshort import registry

    metrics, _ = measured
    versions = _register(trained_tiny, metrics, "candidate-1", stage_note="first")
    assert (versions.long, versions.short, versions.pair) == ("1", "1", "1")
    pair = store.get_model_version(registry.PAIR_MODEL, "1")
    assert pair.run_id == versions.run_id
    for key, value in {"run_id": versions.run_id, "profile": "smoke", "data.train_md5": "abc123",
                       "pair.long_version": "1", "pair.short_version": "1", "stage_note": "first"}.items():  # fmt: skip
        assert pair.tags[key] == value, key
    assert pair.tags["git_commit"]
    for name in (registry.LONG_MODEL, registry.SHORT_MODEL):
        version = store.get_model_version(name, "1")
        assert version.tags["pair.version"] == "1" and version.tags["run_id"] == versions.run_id
        assert len(version.tags["model_digest"]) >= 32
    run_metrics = store.get_run(versions.run_id).data.metrics
    assert run_metrics["pair_accuracy"] == pytest.approx(metrics["pair_accuracy"])
    assert run_metrics["pair_mean_tokens"] == pytest.approx(metrics["pair_mean_tokens"])

    # a second pair with the same weights, measured on other problems, reuses the long/short versions and adds a
    # pair version (measured the same, it would be the same version: a cached rerun, tested below)
    again = _register(trained_tiny, {**metrics, "pair_mean_tokens": metrics["pair_mean_tokens"] + 1}, "candidate-2",
                      stage_note="second")  # fmt: skip
    assert (again.long, again.short, again.pair) == ("1", "1", "2")
    for name in (registry.LONG_MODEL, registry.SHORT_MODEL):  # the reused version keeps the run that logged it
        tags = store.get_model_version(name, "1").tags
        assert (tags["run_id"], tags["stage_note"]) == (versions.run_id, "first")
        assert (tags["pair.version"], tags["pair.versions"]) == ("1", "1,2")
    second = store.get_model_version(registry.PAIR_MODEL, "2").tags
    assert (second["run_id"], second["stage_note"], second["pair.long_version"]) == (again.run_id, "second", "1")


def test_the_registered_pyfunc_pair_answers_as_the_pair_it_was_built_from(store, trained_tiny, measured, heldout):
    """The MLflow round trip: the pair loaded back as a pyfunc model gives LongShortPair.solve's episodes (the
    protocol itself is tested in tests/test_protocol.py and tests/test_pair.py)."""
    import mlflow
    import pandas as pd

    metrics, episodes = measured
    _register(trained_tiny, metrics, "candidate-1")
    model = mlflow.pyfunc.load_model("models:/longshort-pair/1")
    out = model.predict(pd.DataFrame({"problem": [r["problem"] for r in heldout]}))
    assert list(out["answer"]) == [e.answer or "" for e in episodes]
    assert list(out["tokens"]) == [e.tokens() for e in episodes]
    assert (out["tokens"] == out["long_tokens"] + out["short_tokens"]).all()
    assert list(out["transcript"]) == [e.transcript for e in episodes] and (out["n_turns"] >= 1).all()
    assert list(out["stop_reason"]) == [e.stop_reason for e in episodes]
    assert metrics["pair_mean_tokens"] == pytest.approx(out["tokens"].mean())
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="missing inputs \\['problem'\\]"):  # the signature guards the server
        model.predict(pd.DataFrame({"question": ["1+1"]}))


def test_solve_without_folders_runs_the_registered_pair(store, trained_tiny, measured, heldout, monkeypatch):
    """`longshort solve PROBLEM` runs @production, else the newest pair version (what a pipeline run registers),
    with the settings registered with it: the same episode as the pair it was built from."""
    from longshort import registry

    metrics, episodes = measured
    first = _register(trained_tiny, metrics, "candidate-1")
    second = _register(trained_tiny, {**metrics, "pair_mean_tokens": metrics["pair_mean_tokens"] + 1}, "candidate-2")
    problem, episode = heldout[0]["problem"], episodes[0]
    result = _cli(store, monkeypatch, "solve", problem)
    assert result.exit_code == 0, result.output
    assert "pair: longshort-pair v2 (the newest; no @production yet)" in result.output
    summary = f"answer: {episode.answer}   stop: {episode.stop_reason}   "
    summary += f"tokens: long {episode.tokens('long')} + short {episode.tokens('short')} = {episode.tokens()}"
    assert summary in result.output
    assert result.output.count(" tokens ─") == len(episode.turns)  # one rule per turn
    registry.promote(first.run_id, client=store)
    assert "pair: longshort-pair v1 (@production)" in _cli(store, monkeypatch, "solve", problem).output
    named = _cli(store, monkeypatch, "solve", problem, "--model", f"models:/longshort-pair/{second.pair}")
    assert f"pair: models:/longshort-pair/{second.pair}" in named.output and summary in named.output
    for args, message in (
        (["--model", "models:/longshort-pair/9"], "models:/longshort-pair/9: Model Version"),
        (["--model", "models:/longshort-long/1"], "not a Long⊗Short pair"),
        (["--long", trained_tiny], "--long and --short go together"),
        (["--long", trained_tiny, "--short", trained_tiny, "--model", "models:/longshort-pair/1"], "not both"),
        (["--set", "generation.temperature=0.5"], "a registered pair decodes with the settings registered with it"),
    ):
        failed = _cli(store, monkeypatch, "solve", problem, *args)
        assert failed.exit_code == 2 and message in failed.output, (args, failed.output)
    # a pair registered to decode with vLLM (the GPU profiles) is refused on a machine without it, before its
    # weights are fetched, and the message says what to do
    import mlflow

    from longshort.config import GenerationConfig
    from models.pair import PairSettings

    gpu = PairSettings(generation=GenerationConfig(backend="vllm"), protocol=_settings().protocol)
    with mlflow.start_run(run_name="gpu-pair"):
        third = registry.register_pair(trained_tiny, trained_tiny, {**metrics, "pair_mean_tokens": 1.0}, {}, settings=gpu)
    failed = _cli(store, monkeypatch, "solve", problem, "--model", f"models:/longshort-pair/{third.pair}")
    assert failed.exit_code == 2 and "was registered to decode with generation.backend 'vllm'" in failed.output
    assert "give --long and --short model folders" in failed.output


def test_pair_input_forms():
    import pandas as pd

    from models.pair import problems_of

    assert problems_of(pd.DataFrame({"problem": ["a", "b"]})) == ["a", "b"]
    assert problems_of("a") == ["a"] and problems_of([{"problem": "a"}, "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        problems_of(["a", ""])


def test_gate_rules_on_their_edges():
    from longshort.registry import RegistryError, gate

    prod = {"pair_accuracy": 0.50, "pair_mean_tokens": 100.0}
    assert gate({"pair_accuracy": 0.48, "pair_mean_tokens": 100.0}, prod, 0.02) == []  # exactly the tolerance
    n = 300  # exactly the tolerance in problems of a 300-problem split, whatever the float rounding of each share
    ties = [(k - 6, k) for k in range(6, n + 1) if gate({"pair_accuracy": (k - 6) / n, "pair_mean_tokens": 1.0},
                                                         {"pair_accuracy": k / n, "pair_mean_tokens": 1.0}, 0.02)]
    assert ties == []
    assert gate({"pair_accuracy": 53 / n, "pair_mean_tokens": 1.0}, {"pair_accuracy": 60 / n, "pair_mean_tokens": 1.0},
                0.02)  # one problem more: refused
    worse = gate({"pair_accuracy": 0.47, "pair_mean_tokens": 90.0}, prod, 0.02)
    assert len(worse) == 1 and "0.4700" in worse[0] and "0.5000" in worse[0]
    longer = gate({"pair_accuracy": 0.60, "pair_mean_tokens": 100.5}, prod, 0.02)
    assert len(longer) == 1 and "100.5" in longer[0]
    assert len(gate({"pair_accuracy": 0.1, "pair_mean_tokens": 200.0}, prod, 0.02)) == 2
    for bad in (float("nan"), -0.5, 5.0):  # nan would pass any accuracy
        with pytest.raises(RegistryError, match=f"tolerance must be an accuracy difference between 0 and 1, got {bad}"):
            gate({"pair_accuracy": 0.1, "pair_mean_tokens": 90.0}, prod, bad)


def test_refused_promotion_leaves_production_where_it_was(store, trained_tiny, measured):
    from longshort import registry

    metrics, _ = measured
    first = _register(trained_tiny, metrics, "candidate-1")
    decision = registry.promote(first.run_id)
    assert decision.promoted and decision.production is None
    assert _production_version(store) == "1"

    acc, tokens = metrics["pair_accuracy"], metrics["pair_mean_tokens"]
    worse = {**metrics, "pair_accuracy": acc - 0.05, "pair_mean_tokens": tokens - 1}
    second = _register(trained_tiny, worse, "candidate-worse")
    with pytest.raises(registry.PromotionRefused) as refused:
        registry.promote(second.run_id, tolerance=0.02)
    message = str(refused.value)
    assert f"{worse['pair_accuracy']:.4f}" in message and f"{metrics['pair_accuracy']:.4f}" in message
    assert _production_version(store) == "1"

    longer = {**metrics, "pair_mean_tokens": metrics["pair_mean_tokens"] + 3}
    third = _register(trained_tiny, longer, "candidate-longer")
    with pytest.raises(registry.PromotionRefused, match="pair_mean_tokens"):
        registry.promote(third.run_id)
    assert _production_version(store) == "1"
    assert str(store.get_model_version_by_alias(registry.LONG_MODEL, "production").version) == first.long

    better = {**metrics, "pair_accuracy": acc - 0.01, "pair_mean_tokens": tokens - 5}
    fourth = _register(trained_tiny, better, "candidate-shorter")
    decision = registry.promote(fourth.run_id)
    assert decision.promoted and decision.production.version == "1"
    prod = store.get_model_version_by_alias(registry.PAIR_MODEL, "production")
    assert str(prod.version) == fourth.pair == "4" and prod.tags["promoted_over"] == "1"
    for name, member in ((registry.LONG_MODEL, fourth.long), (registry.SHORT_MODEL, fourth.short)):
        assert str(store.get_model_version_by_alias(name, "production").version) == member  # both models move with it


def test_compare_lists_both_sides_and_the_verdict(store, trained_tiny, measured):
    from rich.console import Console

    from longshort import registry

    metrics, _ = measured
    registry.promote(_register(trained_tiny, metrics, "candidate-1").run_id)
    candidate = _register(trained_tiny, {**metrics, "pair_mean_tokens": metrics["pair_mean_tokens"] + 2}, "candidate-2")
    decision = registry.compare()  # newest version by default
    assert decision.candidate.version == candidate.pair and decision.production.version == "1"
    assert not decision.passed and not decision.promoted
    rows = {row[0]: row for row in registry.comparison_rows(decision.candidate, decision.production)}
    assert list(rows)[:2] == ["pair_accuracy", "pair_mean_tokens"]
    assert rows["pair_mean_tokens"][3] == "+2"
    assert rows["data.train_md5"][1:] == ("abc123", "abc123", "")
    console = Console(width=160, record=True)
    console.print(registry.comparison_table(decision))
    text = console.export_text()
    assert "candidate v2" in text and "production v1" in text and "would be refused" in text
    assert _production_version(store) == "1"
    short_id = candidate.run_id[:12]  # what the table shows
    assert f"run {short_id}" in text and registry.candidate_for_run(short_id).version == candidate.pair


def test_register_refuses_a_credential_in_tags(store, trained_tiny, measured, monkeypatch):
    from longshort import registry

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-do-not-log-123")
    with pytest.raises(registry.RegistryError, match="credential"):
        _register(trained_tiny, measured[0], "leaky", note="key=test-secret-do-not-log-123")
    assert store.search_model_versions(f"name = '{registry.PAIR_MODEL}'") == []


def test_client_for_profile_finds_the_store_or_says_where_it_looked(tmp_path, monkeypatch):
    from longshort import registry

    profile = tmp_path / "p.yaml"
    profile.write_text(f"run:\n  name: p\n  workspace: {tmp_path / 'ws'}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(registry.RegistryError, match="no MLflow store at sqlite:///.*/ws/mlflow.db"):
        registry.client_for_profile(str(profile))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    # a mistyped store is not created empty (MLflow would), it is named with where its URI came from
    with pytest.raises(registry.RegistryError, match=r"no MLflow store at sqlite:///.*/other.db \(MLFLOW_TRACKING_URI"):
        registry.client_for_profile(str(profile))
    assert not (tmp_path / "other.db").exists()
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/other.db").search_experiments()  # a store with nothing registered
    client = registry.client_for_profile(str(profile))
    assert client.tracking_uri == f"sqlite:///{tmp_path}/other.db"
    with pytest.raises(registry.RegistryError, match="no version of longshort-pair"):
        registry.compare(client=client)
    # client_for_profile pointed MLflow (and os.environ) at other.db: conftest's mlflow_state undoes that


def test_long_and_short_folders_with_one_name_stay_apart(store, trained_tiny, measured, tmp_path):
    import shutil

    import mlflow

    long_dir, short_dir = tmp_path / "a" / "model", tmp_path / "b" / "model"
    shutil.copytree(trained_tiny, long_dir)
    shutil.copytree(trained_tiny, short_dir)
    (short_dir / "role.txt").write_text("short")
    from longshort import registry

    with mlflow.start_run(run_name="same-names"):
        versions = registry.register_pair(long_dir, short_dir, measured[0], {"profile": "smoke"}, settings=_settings())
    uri = f"models:/{registry.PAIR_MODEL}/{versions.pair}"
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    assert (local / "artifacts" / "short" / "role.txt").read_text() == "short"
    assert not (local / "artifacts" / "long" / "role.txt").exists()
    assert (local / "artifacts" / "long" / "config.json").is_file()
    assert versions.long == "1" and versions.short == "1"  # distinct registered models, one version each


# --- "no production yet" is only what MLflow says about a missing alias --------------------------------
# These register versions without weights (the gate reads only run metrics and version tags), on the real
# SQLite store and on a real MLflow REST server (MLflow's own Flask app, in this process) over that store.


class _Gateway:
    """MLflow's tracking server app behind a gateway that can answer the alias lookup with a bare 503
    (what a load balancer sends when the server times out); every other request reaches the real server."""

    ALIAS_PATH = "/api/2.0/mlflow/registered-models/alias"

    def __init__(self, app) -> None:
        self.app, self.failing = app, False

    def __call__(self, environ, start_response):
        if self.failing and environ["PATH_INFO"] == self.ALIAS_PATH and environ["REQUEST_METHOD"] == "GET":
            start_response("503 Service Unavailable", [("Content-Type", "text/html")])
            return [b"<html><body>upstream request timeout</body></html>"]
        return self.app(environ, start_response)


@pytest.fixture()
def rest(store, monkeypatch: pytest.MonkeyPatch):
    """(client, gateway): an MlflowClient on http://127.0.0.1:PORT, a real MLflow server over ``store``'s SQLite."""
    import logging
    import threading

    import mlflow.server
    from mlflow.server import handlers
    from mlflow.tracking import MlflowClient
    from werkzeug.serving import make_server

    monkeypatch.setattr(handlers, "_tracking_store", store._tracking_client.store)
    monkeypatch.setattr(handlers, "_model_registry_store", store._get_registry_client().store)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a 503 fails at once, not after minutes of backoff
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    gateway = _Gateway(mlflow.server.app)
    server = make_server("127.0.0.1", 0, gateway, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield MlflowClient(tracking_uri=url, registry_uri=url), gateway
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def _bare_candidate(client, accuracy: float | None, tokens: float | None) -> str:
    """A run with the gate's metrics (None: not logged) and one version of each model, linked like
    register_pair links them."""
    from mlflow.exceptions import MlflowException

    from longshort import registry

    experiment = client.get_experiment_by_name("registry-test").experiment_id
    run = client.create_run(experiment)
    run_id = run.info.run_id
    for name, value in (("pair_accuracy", accuracy), ("pair_mean_tokens", tokens)):
        if value is not None:
            client.log_metric(run_id, name, value)
    client.set_terminated(run_id)
    versions = {}
    for name in (registry.LONG_MODEL, registry.SHORT_MODEL, registry.PAIR_MODEL):
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            assert exc.error_code == "RESOURCE_ALREADY_EXISTS", exc
        links = {"pair.long_version": versions.get(registry.LONG_MODEL, ""),
                 "pair.short_version": versions.get(registry.SHORT_MODEL, "")} if name == registry.PAIR_MODEL else {}  # fmt: skip
        source = f"{run.info.artifact_uri}/{name}"
        versions[name] = str(client.create_model_version(name, source, run_id, tags={"run_id": run_id, **links}).version)
    return run_id


def _aliases(client) -> dict[str, str | None]:
    """Where @production points on each model (None: nowhere)."""
    from longshort import registry

    return {
        name: next((a for a in client.get_registered_model(name).aliases if a == "production"), None)
        and str(client.get_model_version_by_alias(name, "production").version)
        for name in (registry.LONG_MODEL, registry.SHORT_MODEL, registry.PAIR_MODEL)
    }


@pytest.mark.parametrize("backend", ["sqlite", "rest"])
def test_first_promotion_without_production_alias_is_unconditional(store, backend, request):
    from longshort import registry

    client = store if backend == "sqlite" else request.getfixturevalue("rest")[0]
    run_id = _bare_candidate(client, 0.5, 100.0)
    assert registry.production(client) is None  # the alias is missing: MLflow's INVALID_PARAMETER_VALUE
    decision = registry.promote(run_id, client=client)
    assert decision.promoted and decision.production is None
    assert _aliases(client) == {registry.LONG_MODEL: "1", registry.SHORT_MODEL: "1", registry.PAIR_MODEL: "1"}
    assert client.get_model_version(registry.PAIR_MODEL, "1").tags["promoted_over"] == "none"


def test_production_of_an_unregistered_model_is_none(store):
    """A registry with no longshort-pair at all: MLflow's RESOURCE_DOES_NOT_EXIST, also "no production"."""
    from longshort import registry

    assert registry.production(store) is None


def test_a_failing_production_lookup_stops_the_promotion_and_moves_nothing(rest):
    from mlflow.exceptions import MlflowException

    from longshort import registry

    client, gateway = rest
    first = _bare_candidate(client, 0.5, 100.0)
    gateway.failing = True  # the lookup of @production times out: that is not "no production yet"
    with pytest.raises(MlflowException, match="registered-models/alias") as failed:
        registry.promote(first, client=client)
    assert not isinstance(failed.value, registry.PromotionRefused)
    gateway.failing = False
    assert _aliases(client) == dict.fromkeys((registry.LONG_MODEL, registry.SHORT_MODEL, registry.PAIR_MODEL))

    registry.promote(first, client=client)
    worse = _bare_candidate(client, 0.1, 500.0)  # the gate would refuse it, if it got to run
    gateway.failing = True
    with pytest.raises(MlflowException, match="registered-models/alias"):
        registry.promote(worse, client=client)
    with pytest.raises(MlflowException, match="registered-models/alias"):
        registry.compare(worse, client=client)
    gateway.failing = False
    assert _aliases(client) == {registry.LONG_MODEL: "1", registry.SHORT_MODEL: "1", registry.PAIR_MODEL: "1"}
    assert "promoted_over" not in client.get_model_version(registry.PAIR_MODEL, "2").tags


def test_cli_promote_reports_a_failing_lookup_in_one_line_and_moves_nothing(rest, monkeypatch):
    from typer.testing import CliRunner

    from longshort import registry
    from longshort.cli import app

    client, gateway = rest
    run_id = _bare_candidate(client, 0.5, 100.0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)  # what client_for_profile uses first
    gateway.failing = True
    try:
        result = CliRunner().invoke(app, ["promote", run_id])  # conftest's mlflow_state undoes its set_tracking_uri
    finally:
        gateway.failing = False
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "registered-models/alias" in lines[0], result.output
    assert _aliases(client) == dict.fromkeys((registry.LONG_MODEL, registry.SHORT_MODEL, registry.PAIR_MODEL))


def test_a_second_run_in_the_same_process_tracks_to_its_own_store(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI, which tracking_uri reads as the user's choice:
    configure puts the environment back, so the next workspace gets its own store."""
    import os

    import mlflow

    from longshort.config import load_profile
    from longshort.tracking import configure

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = configure(load_profile("smoke", [f"run.workspace={tmp_path / 'a'}"]))
    second = configure(load_profile("smoke", [f"run.workspace={tmp_path / 'b'}"]))
    assert first == f"sqlite:///{tmp_path / 'a'}/mlflow.db" and second == f"sqlite:///{tmp_path / 'b'}/mlflow.db"
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() == second
    monkeypatch.setenv("MLFLOW_TRACKING_URI", second)  # the user's choice still wins
    assert configure(load_profile("smoke", [f"run.workspace={tmp_path / 'a'}"])) == second
    assert os.environ["MLFLOW_TRACKING_URI"] == second


# --- promotion is all-or-nothing, and the gate compares only finite numbers ---------------------------
# Registry failures are simulated by subclasses of MLflow's own MlflowClient that fail on one chosen call
# (a locked database or a 5xx cannot be produced on demand here); everything else is the real SQLite store.

ALL_UNSET = {"longshort-long": None, "longshort-short": None, "longshort-pair": None}


def _at(version: str) -> dict[str, str]:
    return dict.fromkeys(ALL_UNSET, version)


def _failing_client(store, fail_on: str, times: int = 1, method: str = "set_registered_model_alias"):
    """A client on ``store`` whose ``method`` raises for model ``fail_on`` on its first ``times`` calls."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    calls: list[tuple] = []

    class Failing(MlflowClient):
        pass

    def failing(self, name, *args, **kwargs):
        calls.append((name, *args))
        if name == fail_on and sum(c[0] == fail_on for c in calls) <= times:
            raise MlflowException(f"simulated: database is locked ({method} {name})")
        return getattr(MlflowClient, method)(self, name, *args, **kwargs)

    setattr(Failing, method, failing)
    return Failing(tracking_uri=store.tracking_uri, registry_uri=store._registry_uri), calls


def test_a_deleted_member_version_refuses_before_anything_moves(store):
    from longshort import registry

    registry.promote(_bare_candidate(store, 0.5, 100.0), client=store)
    second = _bare_candidate(store, 0.6, 90.0)
    store.delete_model_version(registry.SHORT_MODEL, "2")  # e.g. a cleanup removed it
    with pytest.raises(registry.RegistryError, match=r"longshort-short v2, which longshort-pair v2 names .* does not "
                                                     r"exist.*nothing was moved"):  # fmt: skip
        registry.promote(second, client=store)
    assert _aliases(store) == _at("1")
    assert "promoted_at" not in store.get_model_version(registry.PAIR_MODEL, "2").tags


@pytest.mark.parametrize(
    ("fail_on", "restored"),
    [("longshort-short", "longshort-long@production back to v1"),
     ("longshort-pair", "longshort-short@production back to v1, longshort-long@production back to v1")],
)  # fmt: skip
def test_a_failing_alias_move_puts_back_the_ones_already_moved(store, fail_on, restored):
    from longshort import registry

    registry.promote(_bare_candidate(store, 0.5, 100.0), client=store)
    second = _bare_candidate(store, 0.6, 90.0)
    flaky, _ = _failing_client(store, fail_on)
    with pytest.raises(registry.RegistryError) as failed:
        registry.promote(second, client=flaky)
    assert str(failed.value) == (f"moving @production on {fail_on} to v2 failed (simulated: database is locked "
                                 f"(set_registered_model_alias {fail_on})); restored {restored}")  # fmt: skip
    assert _aliases(store) == _at("1")
    assert "promoted_at" not in store.get_model_version(registry.PAIR_MODEL, "2").tags
    assert registry.promote(second, client=store).promoted and _aliases(store) == _at("2")  # a retry goes through


def test_a_failed_first_promotion_deletes_the_aliases_it_set(store):
    from longshort import registry

    first = _bare_candidate(store, 0.5, 100.0)
    flaky, _ = _failing_client(store, registry.PAIR_MODEL)
    with pytest.raises(registry.RegistryError, match="restored longshort-short@production back to unset, "
                                                     "longshort-long@production back to unset"):  # fmt: skip
        registry.promote(first, client=flaky)
    assert _aliases(store) == ALL_UNSET


def test_a_failed_restore_names_the_inconsistent_models(store):
    from longshort import registry

    registry.promote(_bare_candidate(store, 0.5, 100.0), client=store)
    second = _bare_candidate(store, 0.6, 90.0)
    # longshort-long: its move works, putting it back fails; longshort-short: its move fails
    flaky, calls = _failing_client(store, registry.SHORT_MODEL)
    original = type(flaky).set_registered_model_alias

    def long_undo_fails(self, name, alias, version):
        if name == registry.LONG_MODEL and version == "1":
            from mlflow.exceptions import MlflowException

            raise MlflowException("simulated: server went away")
        return original(self, name, alias, version)

    type(flaky).set_registered_model_alias = long_undo_fails
    with pytest.raises(registry.RegistryError) as failed:
        registry.promote(second, client=flaky)
    message = str(failed.value)
    assert "restoring failed, @production is now inconsistent: longshort-long@production is v2, was v1" in message
    assert "simulated: server went away" in message
    assert _aliases(store) == {registry.LONG_MODEL: "2", registry.SHORT_MODEL: "1", registry.PAIR_MODEL: "1"}


def test_non_finite_metrics_never_pass_the_gate(store):
    from longshort import registry

    nan, inf = float("nan"), float("inf")
    prod = {"pair_accuracy": 0.9, "pair_mean_tokens": 10.0}
    assert registry.gate({"pair_accuracy": nan, "pair_mean_tokens": 5.0}, prod, 0.02) == [
        "candidate's pair_accuracy is nan, not a finite number; cannot be compared"]  # fmt: skip
    assert registry.gate({"pair_accuracy": 0.0, "pair_mean_tokens": 1e9}, {**prod, "pair_mean_tokens": inf}, 0.02) == [
        "production's pair_mean_tokens is inf, not a finite number; cannot be compared"]  # fmt: skip
    assert registry.gate({"pair_accuracy": 0.9}, prod, 0.02) == [
        "candidate's run has no metric ['pair_mean_tokens']; cannot be compared"]  # fmt: skip

    lone_nan = _bare_candidate(store, nan, 10.0)  # no production yet: still refused
    with pytest.raises(registry.PromotionRefused, match="candidate's pair_accuracy is nan") as refused:
        registry.promote(lone_nan, client=store)
    assert not refused.value.decision.passed and _aliases(store) == ALL_UNSET

    registry.promote(_bare_candidate(store, 0.9, 10.0), client=store)
    with pytest.raises(registry.PromotionRefused, match="candidate's pair_mean_tokens is nan"):
        registry.promote(_bare_candidate(store, 0.95, nan), client=store)
    assert _aliases(store) == _at("2")


def test_register_pair_refuses_non_finite_gate_metrics(store, tmp_path):
    from longshort import registry

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # the metrics are checked before the weights are read
    with pytest.raises(registry.RegistryError, match=r"gate metrics \{'pair_mean_tokens': nan\} are not finite"):
        registry.register_pair(folder, folder, {"pair_accuracy": 0.5, "pair_mean_tokens": float("nan")}, {})
    assert store.search_model_versions(f"name = '{registry.PAIR_MODEL}'") == []
    assert store.search_runs([store.get_experiment_by_name("registry-test").experiment_id]) == []


def _cli(store, monkeypatch, *args: str):
    from typer.testing import CliRunner

    from longshort.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.tracking_uri)  # conftest's mlflow_state undoes the rest
    return CliRunner().invoke(app, list(args))


def test_a_refused_first_candidate_is_shown_refused(store, monkeypatch):
    from rich.console import Console

    from longshort import registry

    run_id = _bare_candidate(store, None, 100.0)  # no production yet, and no pair_accuracy
    decision = registry.compare(run_id, client=store)
    assert not decision.passed and decision.production is None
    assert decision.summary().endswith(
        "metrics missing; no @production yet; refused: candidate's run has no metric ['pair_accuracy']; "
        "cannot be compared")  # fmt: skip
    console = Console(width=160, record=True)
    console.print(registry.comparison_table(decision))
    text = " ".join(console.export_text().split())  # the caption wraps at the table's width
    assert "would be refused: candidate's run has no metric ['pair_accuracy']" in text and "would set it" not in text

    result = _cli(store, monkeypatch, "promote", run_id)
    assert result.exit_code == 1, result.output
    assert "refused: @production stays unset" in result.output and "vnone" not in result.output
    assert _aliases(store) == ALL_UNSET


def test_promoting_the_production_pair_again_changes_nothing(store, monkeypatch):
    from longshort import registry

    registry.promote(_bare_candidate(store, 0.5, 100.0), client=store)
    second = _bare_candidate(store, 0.6, 90.0)
    registry.promote(second, client=store)
    tags = store.get_model_version(registry.PAIR_MODEL, "2").tags
    assert tags["promoted_over"] == "1"

    flaky, calls = _failing_client(store, "none")  # counts the alias moves
    again = registry.promote(second, client=flaky)
    assert (again.promoted, again.passed, again.moved, again.is_production) == (False, True, (), True)
    assert again.summary().endswith("already at @production") and calls == []
    assert store.get_model_version(registry.PAIR_MODEL, "2").tags == tags  # promoted_at/_over kept

    store.set_registered_model_alias(registry.SHORT_MODEL, "production", "1")  # a partial state, e.g. by hand
    repair = registry.promote(second, client=flaky)
    assert (repair.promoted, repair.moved) == (False, (registry.SHORT_MODEL,))
    assert calls == [(registry.SHORT_MODEL, "production", "2")] and _aliases(store) == _at("2")
    assert store.get_model_version(registry.PAIR_MODEL, "2").tags == tags

    store.set_registered_model_alias(registry.LONG_MODEL, "production", "1")
    result = _cli(store, monkeypatch, "promote", second)  # the table, its caption, then what was done
    assert result.exit_code == 0, result.output
    assert result.output.split("└")[-1].splitlines()[1:] == [
        "already at @production",
        "longshort-pair v2 is already at @production; moved @production on longshort-long to it",
    ]
    result = _cli(store, monkeypatch, "promote", second)
    assert result.exit_code == 0 and result.output.splitlines()[-1].endswith("already at @production; nothing moved")
    assert _aliases(store) == _at("2") and store.get_model_version(registry.PAIR_MODEL, "2").tags == tags


def test_a_production_run_without_a_gate_metric_is_compared_not_crashed(store, monkeypatch):
    from longshort import registry

    _bare_candidate(store, 0.5, None)
    store.set_registered_model_alias(registry.PAIR_MODEL, "production", "1")  # e.g. set by hand in the UI
    candidate = _bare_candidate(store, 0.6, 90.0)
    decision = registry.compare(client=store)
    assert not decision.passed and decision.production.version == "1"
    assert decision.reasons == ["production's run has no metric ['pair_mean_tokens']; cannot be compared"]

    result = _cli(store, monkeypatch, "compare")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "pair_mean_tokens" in line)
    assert [cell.strip() for cell in row.split("│")[1:5]] == ["pair_mean_tokens", "90", "—", ""]
    assert "would be refused: production's run has no metric ['pair_mean_tokens']" in " ".join(result.output.split())

    result = _cli(store, monkeypatch, "promote", candidate)
    assert result.exit_code == 1, result.output
    assert "refused: @production stays at v1" in result.output
    assert str(store.get_model_version_by_alias(registry.PAIR_MODEL, "production").version) == "1"


def test_a_failing_digest_lookup_is_not_taken_for_unregistered(store, tmp_path, monkeypatch):
    """A locked database or a 5xx on the digest search must not register the weights a second time."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from longshort import registry, tracking

    assert store.search_model_versions("name = 'never-registered'") == []  # MLflow 3: no error for a new name
    assert tracking.find_registered_version("never-registered", "0" * 32) is None

    class Locked(MlflowClient):
        def search_model_versions(self, *args, **kwargs):
            raise MlflowException("simulated: database is locked")

    monkeypatch.setattr(tracking, "MlflowClient", Locked)
    monkeypatch.setattr(registry, "MlflowClient", Locked)
    with pytest.raises(MlflowException, match="database is locked"):
        tracking.find_registered_version(registry.LONG_MODEL, "0" * 32)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(MlflowException, match="database is locked"):
        registry._register_transformers(folder, registry.LONG_MODEL, "long_model", {})
    assert store.search_registered_models() == []


def test_production_moved_by_someone_else_during_the_gate_stops_the_promotion(store):
    from mlflow.tracking import MlflowClient

    from longshort import registry

    registry.promote(_bare_candidate(store, 0.5, 100.0), client=store)
    _bare_candidate(store, 0.1, 500.0)  # v2: what the other user puts at @production meanwhile
    third = _bare_candidate(store, 0.6, 90.0)

    class Racing(MlflowClient):
        """Another promotion lands right after the gate read @production (v1)."""

        lookups = 0

        def get_model_version_by_alias(self, name, alias):
            found = super().get_model_version_by_alias(name, alias)
            if name == registry.PAIR_MODEL and not Racing.lookups:
                Racing.lookups += 1
                store.set_registered_model_alias(registry.PAIR_MODEL, "production", "2")
            return found

    with pytest.raises(registry.RegistryError, match="longshort-pair@production moved from 1 to 2 while the gate ran"):
        registry.promote(third, client=Racing(tracking_uri=store.tracking_uri, registry_uri=store._registry_uri))
    assert _aliases(store) == {registry.LONG_MODEL: "1", registry.SHORT_MODEL: "1", registry.PAIR_MODEL: "2"}


def test_params_keep_every_setting_and_leave_out_fields_named_as_secrets():
    """The params are the profile, flattened: the turn caps and vocabulary size are settings to compare runs by
    (a substring match on 'token' dropped nine of them); a field named like a secret stays out."""
    from longshort.config import load_profile
    from longshort.tracking import PARAM_VALUE_MAX, flatten

    params = flatten(load_profile("qwen2.5-7b").model_dump(mode="json"))
    for name in ("protocol.max_new_tokens_long", "protocol.max_new_tokens_short", "tokenizer.vocab_size",
                 "data.teacher_max_new_tokens", "score.max_new_tokens"):  # fmt: skip
        assert name in params, name
    hidden = flatten({"hub": {"hf_token": "x", "api_key": "y", "password": "z", "max_new_tokens": 3, "tokenizer": 1}})
    assert hidden == {"hub.max_new_tokens": "3", "hub.tokenizer": "1"}
    assert len(flatten({"a": {"b": "v" * 7000}})["a.b"]) == PARAM_VALUE_MAX


def test_a_rerun_of_the_same_pair_reuses_its_version_and_is_found_by_its_own_run(store, trained_tiny, measured):
    """A fully cached pipeline rerun registers the same weights with the same settings: no second copy of both
    models; the version keeps its first run's lineage and records the rerun, which promote and compare find."""
    import mlflow

    from longshort import registry

    first = _register(trained_tiny, measured[0], "first")
    again = _register(trained_tiny, measured[0], "cached rerun")
    assert again.pair == first.pair == "1" and again.run_id != first.run_id
    version = store.get_model_version(registry.PAIR_MODEL, first.pair)
    assert version.run_id == first.run_id and version.tags[f"{registry.ALSO_RUN_TAG}{again.run_id}"] == "1"
    assert registry.candidate_for_run(again.run_id[:12], store).version == "1"
    assert store.get_run(again.run_id).data.tags["registered.pair"] == f"{registry.PAIR_MODEL}/1"
    assert len(store.search_model_versions(f"name = '{registry.PAIR_MODEL}'")) == 1
    # other serving settings are another pair
    with mlflow.start_run(run_name="other settings"):
        other = registry.register_pair(trained_tiny, trained_tiny, measured[0], {},
                                       settings=_settings().model_copy(update={"seed": 1}))  # fmt: skip
    assert other.pair == "2"


def test_an_interrupted_run_before_any_stage_is_a_killed_run_with_params(tmp_path, monkeypatch):
    """Ctrl-C before the first stage finished: a KILLED run with the profile's params and no stage runs
    (log_failed_pipeline also serves the pipeline's FAILED runs; test_pipeline checks those end to end)."""
    from mlflow.tracking import MlflowClient

    from longshort.config import load_profile
    from longshort.tracking import log_failed_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    profile = load_profile("smoke", [f"run.workspace={tmp_path}"])
    run_id = log_failed_pipeline(profile, [], "synthesize", KeyboardInterrupt(), flow_time_s=1.5)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["failed_stage"] == "synthesize"
    assert run.data.tags["error"] == "KeyboardInterrupt: " and run.data.tags["profile"] == "smoke"
    assert run.data.params["run.name"] == "smoke" and run.data.metrics == {"flow_time_s": 1.5}
    assert client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'") == []


def test_compare_gives_no_delta_for_interval_bounds():
    """Two runs' interval bounds are listed side by side, but their difference means nothing."""
    from longshort.registry import Snapshot, comparison_rows

    metrics = {"pair_accuracy": 0.9, "pair_mean_tokens": 110.0, "heldout.long_short_rl.accuracy_ci_low": 0.87}
    candidate = Snapshot("2", "run2", {**metrics, "pair_accuracy": 0.93, "heldout.long_short_rl.accuracy_ci_low": 0.9}, {})
    rows = {row[0]: row for row in comparison_rows(candidate, Snapshot("1", "run1", metrics, {}))}
    assert rows["pair_accuracy"][3] == "+0.03"
    assert rows["heldout.long_short_rl.accuracy_ci_low"][1:] == ("0.9", "0.87", "")
