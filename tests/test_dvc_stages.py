"""`longshort stage score` (the DVC path) run again after a score.* settings change."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


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
