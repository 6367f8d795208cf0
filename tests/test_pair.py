"""The ``longshort-pair`` pyfunc's input forms, as a user meets them: through ``mlflow.pyfunc.load_model``.

MLflow checks every input against :func:`models.pair.signature` (a named string ``problem`` column) before
``predict`` runs, so what the module docstring promises is what these tests load and call. A tiny random
model serves as long and short (the answers do not matter here, only which inputs reach ``predict``).
"""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest

PROBLEMS = ["Start with 3. Then (1) add 4.", "Start with 2."]


@pytest.fixture(scope="module")
def served_pair(tmp_path_factory, demo_tokenizer):
    """The pair logged to a scratch SQLite store and loaded back with ``mlflow.pyfunc.load_model``."""
    import mlflow

    from longshort.config import GenerationConfig, ProtocolConfig, TinyModelConfig
    from models.factory import build_tiny_model
    from models.pair import CONFIG_ARTIFACT, LONG_ARTIFACT, SHORT_ARTIFACT, LongShortPair, PairSettings, signature

    root = tmp_path_factory.mktemp("pair")
    folder = root / "model"
    build_tiny_model(TinyModelConfig(), demo_tokenizer, seed=0).save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    settings = PairSettings(
        generation=GenerationConfig(backend="transformers", batch_size=4),
        protocol=ProtocolConfig(max_turns=2, max_new_tokens_long=3, max_new_tokens_short=3),
    )
    config = root / "pair_config.json"
    config.write_text(json.dumps(settings.model_dump(mode="json")))
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    experiment = mlflow.create_experiment("pair", artifact_location=(root / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(type hints|input_example|input example).*")
        info = mlflow.pyfunc.log_model(
            name="pair",
            python_model=LongShortPair(),
            artifacts={LONG_ARTIFACT: str(folder), SHORT_ARTIFACT: str(folder), CONFIG_ARTIFACT: str(config)},
            signature=signature(),
        )
    return mlflow.pyfunc.load_model(info.model_uri)


@pytest.mark.parametrize(
    ("form", "model_input", "expected"),
    [
        ("DataFrame", pd.DataFrame({"problem": PROBLEMS}), PROBLEMS),
        ("records", [{"problem": p} for p in PROBLEMS], PROBLEMS),
        ("dict of str", {"problem": PROBLEMS[0]}, PROBLEMS[:1]),
        ("dict of list", {"problem": PROBLEMS}, PROBLEMS),
    ],
)
def test_documented_forms_reach_predict(served_pair, form, model_input, expected):
    from models.pair import OUTPUT_COLUMNS

    out = served_pair.predict(model_input)
    assert list(out.columns) == list(OUTPUT_COLUMNS), form
    assert out["problem"].tolist() == expected, form
    assert (out["n_turns"] == 1).all() and (out["tokens"] > 0).all(), form


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_records": [{"problem": p} for p in PROBLEMS]},
        {"dataframe_split": {"columns": ["problem"], "data": [[p] for p in PROBLEMS]}},
        {"inputs": {"problem": PROBLEMS}},
    ],
)
def test_documented_http_bodies_reach_predict(served_pair, body):
    """The request bodies the module docstring names, parsed as ``mlflow models serve`` parses them."""
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    parsed = infer_and_parse_data(body, served_pair.metadata.get_input_schema())
    assert served_pair.predict(parsed)["problem"].tolist() == PROBLEMS


@pytest.mark.parametrize(
    ("form", "model_input", "message"),
    [
        # no `problem` column: MLflow's signature refuses these before predict runs (the docstring says so)
        ("bare str", PROBLEMS[0], r"missing inputs \['problem'\]"),
        ("list of str", PROBLEMS, r"missing inputs \['problem'\]"),
        ("other key", {"question": PROBLEMS[0]}, r"missing inputs \['problem'\]"),
        ("int problem", [{"problem": 3}], r"Incompatible input types for column problem"),
    ],
)
def test_signature_refuses_inputs_without_a_string_problem_column(served_pair, form, model_input, message):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=message):
        served_pair.predict(model_input)


def test_missing_problem_passes_the_signature_and_is_refused_by_predict(served_pair):
    """A null passes MLflow's string check; predict names the row and what it held."""
    # MLflow's enforcement turns the None into NaN
    with pytest.raises(ValueError, match=r"non-empty string 'problem'; rows \[1\] do not \(1: float nan\)"):
        served_pair.predict(pd.DataFrame({"problem": [PROBLEMS[0], None]}))


def test_problems_of_direct_forms_and_errors():
    """Called directly (no signature in front), predict also takes a str or a list; others name what came."""
    import numpy as np

    from models.pair import problems_of

    assert problems_of("a") == ["a"] and problems_of(["a", {"problem": "b"}]) == ["a", "b"]
    assert problems_of({"problem": ["a", "b"]}) == ["a", "b"] and problems_of(np.array(["a"])) == ["a"]
    assert type(problems_of(np.array(["a"]))[0]) is str
    for value, kind in ((5, "int"), (None, "NoneType"), (b"ab", "bytes"), (3.5, "float")):
        with pytest.raises(ValueError, match=rf"^cannot read problems from type {kind}; pass a DataFrame with a "):
            problems_of(value)
    with pytest.raises(ValueError, match=r"^input dict needs a 'problem' key, got keys \['question'\]"):
        problems_of({"question": "a"})
    with pytest.raises(ValueError, match=r"rows \[0, 1\] do not \(0: int 1, 1: list \['a'\]\)"):
        problems_of([1, ["a"]])
    with pytest.raises(ValueError, match="holds no problems"):
        problems_of([])


def test_concurrent_requests_get_the_answers_they_get_one_at_a_time(tmp_path, demo_tokenizer):
    """MLflow's scoring server runs each request in its own thread: sampled requests served at once must not
    share the sampler's state (torch's global generator here, one engine on vLLM)."""
    import threading

    from longshort.config import GenerationConfig, ProtocolConfig, TinyModelConfig
    from models.factory import build_tiny_model
    from models.pair import LongShortPair, PairSettings

    folder = tmp_path / "model"
    build_tiny_model(TinyModelConfig(), demo_tokenizer, seed=0).save_pretrained(folder)
    demo_tokenizer.save_pretrained(folder)
    settings = PairSettings(generation=GenerationConfig(backend="transformers", temperature=1.0, batch_size=8),
                            protocol=ProtocolConfig(max_turns=2, max_new_tokens_long=40))  # fmt: skip
    (tmp_path / "pair.json").write_text(json.dumps(settings.model_dump(mode="json")))
    pair = LongShortPair().load(folder, folder, tmp_path / "pair.json")
    requests = {"a": [PROBLEMS[0]] * 4, "b": [PROBLEMS[1]] * 4}
    alone = {k: [e.transcript for e in pair.solve(v)] for k, v in requests.items()}
    assert len(set(alone["a"])) > 1  # sampled: the four answers differ, so a shared generator would show
    for _ in range(3):
        got: dict[str, list[str]] = {}
        threads = [threading.Thread(target=lambda k=k, v=v: got.__setitem__(k, [e.transcript for e in pair.solve(v)]))
                   for k, v in requests.items()]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == alone


def test_the_served_pair_decodes_at_the_temperature_its_gate_measured():
    from longshort.config import load_profile
    from models.pair import PairSettings

    real = load_profile("qwen2.5-7b")
    assert PairSettings.from_profile(real).generation.temperature == real.evaluate.temperature == 0.6
    pinned = load_profile("qwen2.5-7b", ["generation.temperature=0.2"])
    assert PairSettings.from_profile(pinned).generation.temperature == 0.2  # a profile that sets it keeps it
    assert PairSettings.from_profile(load_profile("demo")).generation.temperature == 0.0  # greedy demo evaluation


def test_the_pair_shares_one_model_only_when_the_two_folders_hold_the_same_bytes(tmp_path, demo_tokenizer):
    """The registered pair's long and short artifacts are two folders: identical ones load as one backend,
    found by comparing bytes up to the first difference (``same_tree``), not by hashing both folders."""
    import shutil

    from longshort.config import GenerationConfig, TinyModelConfig
    from longshort.io import same_tree, tree_digest
    from models.factory import build_tiny_model
    from models.pair import LongShortPair, PairSettings

    long_dir, copy_dir, other_dir = tmp_path / "long", tmp_path / "copy", tmp_path / "other"
    for folder, seed in ((long_dir, 0), (other_dir, 1)):
        build_tiny_model(TinyModelConfig(), demo_tokenizer, seed=seed).save_pretrained(folder)
        demo_tokenizer.save_pretrained(folder)
    shutil.copytree(long_dir, copy_dir)
    (tmp_path / "pair.json").write_text(PairSettings(generation=GenerationConfig(backend="transformers")).model_dump_json())
    for a, b in ((long_dir, copy_dir), (long_dir, other_dir)):
        assert same_tree(a, b) == (tree_digest(a) == tree_digest(b))
    assert same_tree(long_dir, copy_dir) and not same_tree(long_dir, other_dir)
    (copy_dir / "extra.txt").write_text("x")
    assert not same_tree(long_dir, copy_dir)  # a file more is a difference, as in the digest
    (copy_dir / "extra.txt").unlink()
    shared = LongShortPair().load(long_dir, copy_dir, tmp_path / "pair.json")
    apart = LongShortPair().load(long_dir, other_dir, tmp_path / "pair.json")
    assert shared.long is shared.short and apart.long is not apart.short
