"""Training data in: ids, answers and traces that ``load_problems`` refuses, drops or normalizes, and the pair
of split files that ``write_splits`` replaces together (the ``synthesize`` stage).

Bad rows are errors naming ``file:line``; wrong or cut-off traces are dropped with a warning naming the file
and lines; nothing already on disk is lost when a write fails.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from longshort.cli import app
from longshort.config import ConfigError, DataConfig, DemoTaskConfig, GenerationConfig, ModelConfig
from longshort.io import DataError, OutputError
from tasks.demo import count_problems, generate_splits
from models.protocol import ProtocolError, parse_response
from tasks.synthesize import load_problems, normalize_response, synthesize_with_teacher, trace_answer, write_splits

RESPONSE = "<think>\n1+1=2\n</think>\n<answer>\\boxed{2}</answer>"
GOOD = {"problem": "What is 1+1?", "answer": "2", "response": RESPONSE}


def _jsonl(tmp_path: Path, *rows: dict, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _traces(path: Path) -> list[dict[str, str]]:
    return load_problems(DataConfig(source="traces", path=str(path)), need_response=True)


def _problems(path: Path) -> list[dict[str, str]]:
    return load_problems(DataConfig(source="teacher", path=str(path), teacher="t"), need_response=False)


# --- ids


def test_duplicate_id_names_both_lines(tmp_path):
    path = _jsonl(tmp_path, {**GOOD, "id": "a"}, {**GOOD, "id": "b"}, {**GOOD, "id": "a"})
    with pytest.raises(DataError) as err:
        _traces(path)
    assert str(err.value) == f"{path}:3: duplicate id 'a' (first at line 1)"


def test_an_id_that_equals_a_generated_one_is_a_duplicate(tmp_path):
    path = _jsonl(tmp_path, GOOD, {**GOOD, "id": "data-1"})
    with pytest.raises(DataError) as err:
        _problems(path)
    assert str(err.value) == f"{path}:2: duplicate id 'data-1' (first at line 1)"


@pytest.mark.parametrize(
    "value,message",
    [
        (None, "field 'id' must be a string or an integer, got NoneType None"),
        ({"a": 1}, "field 'id' must be a string or an integer, got dict {'a': 1}"),
        (True, "field 'id' must be a string or an integer, got bool True"),
        (1.5, "field 'id' must be a string or an integer, got float 1.5"),
        ("  ", "field 'id' is empty"),
    ],
    ids=["null", "object", "bool", "fraction", "blank"],
)
def test_id_must_be_a_string_or_an_integer(tmp_path, value, message):
    path = _jsonl(tmp_path, GOOD, {**GOOD, "id": value})
    with pytest.raises(DataError) as err:
        _traces(path)
    assert str(err.value) == f"{path}:2: {message}"


def test_ids_read_as_the_benchmark_loader_reads_them_and_generated_when_absent(tmp_path):
    path = _jsonl(tmp_path, {**GOOD, "id": 7}, {**GOOD, "id": 8.0}, {**GOOD, "id": " x "}, GOOD, GOOD)
    assert [r["id"] for r in _traces(path)] == ["7", "8", "x", "data-4", "data-5"]
    # the same ids as integers and as strings are the same id
    path = _jsonl(tmp_path, {**GOOD, "id": 7}, {**GOOD, "id": "7"})
    with pytest.raises(DataError) as err:
        _problems(path)
    assert str(err.value) == f"{path}:2: duplicate id '7' (first at line 1)"


# --- answers


def test_integral_float_answers_are_integers(tmp_path):
    answers = [27.0, 1e20, 27, 2.5, -3.0, " 4 "]
    path = _jsonl(tmp_path, *({"problem": f"p{i}", "answer": a} for i, a in enumerate(answers)))
    assert [r["answer"] for r in _problems(path)] == ["27", "100000000000000000000", "27", "2.5", "-3", " 4 "]


def test_integral_float_answer_matches_the_trace_box(tmp_path):
    path = _jsonl(tmp_path, {**GOOD, "answer": 2.0})
    assert _traces(path) == [{"id": "data-1", "problem": "What is 1+1?", "answer": "2", "response": RESPONSE}]


# --- traces: empty thinking, wrong or cut-off answers


@pytest.mark.parametrize(
    "response",
    ["<think>\n\n</think>\n<answer>\\boxed{2}</answer>", "<think> \n \n</think>\n\\boxed{2}", "</think>\n\\boxed{2}"],
    ids=["protocol", "r1 style", "no opening tag"],
)
def test_empty_thinking_is_an_error_at_load_time(tmp_path, response):
    path = _jsonl(tmp_path, GOOD, {**GOOD, "response": response})
    with pytest.raises(DataError) as err:
        _traces(path)
    assert str(err.value) == f"{path}:2: field 'response' has an empty thinking section"


def test_trace_answer_is_the_traces_own_final_box():
    assert trace_answer(RESPONSE) == "2"
    assert trace_answer("<think>\nso \\boxed{3}\n</think>\nThe answer is \\boxed{2}.") == "2"
    assert trace_answer("<think>\nso it is \\boxed{2}") is None  # cut off before </think>
    assert trace_answer("1+1=2, so \\boxed{3}.\n\n**Final Answer**\n\\boxed{2}") == "2"  # no tags, as R1 files often are
    assert trace_answer("1+1=2, so the answer is 2.") is None  # no tags and no box
    assert trace_answer("<think>\n1+1=2\n</think>\nThe answer is 2.") is None


def test_wrong_and_cut_off_traces_are_dropped_with_a_warning(tmp_path, caplog):
    rows = [
        GOOD,
        {**GOOD, "response": "<think>\n1+1=3\n</think>\nSo \\boxed{3}."},  # wrong
        {**GOOD, "response": "<think>\n1+1 is"},  # cut off
        {**GOOD, "response": "<think>\n1+1=2\n</think>\nThe answer is two."},  # no box
        {**GOOD, "response": "<think>\n1+1=2\n</think>\nSo \\boxed{2}."},  # right, R1 style
        {**GOOD, "response": "1+1 is \\boxed{2}"},  # no tags (R1 files often have none): its last box counts
        {**GOOD, "response": "1+1 is 2, I think"},  # no tags, no box
    ]
    path = _jsonl(tmp_path, *rows)
    with caplog.at_level(logging.WARNING, logger="tasks.synthesize"):
        kept = _traces(path)
    assert [r["id"] for r in kept] == ["data-1", "data-5", "data-6"]
    assert kept[1]["response"] == "<think>\n1+1=2\n</think>\n<answer>So \\boxed{2}.</answer>"
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: dropped 4 of 7 traces whose final \\boxed{{}} answer is missing or differs from 'answer' "
        "(lines 2, 3, 4, 7)"
    ]


def test_the_warning_names_the_first_five_lines(tmp_path, caplog):
    wrong = {**GOOD, "response": "<think>\nx\n</think>\n\\boxed{5}"}
    path = _jsonl(tmp_path, *([wrong] * 7 + [GOOD]))
    with caplog.at_level(logging.WARNING, logger="tasks.synthesize"):
        assert len(_traces(path)) == 1
    assert caplog.records[0].getMessage().endswith("(lines 1, 2, 3, 4, 5, … (7 in all))")


def test_all_traces_dropped_is_an_error_naming_the_file(tmp_path):
    path = _jsonl(tmp_path, {**GOOD, "response": "<think>\n1+1=3\n</think>\n\\boxed{3}"}, {**GOOD, "response": "<think>\nhm"})
    with pytest.raises(DataError) as err:
        _traces(path)
    assert str(err.value) == (
        f"{path}: no traces left: all 2 have a final \\boxed{{}} answer that is missing or differs from 'answer' "
        "(lines 1, 2)"
    )


def test_max_examples_counts_the_kept_traces(tmp_path):
    wrong = {**GOOD, "response": "<think>\nx\n</think>\n\\boxed{5}"}
    path = _jsonl(tmp_path, wrong, {**GOOD, "id": "a"}, wrong, {**GOOD, "id": "b"}, {**GOOD, "id": "c"})
    rows = load_problems(DataConfig(source="traces", path=str(path), max_examples=2), need_response=True)
    assert [r["id"] for r in rows] == ["a", "b"]


@pytest.mark.parametrize(
    "text",
    [
        "<think>\nreason\n</think>\n<answer>The answer is \\boxed{5}",  # end of sequence before </answer>
        "<think>\nreason\n</think>\n\nThe answer is \\boxed{5}.</answer>",  # stop string kept, no <answer>
        "<think>\nreason\n</think>\n<answer> The answer is \\boxed{5}. </answer>\n",  # both, spaced
        "reason\n</think>\n<answer>The answer is \\boxed{5}",  # no <think>, as R1 chat templates leave it
    ],
)
def test_a_final_part_with_its_own_answer_tags_is_not_wrapped_twice(text):
    response = normalize_response(text, "5")
    thinking, final = parse_response(response)
    assert thinking == "reason"
    assert final.kind == "final" and final.answer == "5"
    assert response.count("<answer>") == 1 and response.count("</answer>") == 1


def test_a_final_part_that_hands_back_stays_unparseable():
    """``</rethink>`` has no place in a one-model response: it is not stripped, so the trace is rejected."""
    with pytest.raises(ProtocolError):
        parse_response(normalize_response("<think>\nreason\n</think>\n<answer>more \\boxed{5}</rethink>", "5"))


def test_teacher_and_traces_keep_a_trace_whose_answer_tags_were_cut(tmp_path):
    cut = "<think>\n1+1=2\n</think>\n<answer>\\boxed{2}"  # the teacher's EOS came before </answer>
    kept = _traces(_jsonl(tmp_path, {**GOOD, "response": cut}))
    assert [r["response"] for r in kept] == [RESPONSE]

    class Teacher:
        def chat_prompt(self, system: str, problem: str) -> str:
            return problem

        def generate(self, prompts, **sampling) -> list:
            return [[SimpleNamespace(text="<think>\n1+1=2\n</think>\n\\boxed{2}.</answer>")] for _ in prompts]

    cfg = DataConfig(source="teacher", path="problems.jsonl", teacher="t")
    rows = [{"id": "0", "problem": "1+1", "answer": "2"}]
    kept = synthesize_with_teacher(rows, cfg, GenerationConfig(), ModelConfig(), 0, backend=Teacher())
    assert [r["response"] for r in kept] == ["<think>\n1+1=2\n</think>\n<answer>\\boxed{2}.</answer>"]


def test_teacher_keeps_only_traces_whose_own_answer_is_right():
    texts = [
        "<think>\n1+1=2\n</think>\n<answer>\\boxed{2}</answer>",  # right
        "<think>\n1+1=3\n</think>\n<answer>\\boxed{3}</answer>",  # wrong
        "<think>\n1+1 is",  # cut off at max_new_tokens: its answer would be grafted on
        "<think>\n1+1=2 <answer>\n</think>\n<answer>\\boxed{2}</answer>",  # right, but breaks the protocol
        "<think>\n\n</think>\n<answer>\\boxed{2}</answer>",  # right, but closed </think> at once: no thought to score
    ]

    class Teacher:  # stands in for an R1-distilled model, which cannot run here
        def __init__(self) -> None:
            self.sampling: dict = {}

        def chat_prompt(self, system: str, problem: str) -> str:
            return problem

        def generate(self, prompts, **sampling) -> list:
            self.sampling = sampling
            return [[SimpleNamespace(text=texts[int(p)])] for p in prompts]

    rows = [{"id": str(i), "problem": str(i), "answer": "2"} for i in range(len(texts))]
    cfg = DataConfig(source="teacher", path="problems.jsonl", teacher="t", teacher_max_new_tokens=16)
    teacher = Teacher()
    kept = synthesize_with_teacher(rows, cfg, GenerationConfig(), ModelConfig(), 0, backend=teacher)
    assert kept == [{"id": "0", "problem": "0", "answer": "2", "response": texts[0]}]
    # R1 models loop when decoded greedily: the teacher samples as DeepSeek advises
    assert teacher.sampling["temperature"] == 0.6 and teacher.sampling["top_p"] == 0.95
    assert teacher.sampling["max_new_tokens"] == 16


# --- the split pair


def _pair(out: Path) -> dict[str, bytes]:
    write_splits(out, [{"id": "t", "v": 1}], [{"id": "h", "v": 1}])
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_folder_in_place_of_heldout_keeps_the_old_pair(tmp_path):
    out = tmp_path / "synth"
    before = _pair(out)
    (out / "heldout.jsonl").unlink()
    (out / "heldout.jsonl").mkdir()
    (out / "heldout.jsonl" / "x").write_text("x")
    with pytest.raises(OutputError) as err:
        write_splits(out, [{"id": "t", "v": 2}], [{"id": "h", "v": 2}])
    assert str(err.value) == f"cannot write {out / 'heldout.jsonl'}: Is a directory"
    assert (out / "train.jsonl").read_bytes() == before["train.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == ["heldout.jsonl", "train.jsonl"]  # no temporary files


def test_a_failed_second_rename_puts_the_old_train_back(tmp_path, monkeypatch):
    out = tmp_path / "synth"
    before = _pair(out)
    real = os.replace

    def replace(src, dst) -> None:
        if Path(dst).name == "heldout.jsonl":
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError) as err:
        write_splits(out, [{"id": "t", "v": 2}], [{"id": "h", "v": 2}])
    assert str(err.value) == f"cannot write {out / 'heldout.jsonl'}: Input/output error"
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old pair, no temporary files


def test_a_failed_second_rename_with_no_old_pair_leaves_none(tmp_path, monkeypatch):
    out = tmp_path / "synth"
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: real(s, d) if Path(d).name != "heldout.jsonl" else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_splits(out, [{"id": "t"}], [{"id": "h"}])
    assert list(out.iterdir()) == []


def test_a_successful_write_replaces_both(tmp_path):
    out = tmp_path / "synth"
    _pair(out)
    files = write_splits(out, [{"id": "t", "v": 2}, {"id": "u"}], [{"id": "h", "v": 2}])
    assert (files.n_train, files.n_heldout) == (2, 1)
    assert (out / "train.jsonl").read_text() == '{"id": "t", "v": 2}\n{"id": "u"}\n'
    assert (out / "heldout.jsonl").read_text() == '{"id": "h", "v": 2}\n'
    assert sorted(p.name for p in out.iterdir()) == ["heldout.jsonl", "train.jsonl"]


# --- the demo task asked for more problems than exist


def test_demo_problem_count_is_exact():
    cfg = DemoTaskConfig(min_ops=1, max_ops=2, max_value=5, max_operand=2)

    def chains(value: int, n: int) -> int:
        return 1 if n == 0 else sum(chains(value + m, n - 1) for m in (-2, -1, 1, 2) if 0 <= value + m <= 5)

    assert count_problems(cfg) == sum(chains(v, n) for v in range(6) for n in (1, 2)) == 76
    small = DemoTaskConfig(min_ops=1, max_ops=1, max_value=5, max_operand=1, n_train=9, n_heldout=1)
    assert count_problems(small) == 10
    train, heldout = generate_splits(small)  # every one of them can be drawn
    assert len(set(train) | set(heldout)) == 10


def test_demo_too_many_problems_is_a_config_error_naming_the_fields():
    cfg = DemoTaskConfig(n_train=50000, n_heldout=10, min_ops=1, max_ops=1)
    with pytest.raises(ConfigError) as err:
        generate_splits(cfg)
    assert str(err.value) == (
        "demo task: cannot draw 50000+10 distinct problems with max_value=19, max_operand=9, ops 1..1: "
        "data.demo.n_train + n_heldout = 50010 but the settings allow only 270 distinct problems "
        "(lower n_train/n_heldout or raise max_value/max_operand/max_ops)"
    )


def test_cli_synthesize_too_many_problems_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("demo:\n  n_train: 50000\n  n_heldout: 10\n  min_ops: 1\n  max_ops: 1\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["synthesize", "--params", str(tmp_path / "params.yaml"), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "error: demo task: cannot draw 50000+10 distinct problems with max_value=19, max_operand=9, ops 1..1: "
        "data.demo.n_train + n_heldout = 50010 but the settings allow only 270 distinct problems "
        "(lower n_train/n_heldout or raise max_value/max_operand/max_ops)"
    ]
    assert not out.exists()


# --- a byte order mark


def test_a_utf8_bom_on_line_1_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert [r["answer"] for r in _traces(path)] == ["2"]


def test_the_shared_r1_traces_without_tags_all_load():
    """The 291 LIMO traces (R1-Distill-Qwen-32B) are stored without <think> tags; each ends in its correct box."""
    from conftest import SHARED_DATA

    path = SHARED_DATA / "cold_start" / "limo_r1_distill_qwen32b.jsonl"
    rows = load_problems(DataConfig(source="traces", path=str(path)), need_response=True)
    assert len(rows) == 291 and len({r["id"] for r in rows}) == 291


def test_an_unreachable_hub_dataset_is_a_data_error_naming_the_id():
    """No network here; HF_HUB_OFFLINE makes `datasets` say so at once (its value is read at import)."""
    import subprocess
    import sys

    code = ("from longshort.config import DataConfig; from tasks.synthesize import load_problems; "
            "load_problems(DataConfig(source='traces', hub_id='someone/traces', revision='v1.0'), need_response=True)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith(
        "longshort.io.DataError: data.hub_id someone/traces: cannot load split 'train' at revision v1.0 from the hub: "
        "Couldn't reach 'someone/traces' on the Hub"
    ), done.stderr[-2000:]


def test_a_teacher_loaded_for_synthesis_is_closed_after_it_answered_and_a_given_one_is_not(saved_tiny, monkeypatch):
    """On a GPU the teacher is a vLLM engine holding most of the memory: the call that loads it (a real tiny
    model from a folder here) also closes it, when the generation fails too; a backend passed in stays open."""
    from models.generation import TransformersBackend

    closed: list[TransformersBackend] = []
    real_close = TransformersBackend.close

    def close(self) -> None:
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(TransformersBackend, "close", close)
    cfg = DataConfig(source="teacher", path="problems.jsonl", teacher=str(saved_tiny), teacher_max_new_tokens=16)
    rows = [{"id": "0", "problem": "1+1", "answer": "2"}]
    assert synthesize_with_teacher(rows, cfg, GenerationConfig(), ModelConfig(), 0) == []  # an untrained model: no right trace
    assert len(closed) == 1 and closed[0].model is None

    monkeypatch.setattr(TransformersBackend, "generate", lambda self, *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        synthesize_with_teacher(rows, cfg, GenerationConfig(), ModelConfig(), 0)
    assert len(closed) == 2 and closed[1].model is None

    from models.factory import load_model

    given = TransformersBackend(*load_model(ModelConfig(), path=saved_tiny))
    with pytest.raises(ZeroDivisionError):
        synthesize_with_teacher(rows, cfg, GenerationConfig(), ModelConfig(), 0, backend=given)
    assert len(closed) == 2 and given.model is not None
