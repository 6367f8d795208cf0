"""Stage cache keys: inputs plus the source of everything that decides a stage's record."""

from __future__ import annotations

import inspect

import flows.stages
from flows.caching import STAGE_MODULES, STAGE_TASKS, stage_key, stage_sources


def test_every_stage_key_covers_its_modules_and_its_task_in_flows_stages():
    assert STAGE_TASKS.keys() == STAGE_MODULES.keys()
    for stage, task_name in STAGE_TASKS.items():
        task = getattr(flows.stages, task_name)
        assert task.name == stage.replace("sft_long", "sft_role").replace("sft_short", "sft_role")
        sources = stage_sources(stage)
        assert sources[f"flows.stages:{task_name}"] == inspect.getsource(task.fn)
        assert set(STAGE_MODULES[stage]) < sources.keys() and "flows.stages:_run_stage" in sources


def test_a_changed_stage_task_changes_that_stage_key_only(monkeypatch):
    inputs = {"rl": {"steps_per_round": 1}, "workspace": "ws"}
    before = {s: stage_key(s, inputs) for s in ("rl", "evaluate", "baseline")}
    # stands in for an edit of rl_task's body (what its record holds): another function's source
    monkeypatch.setattr(flows.stages, "rl_task", flows.stages.baseline_task)
    after = {s: stage_key(s, inputs) for s in before}
    assert after["rl"] != before["rl"]
    assert after["evaluate"] == before["evaluate"] and after["baseline"] == before["baseline"]
    assert stage_key("rl", inputs) == after["rl"]  # deterministic


def test_files_read_by_path_are_keyed_by_their_bytes(tmp_path):
    """Editing a traces file or a benchmark in place must recompute the stages that read it."""
    from flows.pipeline import _file_digests
    from longshort.config import load_profile

    assert _file_digests(load_profile("demo")) == ({}, {})  # nothing read by path: the demo's keys are as before
    traces, bench = tmp_path / "traces.jsonl", tmp_path / "mine.jsonl"
    traces.write_text('{"problem": "1+1", "answer": "2", "response": "<think>1+1=2</think> \\\\boxed{2}"}\n')
    bench.write_text('{"problem": "2+2", "answer": "4"}\n')
    overrides = ["data.source=traces", f"data.path={traces}", "cold_start.compressor=verbatim",
                 f"evaluate.benchmarks=[{{source: {bench}}}]"]  # fmt: skip
    first = _file_digests(load_profile("smoke", overrides))
    assert list(first[0]) == ["data_file"] and list(first[1]) == [f"benchmark_file:{bench}"]
    traces.write_text(traces.read_text().replace("1+1", "1 + 1"))
    second = _file_digests(load_profile("smoke", overrides))
    assert second[0] != first[0] and second[1] == first[1]
    bench.write_text('{"problem": "2+3", "answer": "5"}\n')
    assert _file_digests(load_profile("smoke", overrides))[1] != first[1]


def test_a_data_stage_folder_of_other_settings_is_recomputed_not_reused(tmp_path):
    """`longshort stage chunk` run again after a settings change (dvc repro would delete the outputs first)."""
    from flows.dvc_stages import run_data_stage
    from longshort.config import DemoTaskConfig, load_profile
    from tasks.synthesize import synthesize_demo

    data = tmp_path / "data"
    synthesize_demo(DemoTaskConfig(n_train=12, n_heldout=4, seed=2), data)
    first = run_data_stage("chunk", load_profile("smoke"), data)
    again = run_data_stage("chunk", load_profile("smoke"), data)
    assert again == first  # same inputs: the finished folder is reused
    merged = run_data_stage("chunk", load_profile("smoke", ["chunk.min_chars=400"]), data)
    assert merged.key != first.key
    per_trace = "chunk_train_thoughts_per_trace"
    assert merged.metrics[per_trace] < first.metrics[per_trace]  # longer minimum: fewer, bigger thoughts
    (data / "train.jsonl").write_text((data / "train.jsonl").read_text().replace("Start with", "Begin with", 1))
    assert run_data_stage("chunk", load_profile("smoke", ["chunk.min_chars=400"]), data).key != merged.key
