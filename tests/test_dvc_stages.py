"""The DVC path: `longshort stage` (a rerun after a settings change, which data it runs on) and dvc.yaml's deps."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml


def test_score_after_a_settings_change_recomputes_its_shards_and_merges(tmp_path):
    from flows.dvc_stages import run_data_stage
    from longshort.config import DemoTaskConfig, load_profile
    from longshort.io import iter_jsonl
    from tasks.synthesize import synthesize_demo

    data = tmp_path / "data"
    synthesize_demo(DemoTaskConfig(n_train=12, n_heldout=4, seed=2), data)
    base = ["sft_base.max_steps=2", "score.n_train_traces=2", "score.n_heldout_traces=1", "score.shard_size=2"]
    run_data_stage("sft_base", load_profile("smoke", base), data)
    run_data_stage("chunk", load_profile("smoke", base), data)
    first = run_data_stage("score", load_profile("smoke", base), data)
    second = run_data_stage("score", load_profile("smoke", [*base, "score.n_rollouts=1"]), data)
    assert second.key != first.key  # before the fix: FileNotFoundError, the merge removed the new shards
    shard_keys = {
        (data / "score" / "shards" / d.name / "record.json").read_text().count(second.key)
        for d in (data / "score" / "shards").iterdir() if d.is_dir()
    }
    assert shard_keys == {1}  # every shard folder now holds the new inputs' record
    rows = [r for _, r in iter_jsonl(second.outputs["train"])]
    assert len(rows) == 2 and all(len(r["acc"]) == len(r["thoughts"]) + 1 for r in rows)


# dvc.yaml's deps: the code that decides each stage's outputs, so that `dvc repro` reruns a stage after an edit

REPO = Path(__file__).resolve().parents[1]
OURS = ("flows", "tasks", "models", "longshort")


def _file(module: str) -> str:
    path = f"{module.replace('.', '/')}.py"
    assert (REPO / path).is_file(), module
    return path


def _top_level_imports(path: str) -> set[str]:
    """Our modules that ``path`` imports at module level (``from flows import stages`` counts flows.stages)."""
    found: set[str] = set()
    for node in ast.parse((REPO / path).read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in OURS and (REPO / f"{m.replace('.', '/')}.py").is_file()}


def _code_deps(stage: str) -> set[str]:
    """What dvc.yaml must list for ``stage``: the files of STAGE_MODULES of its code stages, the CLI that runs it
    and longshort/config.py (DVC sees the profile's YAML, not the defaults it resolves to); for the stages that
    run through `longshort stage`, flows/dvc_stages.py, flows/stages.py and our modules those two import."""
    from flows.caching import STAGE_MODULES
    from flows.dvc_stages import CODE_STAGES, DATA_STAGES

    files = {_file(m) for code in CODE_STAGES[stage] for m in STAGE_MODULES[code]}
    files |= {"longshort/cli.py", "longshort/config.py"}
    if stage in DATA_STAGES:
        runner = {"flows/dvc_stages.py", "flows/stages.py"}
        files |= runner | {_file(m) for path in runner for m in _top_level_imports(path)}
    return files


def test_dvc_yaml_lists_the_code_of_every_stage_as_its_deps():
    """Before: score missed tasks/answers.py and models/protocol.py, no stage had flows/stages.py or
    longshort/io.py, so `dvc repro` called an edited pipeline up to date and kept the old outputs."""
    from flows.dvc_stages import CODE_STAGES, DATA_STAGES

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert stages.keys() == CODE_STAGES.keys() == {"synthesize", *DATA_STAGES}
    for name, stage in stages.items():
        listed = {d for d in stage["deps"] if d.endswith(".py")}
        assert listed == _code_deps(name), (name, sorted(_code_deps(name) - listed), sorted(listed - _code_deps(name)))
        if name in DATA_STAGES:
            assert stage["cmd"].startswith(f"longshort stage {name} ")
    assert {"tasks/answers.py", "models/protocol.py", "tasks/importance.py", "flows/stages.py"} <= _code_deps("score")
    assert {"tasks/chunking.py", "models/protocol.py", "longshort/io.py"} <= _code_deps("cold_start")


def test_sft_base_is_keyed_by_the_content_of_its_deepspeed_file(tmp_path):
    """dvc.yaml lists the shipped ZeRO configs as sft_base's deps, and a manual `longshort stage sft_base` after an
    edit of the file its profile names recomputes (the stage's input key holds the file's digest, as the flow's does)."""
    from flows.dvc_stages import _inputs_key
    from longshort.config import load_profile

    sft_base = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["sft_base"]
    assert "infra/deepspeed" in sft_base["deps"]
    zero = tmp_path / "zero2.json"
    zero.write_text((REPO / "infra/deepspeed/zero2.json").read_text())
    profile = load_profile("demo", [f"sft_base.deepspeed={zero}"])
    first, chunk = _inputs_key("sft_base", profile, tmp_path), _inputs_key("chunk", profile, tmp_path)
    assert _inputs_key("sft_base", profile, tmp_path) == first
    zero.write_text(zero.read_text().replace("{", '{"gradient_clipping": 0.5,', 1))
    assert _inputs_key("sft_base", profile, tmp_path) != first
    assert _inputs_key("chunk", profile, tmp_path) == chunk  # it does not read the file (nor does its key)
    from flows.stages import file_digests

    # a DVC stage hashes only its own files (a local base-model folder is not read again for chunk, score, ...)
    assert file_digests(profile, ["chunk"]) == {} and file_digests(profile, ["sft_base"]) == {
        "sft_base": file_digests(profile)["sft_base"]
    }


# `longshort stage` runs only on the splits dvc.yaml's synthesize stage wrote from params.yaml's `demo` section


def _cli_stage(*args: str):
    from typer.testing import CliRunner

    from longshort.cli import app

    return CliRunner().invoke(app, ["stage", *args])


def _refused(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture()
def demo_split(in_tmp_repo):
    """A synthesized split in the scratch repository (whose params.yaml is the project's, the demo profile's)."""
    from longshort.config import DemoTaskConfig
    from tasks.synthesize import synthesize_demo

    data = in_tmp_repo / "data"
    synthesize_demo(DemoTaskConfig(n_train=8, n_heldout=4, seed=3), data)
    return data


def test_the_demo_profile_is_what_params_yaml_synthesizes():
    from tasks.versioning import demo_params_mismatch
    from longshort.config import load_profile

    assert demo_params_mismatch(load_profile("demo").data, REPO / "params.yaml") is None


@pytest.mark.parametrize("profile", ["qwen2.5-7b", "llama3.1-8b"])
def test_stage_refuses_a_profile_of_other_data(demo_split, profile):
    """Before: `longshort stage chunk -p qwen2.5-7b` chunked the demo's arithmetic traces (and `dvc repro` with
    `profile: qwen2.5-7b` would have trained the 7B model on them)."""
    line = _refused(_cli_stage("chunk", "-p", profile, "--data", str(demo_split)),
                    f"profile '{profile}': data.source is 'teacher', not 'demo'", f"`longshort run -p {profile}`")  # fmt: skip
    assert "params.yaml's 'demo' section to" not in line  # no params.yaml makes a teacher's data
    assert sorted(p.name for p in demo_split.iterdir()) == ["heldout.jsonl", "train.jsonl"]  # nothing written


def test_stage_refuses_demo_settings_other_than_params_yaml(demo_split):
    """The smoke profile's data.demo is not the project's params.yaml `demo`: its splits are not these."""
    result = _cli_stage("chunk", "-p", "smoke", "--data", str(demo_split))
    _refused(result, "profile 'smoke': data.demo.max_operand, data.demo.max_ops, data.demo.max_value, "
             "data.demo.min_ops, data.demo.n_heldout, data.demo.n_train, data.demo.seed differ from "
             "params.yaml's 'demo' section", "`longshort run -p smoke`",
             "or set params.yaml's 'demo' section to the profile's data.demo")  # fmt: skip
    _refused(_cli_stage("chunk", "--set", "data.demo.seed=1", "-s", "run.name=my run", "--data", str(demo_split)),
             "profile 'demo': data.demo.seed differ",
             "`longshort run -p demo -s data.demo.seed=1 -s 'run.name=my run'` instead")  # the same settings
    missing = demo_split / "none.yaml"
    _refused(_cli_stage("chunk", "--params", str(missing), "--data", str(demo_split)),
             f"{missing} has no valid 'demo' section")  # fmt: skip
    assert sorted(p.name for p in demo_split.iterdir()) == ["heldout.jsonl", "train.jsonl"]


def test_stage_without_the_splits_says_how_to_make_them(in_tmp_repo):
    _refused(_cli_stage("sft_basse", "--data", "data/none"), "unknown data stage 'sft_basse'")
    for name in ("sft_base", "chunk", "score"):
        _refused(_cli_stage(name, "--data", "data/none"), "data/none: no train.jsonl",
                 "run `dvc repro synthesize` (or `longshort synthesize --out data/none`) first")  # fmt: skip
    (in_tmp_repo / "data" / "half").mkdir(parents=True)
    (in_tmp_repo / "data" / "half" / "train.jsonl").write_text("")
    _refused(_cli_stage("chunk", "--data", "data/half"), "data/half: no heldout.jsonl, the splits")
    (in_tmp_repo / "my params.yaml").write_text((in_tmp_repo / "params.yaml").read_text())
    _refused(_cli_stage("sft_base", "--data", "data/none", "--params", "my params.yaml"),
             "(or `longshort synthesize --params 'my params.yaml' --out data/none`)")  # fmt: skip
    assert sorted(p.name for p in (in_tmp_repo / "data" / "half").iterdir()) == ["train.jsonl"]  # nothing written


def test_stage_runs_the_profile_whose_demo_params_yaml_holds(demo_split, in_tmp_repo):
    """As tests/test_pipeline.py's `dvc repro` of the smoke profile does: params.yaml holds smoke's data.demo."""
    from longshort.config import load_profile

    demo = load_profile("smoke").data.demo.model_dump(mode="json")
    (in_tmp_repo / "params.yaml").write_text(yaml.safe_dump({"profile": "smoke", "demo": demo}))
    result = _cli_stage("chunk", "-p", "smoke", "--data", str(demo_split))
    assert result.exit_code == 0, (result.output, result.exception)
    assert (demo_split / "chunk" / "record.json").is_file()


def test_score_shards_in_one_process_load_the_model_once_and_score_the_same(tmp_path, monkeypatch):
    """`longshort stage score` (and the flow on one thread) runs its shards one after another: they share one
    backend (on a GPU, one vLLM engine start instead of one per shard), closed after the last, and score what
    shards that each load their own score. A shard that fails drops the shared backend for its retry."""
    import models.generation
    from flows import stages
    from flows.dvc_stages import run_data_stage
    from longshort.config import DemoTaskConfig, load_profile
    from tasks.synthesize import synthesize_demo

    built, closed = [], []
    make, close = models.generation.make_backend, models.generation.close_backend
    monkeypatch.setattr(models.generation, "make_backend", lambda *a, **k: built.append(make(*a, **k)) or built[-1])
    monkeypatch.setattr(models.generation, "close_backend", lambda b: closed.append(b) or close(b))
    data = tmp_path / "data"
    synthesize_demo(DemoTaskConfig(n_train=12, n_heldout=4, seed=2), data)
    base = ["sft_base.max_steps=2", "score.n_train_traces=4", "score.n_heldout_traces=2", "score.shard_size=2"]
    run_data_stage("sft_base", load_profile("smoke", base), data)
    run_data_stage("chunk", load_profile("smoke", base), data)
    built.clear()
    shared = run_data_stage("score", load_profile("smoke", base), data)
    assert len(built) == 1 and closed[-1:] == built  # 3 shards, one model load, closed after the last
    cfg = load_profile("smoke", base)
    shards, inputs = stages.score_shards(cfg, stages.StageRecord.load(data / "chunk"), stages.StageRecord.load(data / "sft_base"))
    built.clear()
    own = [stages.score_shard_task.fn(key=f"own{i}", out_dir=str(tmp_path / f"own{i}"), rows=rows, shard_no=i, **inputs)
           for i, (_, rows) in enumerate(shards)]  # fmt: skip
    assert len(built) == len(shards) == 3  # outside shared_shard_backends each shard loads its own
    train = b"".join(Path(r.outputs["scored"]).read_bytes() for (split, _), r in zip(shards, own) if split == "train")
    assert Path(shared.outputs["train"]).read_bytes() == train
    model = {k: inputs[k] for k in ("model_dir", "base_model", "generation")}
    built.clear()
    with stages.shared_shard_backends():
        with pytest.raises(ZeroDivisionError), stages._shard_backend(**model, seed=0):
            raise ZeroDivisionError  # a shard's failure
        assert closed[-1] is built[-1]  # dropped and closed: its retry loads anew
        with stages._shard_backend(**model, seed=0) as retry:
            assert retry is built[-1] and len(built) == 2
        with stages.shared_shard_backends(enabled=False), stages._shard_backend(**model, seed=0) as apart:
            assert apart is not retry and closed[-1] is not apart  # a block that opts out keeps out of the pool
        assert closed[-1] is apart
        assert closed.count(retry) == 0  # still pooled
    assert closed[-1] is retry  # closed at the block's end


def test_a_shard_still_running_when_its_block_ends_keeps_its_backend_until_it_is_done(monkeypatch):
    """A failed shard makes the flow leave the block while the next shard runs on the shared backend: that
    shard's backend is closed when it is done, not under it. Threads started outside the block (another run in the
    process, or one that opted out) do not see the pool."""
    import threading

    import models.generation
    from flows import stages

    closed = []
    monkeypatch.setattr(models.generation, "make_backend", lambda *a, **k: object())
    monkeypatch.setattr(models.generation, "close_backend", closed.append)
    model = {"model_dir": "m", "base_model": {}, "generation": {}, "seed": 0}
    inside, leave = threading.Event(), threading.Event()
    seen = {}

    def shard() -> None:
        with stages._shard_backend(**model) as backend:
            seen["running"] = backend
            inside.set()
            assert leave.wait(60)
        seen["after"] = list(closed)

    with stages.shared_shard_backends():
        with stages._shard_backend(**model) as first:
            pass
        import contextvars

        worker = threading.Thread(target=contextvars.copy_context().run, args=(shard,))  # as Prefect's thread runner
        worker.start()
        assert inside.wait(60)
        outsider = []
        other = threading.Thread(target=lambda: outsider.append(stages._SHARD_POOL.get()))  # no copied context
        other.start()
        other.join()
    assert seen["running"] is first and closed == [] and outsider == [None]  # the block ended, the shard runs on
    leave.set()
    worker.join()
    assert seen["after"] == [first] == closed


def test_the_flow_shares_a_shard_backend_only_when_its_shards_run_one_at_a_time():
    from flows.pipeline import shards_run_one_at_a_time
    from longshort.config import RunConfig

    assert shards_run_one_at_a_time(RunConfig())  # the default: threads, one worker
    assert not shards_run_one_at_a_time(RunConfig(max_workers=2))  # two shards at once on one backend: no
    assert not shards_run_one_at_a_time(RunConfig(task_runner="dask", cluster_address="tcp://127.0.0.1:8786"))
