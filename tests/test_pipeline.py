"""The pipeline on the smoke profile: real Prefect server, real MLflow (SQLite), real DVC."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import STAGES
from tasks.report import slug

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow




@pytest.fixture(scope="module")
def smoke_runs(prefect_server, tmp_path_factory):
    from flows.pipeline import pipeline

    work = tmp_path_factory.mktemp("pipeline")
    old = os.getcwd()
    os.chdir(work)
    try:
        first = pipeline(profile="smoke")
        second = pipeline(profile="smoke")
        theta = pipeline(profile="smoke", overrides=["cold_start.theta=0.3"])
        rl = pipeline(profile="smoke", overrides=["cold_start.theta=0.3", "rl.efficiency=truncation"])
        yield work, first, second, theta, rl
    finally:
        os.chdir(old)


def _jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_first_run_computes_every_stage(smoke_runs):
    _, first, _, _, _ = smoke_runs
    assert first["cache_hits"] == 0 and set(first["recomputed"]) == STAGES
    m, dirs = first["metrics"], {k: Path(v) for k, v in first["stage_dirs"].items()}
    assert m["n_train"] == 48 and m["n_heldout"] == 16 and m["base_n"] == 16
    # the base model's numbers are those of its own episodes
    think = _jsonl(dirs["evaluate_base"] / "episodes_think.jsonl")
    assert len(think) == m["base_n"]
    assert m["base_accuracy"] == pytest.approx(sum(r["correct"] for r in think) / len(think))
    assert m["base_mean_tokens"] == pytest.approx(sum(r["tokens"] for r in think) / len(think)) and m["base_mean_tokens"] > 0
    assert m["train_steps"] >= 3
    assert m["chunk_train_traces"] == 16 and m["chunk_heldout_traces"] == 8
    assert m["cold_start_n_episodes"] == 16 and m["rl_steps"] == 2
    # two steps: the first quarter is step 1, the last is step 2, as the RL history says
    history = _jsonl(dirs["rl"] / "history.jsonl")
    assert len(history) == 2
    assert m["rl_reward_first_quarter"] == m["rl_first_reward"] == pytest.approx(history[0]["reward/total"])
    assert m["rl_reward_last_quarter"] == m["rl_last_reward"] == pytest.approx(history[-1]["reward/total"])
    assert m["rl_accuracy_last_quarter"] == pytest.approx(history[-1]["accuracy"])
    assert m["rl_tokens_first_quarter"] == pytest.approx(history[0]["tokens/total"]) and m["rl_tokens_first_quarter"] > 0
    # the probe: the same 4 problems before step 1 (the SFT pair) and after step 2 (the RL pair)
    probes = _jsonl(dirs["rl"] / "probes.jsonl")
    assert [p["step"] for p in probes] == [0, 1, 2]
    assert (probes[0]["reward"], probes[-1]["reward"]) == (m["rl_probe_reward_start"], m["rl_probe_reward_end"])
    assert (probes[0]["accuracy"], probes[-1]["tokens"]) == (m["rl_probe_accuracy_start"], m["rl_probe_tokens_end"])
    assert m["rl_probe_tokens_end"] > 0
    gain = m["rl_probe_reward_gain"]
    assert gain == pytest.approx(m["rl_probe_reward_end"] - m["rl_probe_reward_start"])
    assert m["rl_probe_reward_gain_ci_low"] <= gain <= m["rl_probe_reward_gain_ci_high"]
    baseline = _jsonl(dirs["baseline"] / "history.jsonl")
    assert m["baseline_steps"] == 1 == len(baseline) and m["baseline_last_reward"] == pytest.approx(baseline[-1]["reward"])
    # each system's accuracy and mean tokens are those of its records (k samples of each held-out problem)
    records = _jsonl(dirs["evaluate"] / "records.jsonl")
    systems = {"long_cot_base", "truncation_baseline", "long_short_sft", "long_short_rl"}
    by_system: dict[str, list[dict]] = {}
    for r in records:
        assert r["benchmark"] == "heldout"
        by_system.setdefault(slug(r["system"]), []).append(r)
    assert set(by_system) == systems
    for system, rows in by_system.items():
        per_problem = Counter(r["problem_id"] for r in rows)
        assert len(set(per_problem.values())) == 1, f"{system}: problems sampled unequally {per_problem}"
        assert m[f"heldout.{system}.accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
        tokens = [r["tokens_long"] + r["tokens_short"] for r in rows]
        assert m[f"heldout.{system}.mean_tokens"] == pytest.approx(sum(tokens) / len(tokens))
        assert m[f"heldout.{system}.accuracy_ci_low"] <= m[f"heldout.{system}.accuracy"] <= m[f"heldout.{system}.accuracy_ci_high"]
    # every other system against the long-CoT base, on the same problems, with paired intervals
    base = "heldout.long_cot_base"
    assert f"{base}.accuracy_diff_vs_ref" not in m
    for system in systems - {"long_cot_base"}:
        p = f"heldout.{system}"
        diff, ratio = m[f"{p}.accuracy_diff_vs_ref"], m[f"{p}.token_ratio_vs_ref"]
        assert diff == pytest.approx(m[f"{p}.accuracy"] - m[f"{base}.accuracy"])
        assert ratio == pytest.approx(m[f"{p}.mean_tokens"] / m[f"{base}.mean_tokens"])
        assert m[f"{p}.accuracy_diff_vs_ref_ci_low"] <= diff <= m[f"{p}.accuracy_diff_vs_ref_ci_high"]
        assert m[f"{p}.token_ratio_vs_ref_ci_low"] <= ratio <= m[f"{p}.token_ratio_vs_ref_ci_high"]
    assert (Path(first["report"]).parent / "heldout_budget.png").stat().st_size > 0


def test_rerun_is_all_cache_hits_with_identical_results(smoke_runs):
    _, first, second, _, _ = smoke_runs
    assert second["cache_hits"] == second["n_stages"] == first["n_stages"] and second["recomputed"] == []
    assert second["metrics"] == first["metrics"]
    assert second["base_model_version"] == first["base_model_version"]


def test_changing_theta_reruns_only_cold_start_and_what_follows(smoke_runs):
    _, first, _, theta, _ = smoke_runs
    assert set(theta["recomputed"]) == {"cold_start", "sft_long", "sft_short", "rl", "evaluate"}
    assert theta["metrics"]["n_train"] == first["metrics"]["n_train"]


def test_changing_rl_settings_reruns_only_rl_and_evaluation(smoke_runs):
    _, _, _, theta, rl = smoke_runs
    assert set(rl["recomputed"]) == {"rl", "evaluate"}
    assert rl["metrics"]["cold_start_n_long"] == theta["metrics"]["cold_start_n_long"]


def test_mlflow_holds_runs_params_metrics_and_registered_model(smoke_runs):
    from mlflow.tracking import MlflowClient

    work, first, _, _, _ = smoke_runs
    assert first["tracking_uri"] == f"sqlite:///{work}/workspace/mlflow.db"
    client = MlflowClient(tracking_uri=first["tracking_uri"], registry_uri=first["tracking_uri"])
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.params["sft_base.learning_rate"] == "0.003"
    assert run.data.params["data.demo.n_train"] == "48"
    assert run.data.metrics["base_accuracy"] == first["metrics"]["base_accuracy"]
    for name in ("accuracy_diff_vs_ref", "accuracy_diff_vs_ref_ci_low", "token_ratio_vs_ref_ci_high"):
        assert run.data.metrics[f"heldout.long_short_rl.{name}"] == first["metrics"][f"heldout.long_short_rl.{name}"]
    assert "protocol.max_new_tokens_long" in run.data.params  # a setting, not a secret, though it says 'token'
    # every stage measures its peak memory: one metric per stage in the parent, and the run's peak
    stage_peaks = {k: v for k, v in run.data.metrics.items() if k.endswith(".peak_rss_mb")}
    assert {"rl.peak_rss_mb", "sft_base.peak_rss_mb"} <= stage_peaks.keys()
    assert run.data.metrics["peak_rss_mb"] == max(stage_peaks.values())
    assert len(run.data.tags["data.train_md5"]) == 32 and run.data.tags["git_commit"]
    exp = client.get_experiment(run.info.experiment_id)
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {c.data.tags["stage"] for c in children} == STAGES - {"score_shard"}
    rl_run = next(c for c in children if c.data.tags["stage"] == "rl")
    curve = client.get_metric_history(rl_run.info.run_id, "rl.probe.reward")
    assert [h.step for h in sorted(curve, key=lambda h: h.step)] == [0, 1, 2]
    assert {h.step for h in client.get_metric_history(rl_run.info.run_id, "rl.long.reward/total")} == {1}
    version = client.get_model_version("longshort-base", first["base_model_version"])
    assert version.tags["run_id"] == first["mlflow_run_id"] and len(version.tags["model_digest"]) == 64


def test_dvc_repro_writes_the_same_bytes_as_the_flow(smoke_runs, tmp_path):
    """`dvc repro` of the data stages (synthesize, sft_base, chunk, score, cold_start) on the smoke profile."""
    from longshort.config import load_profile
    from longshort.io import tree_digest

    work, first, _, _, _ = smoke_runs
    # dvc.yaml's deps: the code of every stage (tasks, models, flows, longshort), not only the data
    for rel in ("dvc.yaml", "configs/smoke.yaml", *(str(p.relative_to(REPO)) for p in REPO.glob("infra/deepspeed/*.json")),
                *(str(p.relative_to(REPO)) for d in ("tasks", "models", "flows", "longshort") for p in REPO.glob(f"{d}/*.py"))):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    demo = load_profile("smoke").data.demo.model_dump(mode="json")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"profile": "smoke", "demo": demo}))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (["dvc", "init", "--no-scm", "-q"], ["dvc", "repro", "-q"]):
        subprocess.run([str(bin_dir / cmd[0]), *cmd[1:]], cwd=tmp_path, env=env, check=True, timeout=600)
    data, dirs = tmp_path / "data/demo", {k: Path(v) for k, v in first["stage_dirs"].items()}
    for split in ("train", "heldout"):
        assert (data / f"{split}.jsonl").read_bytes() == (dirs["synthesize"] / f"{split}.jsonl").read_bytes()
    assert tree_digest(data / "sft_base/model") == tree_digest(dirs["sft_base"] / "model")
    for stage, names in (("chunk", ["chunks_train", "chunks_heldout"]), ("merge_scores", ["scored_train", "scored_heldout"]),
                         ("cold_start", ["d_long", "d_short"])):  # fmt: skip
        dvc_dir = data / ("score" if stage == "merge_scores" else stage)
        for name in names:
            assert (dvc_dir / f"{name}.jsonl").read_bytes() == (dirs[stage] / f"{name}.jsonl").read_bytes(), name
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    outs = {Path(o["path"]).name: o["md5"] for o in lock["stages"]["synthesize"]["outs"]}
    assert outs["train.jsonl"] == json.loads((dirs["synthesize"] / "record.json").read_text())["digests"]["train_md5"]



def test_a_stage_folder_removed_by_hand_is_computed_again(smoke_runs):
    """Prefect's cached result is a record of a folder: with the folder gone, the stage runs again (it used to
    return the record of files that no longer existed, and track failed on them)."""
    from flows.pipeline import pipeline
    from longshort.records import StageRecord

    work, _, _, _, rl = smoke_runs
    folder = Path(rl["stage_dirs"]["evaluate"])  # artifacts/evaluate/<key16>; the other runs' folders stay
    others = sorted(d for d in folder.parent.iterdir() if d.is_dir() and d != folder)
    shutil.rmtree(folder)  # the stage lock file beside it stays
    old = os.getcwd()
    os.chdir(work)
    try:
        again = pipeline(profile="smoke", overrides=["cold_start.theta=0.3", "rl.efficiency=truncation"])
    finally:
        os.chdir(old)
    assert again["recomputed"] == ["evaluate"] and again["metrics"] == rl["metrics"]
    assert Path(again["stage_dirs"]["evaluate"]) == folder and StageRecord.load(folder) is not None
    assert sorted(d for d in folder.parent.iterdir() if d.is_dir() and d != folder) == others


def test_a_failed_run_is_an_mlflow_run_naming_the_stage_and_error(smoke_runs):
    """A stage that fails leaves a FAILED MLflow run: the profile's params, the stages that finished before it
    as nested runs, and tags naming the stage and the error (all tracking used to happen in the last task,
    so a failed pipeline left nothing to compare)."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import pipeline
    from longshort.io import DataError

    work, _, _, _, rl = smoke_runs
    d_long = Path(rl["stage_dirs"]["cold_start"]) / "d_long.jsonl"
    good = d_long.read_bytes()
    n_lines = good.count(b"\n")
    overrides = ["cold_start.theta=0.3", "rl.efficiency=truncation", "sft_long.learning_rate=0.002"]
    old = os.getcwd()
    os.chdir(work)
    try:
        d_long.write_bytes(good + b'{"role": "long", "completion": \n')  # a cut-off row: sft_long must read it
        with pytest.raises(DataError, match=rf"d_long\.jsonl:{n_lines + 1}:"):
            pipeline(profile="smoke", overrides=overrides)
    finally:
        d_long.write_bytes(good)
        os.chdir(old)
    client = MlflowClient(tracking_uri=rl["tracking_uri"])
    exp = client.get_run(rl["mlflow_run_id"]).info.experiment_id
    failed = client.search_runs([exp], "attributes.status = 'FAILED' and tags.failed_stage = 'sft_long'")
    assert len(failed) == 1
    run = failed[0]
    assert run.data.tags["error"].startswith("DataError: ") and "d_long.jsonl" in run.data.tags["error"]
    assert run.data.params["sft_long.learning_rate"] == "0.002" and run.data.tags["data.train_md5"]
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {c.data.tags["stage"] for c in children} == {
        "synthesize", "sft_base", "evaluate_base", "chunk", "merge_scores", "cold_start"
    }  # fmt: skip
    assert run.data.metrics["cold_start_n_long"] == rl["metrics"]["cold_start_n_long"]
    assert "registered.base_model" not in run.data.tags
