import contextlib
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from longshort.config import CONFIG_DIR, ConfigError, DemoTaskConfig, load_profile, load_yaml, repo_file

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_profile_validates(name):
    cfg = load_profile(name)
    assert cfg.run.name == name


def test_real_profiles_name_hub_models_and_gpu_backends():
    for name in ("qwen2.5-7b", "llama3.1-8b"):
        cfg = load_profile(name)
        assert cfg.base_model.source == "pretrained" and "/" in cfg.base_model.name_or_path
        assert cfg.generation.backend == "vllm" and cfg.sft_base.deepspeed.startswith("infra/deepspeed/")
        assert (REPO / cfg.sft_base.deepspeed).is_file()
        assert cfg.base_model.trust_remote_code is False


def write(tmp_path, data) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_names_field_and_file(tmp_path):
    path = write(tmp_path, {"sft_base": {"epochz": 3}})
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    assert str(path) in str(err.value) and "sft_base.epochz" in str(err.value) and "unknown key" in str(err.value)


def test_wrong_type_and_out_of_range_name_the_field(tmp_path):
    path = write(tmp_path, {"sft_base": {"learning_rate": "fast"}, "data": {"demo": {"n_train": -5}}})
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    msg = str(err.value)
    assert "sft_base.learning_rate" in msg and "'fast'" in msg
    assert "data.demo.n_train" in msg


def test_cross_field_rules_and_missing_profile(tmp_path):
    with pytest.raises(ConfigError, match="min_ops must be <= max_ops"):
        load_profile(write(tmp_path, {"data": {"demo": {"min_ops": 5, "max_ops": 2}}}))
    with pytest.raises(ConfigError, match="needs 'name_or_path'"):
        load_profile(write(tmp_path, {"base_model": {"source": "pretrained"}}))
    with pytest.raises(ConfigError, match="known profiles"):
        load_profile("no-such-profile")


def test_a_hub_dataset_revision_is_validated_keyed_and_unpinned_ids_are_listed(tmp_path):
    from longshort.preflight import unpinned_hub_sources

    with pytest.raises(ConfigError, match="field 'data.revision': Value error, pins a hub dataset: it needs 'hub_id'"):
        load_profile("smoke", ["data.revision=abc"])
    with pytest.raises(ConfigError, match=r"'evaluate.benchmarks.0.revision': Value error, pins a hub dataset, but source "
                                          r"'data/mine.jsonl' is a local path"):  # fmt: skip
        load_profile(write(tmp_path, {"evaluate": {"benchmarks": [{"source": "data/mine.jsonl", "revision": "v1"}]}}))
    hub = {"source": "traces", "hub_id": "someone/traces"}
    benches = [{"source": "someone/math"}, {"source": "someone/aime", "revision": "0123"}, {"source": "data/x.jsonl"}]
    model = {"compressor": "model"}  # the demo teacher's terse forms need the demo task
    unpinned = load_profile(write(tmp_path, {"data": hub, "cold_start": model, "evaluate": {"benchmarks": benches}}))
    assert unpinned_hub_sources(unpinned) == [("data.hub_id", "someone/traces"),
                                              ("evaluate.benchmarks[0].source", "someone/math")]  # fmt: skip
    pinned = load_profile(write(tmp_path, {"data": {**hub, "revision": "0123"}, "cold_start": model,
                                           "evaluate": {"benchmarks": benches[1:]}}))  # fmt: skip
    assert unpinned_hub_sources(pinned) == []
    # the pin is part of the data section, which keys the synthesize stage: a new pin reads the data again
    assert pinned.section_dump("data") != unpinned.section_dump("data")
    assert pinned.section_dump("data")["revision"] == "0123"


def test_the_demo_compressor_needs_the_demo_teacher(tmp_path):
    traces = tmp_path / "traces.jsonl"
    traces.write_text("")
    with pytest.raises(ConfigError, match="cold_start.compressor: 'demo_terse' reads the terse forms the demo teacher"):
        load_profile("smoke", ["data.source=traces", f"data.path={traces}"])
    cfg = load_profile("smoke", ["data.source=traces", f"data.path={traces}", "cold_start.compressor=model"])
    assert cfg.cold_start.compressor == "model"


def test_overrides_are_typed_and_validated():
    cfg = load_profile("smoke", ["sft_base.epochs=2", "run.seed=3"])
    assert cfg.sft_base.epochs == 2.0 and cfg.run.seed == 3
    with pytest.raises(ConfigError, match="sft_base.nope"):
        load_profile("smoke", ["sft_base.nope=1"])
    with pytest.raises(ConfigError, match="section.field=value"):
        load_profile("smoke", ["sft_base.epochs"])


def test_dvc_params_match_demo_profile():
    params = load_yaml((REPO / "params.yaml").read_text())  # also: no key given twice
    assert DemoTaskConfig.model_validate(params["demo"]) == load_profile("demo").data.demo


PROFILE = CONFIG_DIR / "smoke.yaml"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rl.learning_rate=[1", "override 'rl.learning_rate=[1': not valid YAML: expected ',' or ']', but got '<stream end>'"),
        ("=3", "override '=3' must look like section.field=value"),
        ("rl..x=3", "override 'rl..x=3' must look like section.field=value"),
        ("rl.group_size=1", "--set rl.group_size=1: field 'rl.group_size': Input should be greater than or equal to 2 (got 1)"),
        ("rl.group_size.x=3", "--set rl.group_size.x=3: field 'rl.group_size': Input should be a valid integer"),
        ("rl.alpha=.inf", "--set rl.alpha=.inf: field 'rl.alpha': Input should be a finite number (got inf)"),
        ("rl.format_weight=.nan", "--set rl.format_weight=.nan: field 'rl.format_weight': Input should be a finite number (got nan)"),
        ("rl.correctness_weight=-1",
         "--set rl.correctness_weight=-1: field 'rl.correctness_weight': Input should be greater than or equal to 0 (got -1)"),
        ("sft_base.max_steps=0", "--set sft_base.max_steps=0: field 'sft_base.max_steps': Value error, "
                                 "must be -1 (train for `epochs`) or a positive number of steps (got 0)"),
        # pydantic's lax mode would read these as 1, 1.0 and True: a boolean is no number, nor a number a boolean
        ("rl.rounds=true", "--set rl.rounds=true: field 'rl.rounds': Input should be an integer, not true/false (got True)"),
        ("rl.learning_rate=false",
         "--set rl.learning_rate=false: field 'rl.learning_rate': Input should be a number, not true/false (got False)"),
        ("sft_base.bf16=1", "--set sft_base.bf16=1: field 'sft_base.bf16': Input should be true or false, not a number (got 1)"),
        ("baseline.micro_batch_size=yes",
         "--set baseline.micro_batch_size=yes: field 'baseline.micro_batch_size': Input should be an integer, not true/false (got True)"),
        ("evaluate.budgets=[64, true]",
         "--set evaluate.budgets=[64, true]: field 'evaluate.budgets': Input should be an integer, not true/false (got [64, True])"),
        # accepted once, and failed at the end of a run (MLflow) or never answered (one turn is the long model's)
        ("tracking.experiment=", "--set tracking.experiment=: field 'tracking.experiment': String should have at least 1 character (got '')"),
        ("rl.lora={target_modules: []}", "--set rl.lora={target_modules: []}: field 'rl.lora.target_modules': "
                                         "List should have at least 1 item after validation, not 0 (got [])"),
        ("protocol.max_turns=1",
         "--set protocol.max_turns=1: field 'protocol.max_turns': Input should be greater than or equal to 2 (got 1)"),
        ("rl.lora={r: 4, r: 8}", "override 'rl.lora={r: 4, r: 8}': not valid YAML: duplicate key 'r' (first at line 1): "
                                 "a key may appear once per mapping"),
    ],
)  # fmt: skip
def test_a_bad_override_is_named_in_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_profile("smoke", [override])
    assert str(err.value) == message


def test_settings_that_would_fail_minutes_into_a_run_fail_at_load():
    with pytest.raises(ConfigError, match=r"field 'sft_long.lr_scheduler': Value error, unknown scheduler, expected one of \["):
        load_profile("smoke", ["sft_long.lr_scheduler=bogus"])
    with pytest.raises(ConfigError, match="'nonsense' is not an MLflow store with a model registry"):
        load_profile("smoke", ["tracking.tracking_uri=nonsense"])
    for uri in ("sqlite:////tmp/x/mlflow.db", "postgresql+psycopg2://u@127.0.0.1:5432/mlflow", "https://mlflow.example",
                "databricks", "databricks://my-profile"):
        assert load_profile("smoke", [f"tracking.tracking_uri={uri}"]).tracking.tracking_uri == uri


def test_text_fields_take_overrides_as_written():
    """YAML would read these as 2024, 42798 (octal) and False; a text field keeps the text."""
    cfg = load_profile("smoke", ["run.name=2024", "base_model.revision=0123456", "tracking.experiment=no"])
    assert (cfg.run.name, cfg.base_model.revision, cfg.tracking.experiment) == ("2024", "0123456", "no")
    assert load_profile("smoke", ["run.seed=12", "rl.alpha=1e-1"]).rl.alpha == 0.1  # numeric fields still parse


def test_an_error_in_the_file_still_names_the_file(tmp_path):
    path = write(tmp_path, {"rl": {"group_size": 1}})
    with pytest.raises(ConfigError) as err:
        load_profile(path, ["rl.alpha=0.3"])
    assert str(err.value) == f"{path}: field 'rl.group_size': Input should be greater than or equal to 2 (got 1)"


def test_numbers_and_booleans_still_parse_as_yaml_writes_them(tmp_path):
    cfg = load_profile("smoke", ["rl.rounds=3", "rl.learning_rate=1e-5", "sft_base.learning_rate=2.0e-4",
                                 "sft_base.bf16=true", "baseline.bf16=no", "sft_base.epochs=2", "evaluate.budgets=[64]"])  # fmt: skip
    assert (cfg.rl.rounds, cfg.rl.learning_rate, cfg.sft_base.learning_rate) == (3, 1e-5, 2e-4)
    assert (cfg.sft_base.bf16, cfg.baseline.bf16, cfg.sft_base.epochs, cfg.evaluate.budgets) == (True, False, 2.0, [64])
    assert load_profile(write(tmp_path, {"rl": {"learning_rate": "1e-5"}})).rl.learning_rate == 1e-5  # PyYAML's text
    path = write(tmp_path, {"sft_base": {"bf16": 1}, "rl": {"rounds": True}})
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    assert str(err.value).splitlines() == [
        f"{path}: field 'sft_base.bf16': Input should be true or false, not a number (got 1)",
        f"{path}: field 'rl.rounds': Input should be an integer, not true/false (got True)",
    ]


def test_a_cross_field_error_is_blamed_on_the_file_or_override_that_causes_it(tmp_path):
    # the file is fine alone: the override that brings the error about is named, not the file nor the others
    with pytest.raises(ConfigError) as err:
        load_profile("smoke", ["run.seed=3", "base_model.dtype=bfloat16", "rl.rounds=2"])
    assert str(err.value).startswith("--set base_model.dtype=bfloat16: field '(profile)': Value error, rl.lora: base_model")
    with pytest.raises(ConfigError) as err:
        load_profile(write(tmp_path, {"evaluate": {"k": 4, "temperature": 0.6}}), ["evaluate.n_problems=5", "evaluate.temperature=0"])
    assert str(err.value) == "--set evaluate.temperature=0: field 'evaluate': Value error, k > 1 samples need temperature > 0"
    # the file fails alone: it is to blame, not an override that touches the same section
    path = write(tmp_path, {"evaluate": {"k": 4}})
    with pytest.raises(ConfigError) as err:
        load_profile(path, ["evaluate.n_problems=5"])
    assert str(err.value) == f"{path}: field 'evaluate': Value error, k > 1 samples need temperature > 0"
    path = write(tmp_path, {"base_model": {"dtype": "bfloat16"}})
    with pytest.raises(ConfigError) as err:
        load_profile(path, ["base_model.revision=abc"])
    assert str(err.value).startswith(f"{path}: field '(profile)': Value error, rl.lora: base_model.dtype is bfloat16")
    # two overrides that only together break a cross-field rule are named, not an unrelated third one
    path = write(tmp_path, {"rl": {"lora": {"r": 4, "alpha": 8}}})
    with pytest.raises(ConfigError) as err:
        load_profile(path, ["run.seed=3", "base_model.dtype=bfloat16", "rl.lora=null", "evaluate.n_problems=5"])
    assert str(err.value).startswith(
        "--set base_model.dtype=bfloat16, --set rl.lora=null: field '(profile)': Value error, rl.lora: base_model"
    )
    # an override that repairs the file's field is not to blame for the cross-field error it lets through
    path = write(tmp_path, {"rl": {"group_size": 1, "lora": {"r": 4, "alpha": 8}}})
    with pytest.raises(ConfigError) as err:
        load_profile(path, ["run.seed=3", "rl.group_size=4", "base_model.dtype=bfloat16", "rl.lora=null"])
    assert str(err.value).startswith("--set base_model.dtype=bfloat16, --set rl.lora=null: field '(profile)'")
    # each error on its own line, with its own origin
    path = write(tmp_path, {"rl": {"group_size": 1}})
    with pytest.raises(ConfigError) as err:
        load_profile(path, ["rl.alpha=-1", "evaluate.k=4"])
    assert str(err.value).splitlines() == [
        "--set evaluate.k=4: field 'evaluate': Value error, k > 1 samples need temperature > 0",
        f"{path}: field 'rl.group_size': Input should be greater than or equal to 2 (got 1)",
        "--set rl.alpha=-1: field 'rl.alpha': Input should be greater than or equal to 0 (got -1)",
    ]


def test_a_key_given_twice_is_an_error_naming_the_file_line_and_key(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `evaluate:` appended to a profile would replace the first."""
    path = tmp_path / "twice.yaml"
    smoke = (CONFIG_DIR / "smoke.yaml").read_text()
    first = 1 + smoke.splitlines().index("evaluate:")
    path.write_text(smoke + "\nevaluate:\n  k: 8\n  temperature: 0.6\n")
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    line = len(smoke.splitlines()) + 2
    assert str(err.value) == (f"{path}:{line}:1: not valid YAML: duplicate key 'evaluate' (first at line {first}): "
                              "a key may appear once per mapping")  # fmt: skip
    cases = {
        "rl:\n  lora:\n    r: 4\n    alpha: 8\n    r: 8\n": ":5:5: not valid YAML: duplicate key 'rl.lora.r' (first at line 3)",
        "evaluate:\n  benchmarks:\n    - {source: a/b, name: x, name: y}\n": "duplicate key 'evaluate.benchmarks.0.name'",
        "run: {seed: 1}\nrun: {seed: 1}\n": "duplicate key 'run' (first at line 1)",  # even with the same value
        "sft_base:\n  bf16: yes\n  bf16: true\n": "duplicate key 'sft_base.bf16'",  # one key, spelled two ways
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_profile(path)
    # a merge (`<<`) is not a duplicate, and a key written after it overrides the merged one, as YAML says
    path.write_text("sft_base: &sft\n  epochs: 2\n  bf16: true\nsft_long:\n  <<: *sft\n  epochs: 1\n")
    cfg = load_profile(path)
    assert (cfg.sft_base.epochs, cfg.sft_long.epochs, cfg.sft_long.bf16) == (2.0, 1.0, True)


def test_a_temperature_vllm_would_refuse_is_refused_at_load():
    """vLLM's SamplingParams refuses a temperature above 2: the profile is refused when it is read, naming the
    field, rather than on a GPU at the first vLLM call of the stage that samples with it."""
    for field in ("rl.temperature", "baseline.temperature", "score.temperature", "evaluate.temperature",
                  "generation.temperature", "chunk.llm_temperature", "data.teacher_temperature"):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(f"{field}") + ".*less than or equal to 2"):
            load_profile("smoke", [f"{field}=2.5"])
        load_profile("smoke", [f"{field}=2.0"])


def test_deepspeed_configs_are_found_from_anywhere_and_a_missing_one_is_named(tmp_path, monkeypatch):
    from longshort.config import repo_file

    monkeypatch.chdir(tmp_path)  # a GPU worker may start the flow outside the checkout
    cfg = load_profile("qwen2.5-7b")
    assert repo_file(cfg.sft_base.deepspeed) == str(REPO / "infra/deepspeed/zero3_offload.json")
    with pytest.raises(ConfigError, match=r"field 'baseline.deepspeed': Value error, no such file 'infra/nope.json'"):
        load_profile("qwen2.5-7b", ["baseline.deepspeed=infra/nope.json"])


def test_a_profile_path_may_spell_its_suffix_in_capitals(tmp_path):
    path = tmp_path / "Mine.YAML"
    path.write_text((CONFIG_DIR / "smoke.yaml").read_text())
    assert load_profile(path).run.name == "smoke" and load_profile(str(path)).data.demo.n_train == 48


def test_gpu_training_settings_that_cannot_work_are_refused_at_load():
    # AdamW on bf16 weights rounds RL's updates away: the real profiles train fp32 LoRA adapters instead
    with pytest.raises(ConfigError, match=r"rl.lora: base_model.dtype is bfloat16, and full-weight RL"):
        load_profile("qwen2.5-7b", ["rl.lora=null"])
    assert load_profile("smoke", ["base_model.dtype=bfloat16", "rl.lora={r: 4}"]).rl.lora.r == 4
    # LoRA's adapters are merged into whole weights, which ZeRO-3 never holds in one place
    with pytest.raises(ConfigError, match=r"lora with the ZeRO-3 config 'infra/deepspeed/zero3_offload.json'"):
        load_profile("qwen2.5-7b", ["sft_long.lora={r: 16}"])
    assert load_profile("qwen2.5-7b", ["sft_long.lora={r: 16}", "sft_long.deepspeed=infra/deepspeed/zero2.json"])
    with pytest.raises(ConfigError, match=r"micro_batch_size=7 must divide prompts_per_step x group_size = 256"):
        load_profile("qwen2.5-7b", ["baseline.micro_batch_size=7"])


def test_real_profiles_fit_one_gpu_as_configured():
    """What the profiles' header promises: ZeRO-3 with the optimizer offloaded for full-weight SFT, LoRA and
    activation checkpointing for RL, micro-batches for the baseline's 256 sequences a step."""
    for name in ("qwen2.5-7b", "llama3.1-8b"):
        cfg = load_profile(name)
        for section in (cfg.sft_base, cfg.sft_long, cfg.sft_short):
            ds = json.loads((REPO / section.deepspeed).read_text())
            assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        assert cfg.rl.lora is not None and cfg.rl.lora.dropout == 0.0 and cfg.rl.gradient_checkpointing
        assert cfg.baseline.micro_batch_size == 8


def test_deepspeed_runs_in_process_as_a_one_process_group(monkeypatch):
    """Prefect runs a stage in its own process, with no launcher: DeepSpeed still needs a process group."""
    import torch

    from tasks.sft import deepspeed_config

    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(name, "")  # recorded, so what deepspeed_config sets is undone after the test
        monkeypatch.delenv(name)
    assert deepspeed_config("infra/deepspeed/zero2.json") is None or torch.cuda.is_available()  # no CUDA: no DeepSpeed
    assert "WORLD_SIZE" not in os.environ or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert deepspeed_config(None) is None
    assert Path(deepspeed_config("infra/deepspeed/zero2.json")).resolve() == REPO / "infra/deepspeed/zero2.json"
    assert {k: os.environ[k] for k in ("MASTER_ADDR", "RANK", "LOCAL_RANK", "WORLD_SIZE")} == {
        "MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}  # fmt: skip
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536
    monkeypatch.setenv("WORLD_SIZE", "8")  # under torchrun / accelerate launch the launcher's settings stand
    monkeypatch.setenv("RANK", "3")
    deepspeed_config("infra/deepspeed/zero2.json")
    assert os.environ["RANK"] == "3" and os.environ["WORLD_SIZE"] == "8"


def test_a_deepspeed_scope_clears_the_zero3_flag_its_trainer_sets(monkeypatch):
    """A ZeRO-3 Trainer leaves transformers' process-wide ZeRO-3 flag set; the next stage's from_pretrained in the
    same process would then build empty, partitioned weights. The scope clears it on exit, error or not."""
    import weakref

    import torch
    import transformers.integrations.deepspeed as hf_deepspeed

    from tasks.sft import deepspeed_scope

    class Zero3Config:  # what TrainingArguments(deepspeed=<a ZeRO-3 file>) registers (HfTrainerDeepSpeedConfig)
        def is_zero3(self) -> bool:
            return True

    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = Zero3Config()
    for fails in (False, True):
        with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
            with deepspeed_scope("infra/deepspeed/zero3_offload.json") as path:
                assert Path(path).resolve() == REPO / "infra/deepspeed/zero3_offload.json"
                hf_deepspeed._hf_deepspeed_config_weak_ref = weakref.ref(config)  # the Trainer's arguments
                assert hf_deepspeed.is_deepspeed_zero3_enabled()
                if fails:
                    raise RuntimeError("the stage died")
        assert not hf_deepspeed.is_deepspeed_zero3_enabled()
    with deepspeed_scope(None) as path:  # no DeepSpeed asked for: nothing to clear
        assert path is None


def test_scoring_shards_never_start_two_vllm_engines_on_one_gpu():
    from longshort.config import RunConfig
    from longshort.preflight import shard_parallelism_problem

    assert shard_parallelism_problem(RunConfig(max_workers=4), "transformers") is None
    assert shard_parallelism_problem(RunConfig(max_workers=1), "vllm") is None
    assert shard_parallelism_problem(RunConfig(task_runner="dask", cluster_address="tcp://10.0.0.5:8786"), "vllm") is None
    assert shard_parallelism_problem(RunConfig(max_workers=2), "vllm").startswith("run.max_workers is 2 with the vLLM backend")
    assert shard_parallelism_problem(RunConfig(task_runner="ray"), "vllm").startswith(
        "run.task_runner is 'ray' without run.cluster_address"
    )


def test_rl_adapters_default_to_no_dropout_and_sft_adapters_keep_theirs():
    """RL scores its samples in train mode: dropout in the adapters would make the loss off-policy."""
    from longshort.config import LoraConfig, RLConfig, SFTConfig

    assert load_profile("demo", ["rl.lora={r: 8}"]).rl.lora.dropout == 0.0
    assert load_profile("demo", ["rl.lora={r: 8, dropout: 0.1}"]).rl.lora.dropout == 0.1  # written down: kept
    assert RLConfig(lora=LoraConfig(r=8)).lora.dropout == 0.0
    assert RLConfig(lora=LoraConfig(r=8, dropout=0.2)).lora.dropout == 0.2
    assert SFTConfig(lora=LoraConfig(r=8)).lora.dropout == LoraConfig().dropout == 0.05


def test_budgets_and_benchmark_names_that_would_fail_late_are_refused_at_load(tmp_path):
    """Budgets are the table's columns and the plot's x axis; a benchmark's name starts its MLflow metric names,
    which MLflow refuses at track, after every stage has run."""
    with pytest.raises(ConfigError, match=r"budgets must be increasing, each once, got \[512, 64, 256\]"):
        load_profile("demo", ["evaluate.budgets=[512, 64, 256]"])
    with pytest.raises(ConfigError, match="budgets must be increasing"):
        load_profile("demo", ["evaluate.budgets=[64, 64]"])
    bench = tmp_path / "aime(2024).jsonl"
    bench.write_text('{"problem": "1+1", "answer": "2"}\n')
    with pytest.raises(ConfigError, match=r"benchmark name\(s\) \['aime\(2024\)'\] cannot start an MLflow metric name"):
        load_profile("demo", [f"evaluate.benchmarks=[{{source: '{bench}'}}]"])
    named = load_profile("demo", [f"evaluate.benchmarks=[{{source: '{bench}', name: aime-2024}}]"])
    assert named.evaluate.benchmarks[0].name == "aime-2024"


def test_the_teacher_model_can_be_pinned_and_an_unpinned_hub_teacher_is_listed(tmp_path):
    from longshort.preflight import unpinned_hub_sources

    with pytest.raises(ConfigError, match="field 'data.teacher_revision'.*needs 'teacher'|teacher_revision pins"):
        load_profile("smoke", ["data.teacher_revision=abc"])
    teacher = {"source": "teacher", "path": "data/p.jsonl", "teacher": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"}
    model = {"compressor": "model"}
    unpinned = load_profile(write(tmp_path, {"data": teacher, "cold_start": model}))
    assert unpinned_hub_sources(unpinned) == [("data.teacher", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")]
    pinned = load_profile(write(tmp_path, {"data": {**teacher, "teacher_revision": "0123"}, "cold_start": model}))
    assert unpinned_hub_sources(pinned) == []
    assert pinned.section_dump("data")["teacher_revision"] == "0123"  # keys synthesize: a new pin writes new traces
    local = tmp_path / "teacher-model"
    local.mkdir()
    assert unpinned_hub_sources(load_profile(write(tmp_path, {"data": {**teacher, "teacher": str(local)}, "cold_start": model}))) == []


def test_a_profile_without_a_name_is_named_after_its_file_and_an_empty_one_is_refused(tmp_path):
    """run.name is what MLflow records as the run's profile: it used to default to 'demo' for any file."""
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"rl": {"temperature": 0.9}}))
    assert load_profile(mine).run.name == "mine"
    mine.write_text(yaml.safe_dump({"run": {"seed": 3}}))
    assert (load_profile(mine).run.name, load_profile(mine).run.seed) == ("mine", 3)
    assert load_profile(mine, ["run.name=other"]).run.name == "other"
    mine.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=rf"^{mine}: the profile is empty"):
        load_profile(mine)


def test_a_home_folder_in_a_path_setting_is_expanded(tmp_path, monkeypatch):
    """`~/…` used to become a folder named `~` in the checkout (run.workspace) or a missing file (data.path)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "z2.json").write_text((Path(repo_file("infra/deepspeed/zero2.json"))).read_text())
    cfg = load_profile("smoke", ["run.workspace=~/ws", "sft_base.deepspeed=~/z2.json", "base_model.name_or_path=~/m"])
    assert cfg.run.workspace == tmp_path / "ws" and cfg.sft_base.deepspeed == str(tmp_path / "z2.json")
    assert cfg.base_model.name_or_path == str(tmp_path / "m")
    traces = load_profile("smoke", ["data.source=traces", "data.path=~/t.jsonl", "cold_start.compressor=model"])
    assert traces.data.path == str(tmp_path / "t.jsonl")
    assert load_profile("smoke", ["base_model.name_or_path=Qwen/Qwen2.5-7B-Instruct"]).base_model.name_or_path == (
        "Qwen/Qwen2.5-7B-Instruct"
    )  # a hub id as written
