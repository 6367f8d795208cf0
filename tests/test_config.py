from pathlib import Path

import pytest
import yaml

from longshort.config import CONFIG_DIR, ConfigError, DemoTaskConfig, load_profile

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


def test_overrides_are_typed_and_validated():
    cfg = load_profile("smoke", ["sft_base.epochs=2", "run.seed=3"])
    assert cfg.sft_base.epochs == 2.0 and cfg.run.seed == 3
    with pytest.raises(ConfigError, match="sft_base.nope"):
        load_profile("smoke", ["sft_base.nope=1"])
    with pytest.raises(ConfigError, match="section.field=value"):
        load_profile("smoke", ["sft_base.epochs"])


def test_dvc_params_match_demo_profile():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert DemoTaskConfig.model_validate(params["demo"]) == load_profile("demo").data.demo
