"""Bad input: each case is an error naming the file and line (or the config field), and nothing is written.

The loaders are the project's three readers of jsonl: ``load_problems`` (``data.path``, the synthesize
stage), ``load_benchmark`` (``evaluate.benchmarks``) and ``iter_jsonl`` under both. The CLI is run in
process (typer's runner) except for one real subprocess, which checks that no traceback reaches the user.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from longshort.cli import app
from longshort.config import ConfigError, DataConfig, GenerationConfig, ModelConfig, load_profile
from longshort.io import MAX_LINE_BYTES, DataError, iter_jsonl
from tasks.benchmarks import load_benchmark
from tasks.synthesize import load_problems, synthesize

REPO = Path(__file__).resolve().parent.parent
GOOD = {"problem": "What is 1+1?", "answer": "2", "response": "<think>\n1+1=2\n</think>\n<answer>\\boxed{2}</answer>"}


def _line(**changes) -> bytes:
    row = {**GOOD, **changes}
    return json.dumps({k: v for k, v in row.items() if v is not ...}).encode() + b"\n"


# (case, second line of the file, what the message says); the first line is always a good row
BAD_LINES = [
    ("malformed json", b'{"problem": "1+2", "answer": \n', "not valid JSON"),
    ("not an object", b'["1+2", "3"]\n', "expected a JSON object, got list"),
    ("missing answer", _line(answer=...), "missing field 'answer'"),
    ("missing problem", _line(problem=...), "missing field 'problem'"),
    ("answer is a list", _line(answer=["2"]), "field 'answer' must be a string"),
    ("answer is a bool", _line(answer=True), "field 'answer' must be a string"),
    ("problem is a number", _line(problem=12), "field 'problem' must be a string, got int"),
    ("empty problem", _line(problem="  \n"), "field 'problem' is empty"),
    ("empty answer", _line(answer=""), "field 'answer' is empty"),
    ("invalid utf-8", b'{"problem": "caf\xe9 \xff", "answer": "2"}\n', "not valid UTF-8"),
    ("lone surrogate", b'{"problem": "x \\ud800", "answer": "2"}\n', "unpaired surrogate (\\ud800)"),
    ("huge integer", b'{"problem": "p", "answer": ' + b"9" * 5000 + b"}\n", "not valid JSON"),
    ("deep nesting", b'{"problem": ' + b"[" * 100_000 + b"\n", "nested too deeply"),
]


def _write(tmp_path: Path, second_line: bytes, name: str = "bad.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(_line() + second_line)
    return path


@pytest.mark.parametrize("case,line,message", BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_problem_loader_names_file_line_and_field(tmp_path, case, line, message):
    path = _write(tmp_path, line)
    with pytest.raises(DataError) as err:
        load_problems(DataConfig(source="traces", path=str(path)), need_response=True)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)


@pytest.mark.parametrize("case,line,message", BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_benchmark_loader_names_file_line_and_field(tmp_path, case, line, message):
    if case == "answer is a list":  # a benchmark answer may be an integer, so its message says so
        message = "field 'answer' must be a string or an integer"
    if case == "answer is a bool":
        message = "field 'answer' must be a string or an integer, got bool"
    path = _write(tmp_path, line)
    with pytest.raises(DataError) as err:
        load_benchmark(str(path))
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)


@pytest.mark.parametrize("case,line,message", BAD_LINES[:4] + BAD_LINES[7:8] + BAD_LINES[9:11],
                         ids=[c[0] for c in BAD_LINES[:4] + BAD_LINES[7:8] + BAD_LINES[9:11]])  # fmt: skip
def test_synthesize_stage_writes_nothing_on_bad_rows(tmp_path, case, line, message):
    path = _write(tmp_path, line)
    out = tmp_path / "artifacts" / "synthesize" / "key"
    with pytest.raises(DataError, match=re.escape(message)):
        synthesize(DataConfig(source="traces", path=str(path)), out, GenerationConfig(), ModelConfig())
    assert not (tmp_path / "artifacts").exists()


def test_response_that_breaks_the_protocol_is_a_data_error(tmp_path):
    path = _write(tmp_path, _line(response="<think>\nx <answer> y\n</think>\n<answer>\\boxed{2}</answer>"))
    with pytest.raises(DataError, match=rf"^{path}:2: field 'response': turn 1: long turn has no closing </think>"):
        load_problems(DataConfig(source="traces", path=str(path)), need_response=True)


def test_empty_and_blank_files_have_no_problems(tmp_path):
    for content in (b"", b"\n  \n\n"):
        path = tmp_path / "empty.jsonl"
        path.write_bytes(content)
        with pytest.raises(DataError, match=f"{path}: no problems"):
            load_problems(DataConfig(source="teacher", path=str(path), teacher="t"), need_response=False)
        with pytest.raises(DataError, match="no benchmark rows"):
            load_benchmark(str(path))


def test_huge_line_is_refused_without_reading_it_whole(tmp_path):
    """The limit is MAX_LINE_BYTES (16 MiB) per line; a file with no newline at all stops there."""
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(_line())
        f.write(b'{"problem": "' + b"x" * (MAX_LINE_BYTES + 10) + b'", "answer": "2"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: line is longer than the limit of {MAX_LINE_BYTES} bytes"):
        load_problems(DataConfig(source="teacher", path=str(path), teacher="t"), need_response=False)
    # the limit counts the row, not its line ending: a row of exactly the limit is read
    path.write_bytes(b'{"a": "' + b"y" * 10 + b'"}\r\n')
    assert [row for _, row in iter_jsonl(path, max_line_bytes=len(b'{"a": "yyyyyyyyyy"}'))] == [{"a": "y" * 10}]
    with pytest.raises(DataError, match="longer than the limit of 18 bytes"):
        list(iter_jsonl(path, max_line_bytes=18))
    # "without reading it whole": a 256 MiB line (a sparse file, no disk used) under a 1 KiB limit allocates
    # about the limit, not the line
    import tracemalloc

    sparse = tmp_path / "no-newline.jsonl"
    with open(sparse, "wb") as f:
        f.write(b'{"problem": "')
        f.truncate(256 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="longer than the limit of 1024 bytes"):
            list(iter_jsonl(sparse, max_line_bytes=1024))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


# --- configs: unknown keys and out-of-range values are in tests/test_config.py; here the cases it lacks


def test_profile_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{path}: not valid UTF-8"):
        load_profile(path)


runner = CliRunner()


def _one_line_error(result, *fragments: str) -> str:
    """The command failed with exit 2 and exactly one ``error: …`` line on stderr, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("data.demo.n_train=-1", "field 'data.demo.n_train': Input should be greater than or equal to 1 (got -1)"),
        ("cold_start.theta=1.5", "field 'cold_start.theta'"),
        ("rl.efficiencyy=kimi", "field 'rl.efficiencyy': unknown key"),
        ("evaluate.k=0", "field 'evaluate.k'"),
        ("rl.rounds=true", "field 'rl.rounds': Input should be an integer, not true/false (got True)"),
        ("base_model.dtype=bfloat16", "field '(profile)': Value error, rl.lora: base_model.dtype is bfloat16"),  # cross-field
    ],
)
def test_cli_run_refuses_a_bad_override_naming_the_field(in_tmp_repo, override, fragment):
    result = runner.invoke(app, ["run", "-p", "smoke", "-s", override, "-s", "run.workspace=ws"])
    _one_line_error(result, f"--set {override}: {fragment}")  # the override is to blame, not smoke.yaml
    assert not (in_tmp_repo / "ws").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        ("run.task_runner=dask", "run.task_runner is 'dask' but prefect-dask is not installed: pip install prefect-dask"),
        ("generation.backend=vllm", "generation.backend is 'vllm' but CUDA or the vllm package is missing"),
        ("rl.learning_rate=[1", "override 'rl.learning_rate=[1': not valid YAML: expected ',' or ']', but got '<stream end>'"),
    ],
)
def test_cli_run_refuses_what_would_fail_minutes_later(in_tmp_repo, override, message):
    from models.generation import vllm_available

    if override.startswith("generation") and vllm_available():
        pytest.skip("vLLM and CUDA are present here")
    result = runner.invoke(app, ["run", "-p", "smoke", "-s", override, "-s", "run.workspace=ws"])
    assert _one_line_error(result) == f"error: {message}"
    assert not (in_tmp_repo / "ws").exists()


def test_cli_run_refuses_a_profile_with_a_section_given_twice(tmp_path):
    path = tmp_path / "twice.yaml"
    smoke = (REPO / "configs" / "smoke.yaml").read_text().replace("workspace:", f"workspace: {tmp_path / 'ws'} #")
    path.write_text(smoke + "evaluate:\n  k: 8\n  temperature: 0.6\n")
    result = runner.invoke(app, ["run", "-p", str(path)])
    _one_line_error(result, f"{path}:{len(smoke.splitlines()) + 1}:1: not valid YAML: duplicate key 'evaluate' (first at line")
    assert not (tmp_path / "ws").exists()


def _profile(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "bad-input.yaml"
    base = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    base["run"]["workspace"] = str(tmp_path / "ws")
    path.write_text(yaml.safe_dump({**base, **sections}))
    return path


@pytest.mark.parametrize("command", ["run", "evaluate"])
def test_cli_run_checks_the_data_file_before_anything_runs(tmp_path, command):
    data = _write(tmp_path, b'{"problem": "1+2", "answer": null}\n')
    profile = _profile(tmp_path, data={"source": "traces", "path": str(data)}, cold_start={"compressor": "verbatim"})
    result = runner.invoke(app, [command, "-p", str(profile)])
    _one_line_error(result, f"{data}:2: field 'answer' must be a string, got NoneType")
    assert not (tmp_path / "ws").exists()


def test_cli_evaluate_checks_benchmark_files_before_anything_runs(tmp_path):
    bench = _write(tmp_path, b'{"problem": "1+2", "answer": "3"}\n\xc3\x28\n', name="mybench.jsonl")
    profile = _profile(tmp_path, evaluate={"n_problems": 4, "budgets": [64], "benchmarks": [{"source": str(bench)}]})
    result = runner.invoke(app, ["evaluate", "-p", str(profile)])
    _one_line_error(result, f"{bench}:3: not valid UTF-8")
    assert not (tmp_path / "ws").exists()


def test_cli_evaluate_reports_a_mistyped_benchmark_path_before_anything_runs(tmp_path):
    missing = tmp_path / "benchmarks" / "math500.json"  # .json, not .jsonl: still a path, not a hub id
    profile = _profile(tmp_path, evaluate={"n_problems": 4, "budgets": [64], "benchmarks": [{"source": str(missing)}]})
    result = runner.invoke(app, ["evaluate", "-p", str(profile)])
    _one_line_error(result, str(missing))
    assert not (tmp_path / "ws").exists()


def test_cli_stage_names_the_bad_line_and_leaves_no_stage_folder(in_tmp_repo):
    data = in_tmp_repo / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes(_line() + b"{oops}\n")
    (data / "heldout.jsonl").write_bytes(_line())
    # `longshort stage` runs only the profile whose data.demo is params.yaml's `demo` (as test_pipeline's dvc repro)
    smoke_demo = load_profile("smoke").data.demo.model_dump(mode="json")
    (in_tmp_repo / "params.yaml").write_text(yaml.safe_dump({"profile": "smoke", "demo": smoke_demo}))
    result = runner.invoke(app, ["stage", "chunk", "-p", "smoke", "--data", str(data)])
    _one_line_error(result, f"{data / 'train.jsonl'}:2: not valid JSON")
    assert not (data / "chunk").exists()


@pytest.mark.parametrize(
    "params,fragment",
    [
        (b"demo:\n  n_train: 10\n  colour: red\n", "field 'demo.colour': unknown key"),
        (b"demo:\n  n_train: 0\n", "field 'demo.n_train': Input should be greater than or equal to 1 (got 0)"),
        (b"demo:\n  seed: \xff\xfe\n", "not valid UTF-8"),
        (b"demo: [1, 2]\n", "expected a mapping with a 'demo' section"),
        (b"demo: {n_train: [\n", "params.yaml:2:1: not valid YAML: expected the node content"),
    ],
    ids=["unknown key", "out of range", "invalid utf-8", "not a mapping", "broken yaml"],
)
def test_cli_synthesize_real_process_one_line_no_traceback(tmp_path, params, fragment):
    """The installed ``longshort`` command, in its own process: exit 2, one line on stderr, no output folder."""
    (tmp_path / "params.yaml").write_bytes(params)
    out = tmp_path / "out"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "longshort"), "synthesize", "--params", "params.yaml", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], done.stderr
    assert not out.exists()


# --- models: pickle weights and custom code


def test_solve_refuses_pickle_weights_unless_the_profile_allows_them(saved_tiny):
    """load_pretrained's refusal is in tests/test_models.py; here it reaches the user through the CLI."""
    import torch
    from safetensors.torch import load_file

    (weights,) = saved_tiny.glob("*.safetensors")
    torch.save(load_file(weights), saved_tiny / "pytorch_model.bin")
    weights.unlink()
    before = sorted(p.name for p in saved_tiny.iterdir())
    args = ["solve", "Start with 3.", "--long", str(saved_tiny), "--short", str(saved_tiny), "-p", "smoke"]
    result = runner.invoke(app, args + ["-s", "protocol.max_turns=2"])
    _one_line_error(result, str(saved_tiny), "pickle files (pytorch_model.bin)", "base_model.allow_pickle")
    assert sorted(p.name for p in saved_tiny.iterdir()) == before
    allowed = runner.invoke(app, args + ["-s", "protocol.max_turns=2", "-s", "base_model.allow_pickle=true",
                                         "-s", "protocol.max_new_tokens_long=2", "-s", "protocol.max_new_tokens_short=2"])  # fmt: skip
    assert allowed.exit_code == 0, allowed.output


def test_solve_names_a_missing_folder_and_an_empty_problem(saved_tiny, tmp_path):
    missing = tmp_path / "no-such-model"
    result = runner.invoke(app, ["solve", "Start with 3.", "--long", str(missing), "--short", str(saved_tiny), "-p", "smoke"])
    assert _one_line_error(result) == f"error: --long {missing}: no such folder (a saved model with its tokenizer)"
    result = runner.invoke(app, ["solve", "  ", "--long", str(saved_tiny), "--short", str(saved_tiny), "-p", "smoke"])
    assert _one_line_error(result) == "error: the problem text is empty"


def test_solve_samples_with_the_profiles_temperature_and_seed(saved_tiny):
    """Greedy at temperature 0; at 1.0 the seed picks the sample, as in the served pair."""

    def first_turn(*overrides: str) -> str:
        args = ["solve", "Start with 3.", "--long", str(saved_tiny), "--short", str(saved_tiny), "-p", "smoke",
                "-s", "protocol.max_turns=2", "-s", "protocol.max_new_tokens_long=12", "-s", "protocol.max_new_tokens_short=2", *(a for o in overrides for a in ("-s", o))]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        return result.stdout

    greedy = first_turn("generation.temperature=0")
    assert first_turn("generation.temperature=0", "run.seed=5") == greedy
    sampled = {seed: first_turn("generation.temperature=1.0", f"run.seed={seed}") for seed in (1, 2)}
    assert first_turn("generation.temperature=1.0", "run.seed=1") == sampled[1]
    assert sampled[1] != sampled[2] and greedy not in sampled.values()


def test_custom_model_code_is_not_run_without_trust_remote_code(saved_tiny):
    from models.factory import ModelLoadError, load_pretrained

    marker = saved_tiny / "custom_code_ran"
    for name in ("modeling_custom.py", "configuration_custom.py"):
        (saved_tiny / name).write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    config = json.loads((saved_tiny / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomModel"}
    # a known architecture with an auto_map: transformers' own Llama class is used, the custom module is not imported
    (saved_tiny / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    model, _ = load_pretrained(saved_tiny)
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()
    # an architecture only the folder's code knows: refused, naming the folder and the profile field
    (saved_tiny / "config.json").write_text(json.dumps({**config, "auto_map": auto_map, "model_type": "custom_llama"}))
    with pytest.raises(ModelLoadError, match=rf"^{saved_tiny}: the model needs custom code; set trust_remote_code"):
        load_pretrained(saved_tiny)
    assert not marker.exists()
