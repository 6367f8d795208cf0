"""Benchmark loading: the five shared files, GPQA's per-seed shuffle, and malformed rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longshort.io import DataError
from tasks.answers import check_answer
from tasks.answers import choice_letter
from tasks.benchmarks import (
    GPQA_INSTRUCTION,
    BenchmarkItem,
    benchmark_name,
    gpqa_permutation,
    hub_load_args,
    load_benchmark,
)
from conftest import SHARED_DATA

BENCH = SHARED_DATA / "benchmarks"
ROW_COUNTS = {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "gpqa_diamond": 198}


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", sorted(ROW_COUNTS))
def test_shared_benchmark_row_counts_and_schema(name: str) -> None:
    items = load_benchmark(str(BENCH / f"{name}.jsonl"))
    assert len(items) == ROW_COUNTS[name]
    assert len({it.id for it in items}) == len(items)
    expected_kind = "choice" if name == "gpqa_diamond" else "math"
    for it in items:
        assert isinstance(it, BenchmarkItem)
        assert it.kind == expected_kind
        assert isinstance(it.answer, str) and it.answer
        assert it.problem.strip()
    if name.startswith(("aime", "amc")):  # integer answers (AMC23 has one negative: 12A-25 is -1)
        assert all(it.answer.lstrip("-").isdigit() for it in items)


@pytest.mark.parametrize("name", sorted(ROW_COUNTS))
def test_every_reference_answer_is_accepted_when_fed_back_boxed(name: str) -> None:
    items = load_benchmark(str(BENCH / f"{name}.jsonl"), seed=3)
    rejected = [
        (it.id, it.answer) for it in items if not check_answer(f"So the answer is \\boxed{{{it.answer}}}.", it.kind, it.answer)
    ]
    assert rejected == []


def test_math500_keeps_fields_in_extras_and_the_first_answer() -> None:
    first = load_benchmark(str(BENCH / "math500.jsonl"), limit=1)[0]
    assert first.id == "test/precalculus/807.json"
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert set(first.extras) == {"solution", "subject", "level"}


def test_aime24_answer_with_leading_zero_was_normalised_and_is_still_checked() -> None:
    items = {it.id: it for it in load_benchmark(str(BENCH / "aime24.jsonl"))}
    padded = [it for it in items.values() if it.extras["answer_original"] != it.answer]
    assert padded, "SOURCES.md says some AIME answers had leading zeros"
    for it in padded:
        assert check_answer(it.extras["answer_original"], "math", it.answer)


def test_gpqa_shuffle_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    path = str(BENCH / "gpqa_diamond.jsonl")
    a0, b0, a1 = (load_benchmark(path, seed=s) for s in (0, 0, 1))
    assert [it.problem for it in a0] == [it.problem for it in b0]
    assert [it.answer for it in a0] == [it.answer for it in b0]
    changed = sum(x.problem != y.problem for x, y in zip(a0, a1))
    assert changed > 150  # 23 of 24 permutations differ; 198 rows
    # letters end up roughly balanced (a bad shuffle would pile on one letter)
    counts = {letter: sum(it.answer == letter for it in a0) for letter in "ABCD"}
    assert min(counts.values()) >= 30, counts


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_gpqa_letter_points_at_the_correct_text(seed: int) -> None:
    raw = {r["id"]: r for r in map(json.loads, (BENCH / "gpqa_diamond.jsonl").read_text().splitlines())}
    for it in load_benchmark(str(BENCH / "gpqa_diamond.jsonl"), seed=seed):
        correct = raw[it.id]["correct_answer"]
        assert it.extras["choices"][it.answer] == correct
        # the options are the file's options, each shown once, in the rebuilt problem text
        assert sorted(it.extras["choices"].values()) == sorted(raw[it.id]["choices"].values())
        options = "\n".join(f"{letter}) {text}" for letter, text in it.extras["choices"].items())
        assert it.problem == raw[it.id]["question"] + "\n\n" + options + "\n\n" + GPQA_INSTRUCTION
        assert f"\n{it.answer}) {correct}" in it.problem


def test_gpqa_problem_asks_for_the_boxed_letter_and_the_checker_reads_one() -> None:
    """The checker (``choice_letter``) accepts only a letter, so the problem text must ask for one."""
    for it in load_benchmark(str(BENCH / "gpqa_diamond.jsonl"), seed=4, limit=20):
        assert it.problem.endswith("\n\nAnswer with the letter of the correct option (A, B, C or D) inside \\boxed{}.")
        body = it.problem[: -len(GPQA_INSTRUCTION)]
        shown = dict(line.split(") ", 1) for line in body.strip().splitlines()[-4:])
        assert shown == it.extras["choices"]  # the four options, in the order of extras["choices"]
        assert list(shown) == ["A", "B", "C", "D"]
        assert choice_letter(f"<answer>So \\boxed{{{it.answer}}}</answer>") == it.answer
        assert check_answer(f"\\boxed{{{it.answer}}}", "choice", it.answer)


def test_gpqa_shuffle_depends_on_id_not_on_file_order_or_limit() -> None:
    path = str(BENCH / "gpqa_diamond.jsonl")
    full = load_benchmark(path, seed=5)
    head = load_benchmark(path, seed=5, limit=3)
    assert head == full[:3]
    assert gpqa_permutation(5, full[2].id) == full[2].extras["permutation"]
    assert sorted(gpqa_permutation(5, "x")) == [0, 1, 2, 3]


def test_gpqa_from_hub_style_columns(tmp_path: Path) -> None:
    row = {"Record ID": "rec1", "Question": "Which is heaviest?", "Correct Answer": "lead",
           "Incorrect Answer 1": "air", "Incorrect Answer 2": "water", "Incorrect Answer 3": "wood"}  # fmt: skip
    items = load_benchmark(str(_write(tmp_path / "gpqa_diamond.jsonl", [row])), seed=2)
    assert items[0].id == "rec1"
    assert items[0].extras["choices"][items[0].answer] == "lead"
    assert items[0].kind == "choice"


def test_ints_are_stringified_and_unknown_names_default_to_math(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.jsonl", [{"id": "a", "problem": "1+1", "answer": 2}, {"id": 7, "question": "2+2", "answer": "4"}])
    items = load_benchmark(str(path))
    assert [(it.id, it.problem, it.answer, it.kind) for it in items] == [("a", "1+1", "2", "math"), ("7", "2+2", "4", "math")]
    assert benchmark_name(str(path)) == "mine"
    assert benchmark_name("HuggingFaceH4/MATH-500") == "math500"
    assert benchmark_name("Idavidrein/gpqa:gpqa_diamond") == "gpqa_diamond"


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("idavidrein/gpqa", "gpqa_diamond"),  # the repository's default config
        ("idavidrein/gpqa:gpqa_diamond", "gpqa_diamond"),
        ("idavidrein/gpqa:gpqa_main", "gpqa_main"),  # another config is another benchmark
        ("idavidrein/gpqa:gpqa_extended", "gpqa_extended"),
        ("someone/maths:Algebra", "maths_algebra"),
        ("someone/no-such-set", "no-such-set"),
        ("math-ai/aime25", "aime25"),
        ("/x/math500/", "math500"),  # a folder, trailing slash
        ("/x/math500", "math500"),
        ("/x/math500.jsonl", "math500"),
        ("data/gpqa_diamond.parquet", "gpqa_diamond"),
    ],
)
def test_benchmark_names_by_repository_and_config_and_by_path(source: str, name: str) -> None:
    assert benchmark_name(source) == name


def test_a_folder_with_a_trailing_slash_is_named_and_typed_by_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "gpqa_diamond"
    folder.mkdir()
    row = {"Record ID": "r", "Question": "Q?", "Correct Answer": "a",
           "Incorrect Answer 1": "b", "Incorrect Answer 2": "c", "Incorrect Answer 3": "d"}  # fmt: skip
    _write(folder / "test.jsonl", [row])
    assert benchmark_name(f"{folder}/") == "gpqa_diamond"
    assert [it.kind for it in load_benchmark(f"{folder}/")] == ["choice"]


@pytest.mark.parametrize(
    ("source", "split", "expected"),
    [
        ("idavidrein/gpqa", "test", ("idavidrein/gpqa", "gpqa_diamond", "train")),  # default -> the only split
        ("idavidrein/gpqa:gpqa_main", "test", ("idavidrein/gpqa", "gpqa_main", "train")),
        ("idavidrein/gpqa", "validation", ("idavidrein/gpqa", "gpqa_diamond", "validation")),  # named: kept
        ("HuggingFaceH4/aime_2024", "test", ("HuggingFaceH4/aime_2024", None, "train")),
        ("HuggingFaceH4/aime_2024", "dev", ("HuggingFaceH4/aime_2024", None, "dev")),
        ("HuggingFaceH4/MATH-500", "test", ("HuggingFaceH4/MATH-500", None, "test")),
        ("someone/set:Cfg", "train", ("someone/set", "Cfg", "train")),  # config case kept for the hub
    ],
)
def test_hub_split_is_replaced_only_when_left_at_the_default(source: str, split: str, expected: tuple) -> None:
    assert hub_load_args(source, split) == expected


def test_a_folder_source_reads_the_split_file(tmp_path: Path) -> None:
    _write(tmp_path / "test.jsonl", [{"id": "t", "problem": "p", "answer": "1"}])
    _write(tmp_path / "dev.jsonl", [{"id": "d", "problem": "p", "answer": "1"}])
    assert [it.id for it in load_benchmark(str(tmp_path))] == ["t"]
    assert [it.id for it in load_benchmark(str(tmp_path), split="dev")] == ["d"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": "a", "problem": "p", "answer": 1.5}], r"x\.jsonl:1: field 'answer' must be a string or an integer, got float"),
        ([{"id": "a", "problem": "p", "answer": True}], r"x\.jsonl:1: field 'answer' .* got bool"),
        ([{"id": "a", "problem": "p", "answer": ["1"]}], r"x\.jsonl:1: field 'answer' .* got list"),
        ([{"id": "a", "problem": "p", "answer": "1"}, {"id": "b", "problem": "p"}], r"x\.jsonl:2: missing field 'answer'"),
        ([{"id": "a", "answer": "1"}], r"x\.jsonl:1: missing field 'problem'"),
        ([{"id": "a", "problem": 3, "answer": "1"}], r"x\.jsonl:1: field 'problem' must be a string, got int"),
        ([{"id": "a", "problem": "  ", "answer": "1"}], r"x\.jsonl:1: field 'problem' is empty"),
        ([{"id": "a", "problem": "p", "answer": " "}], r"x\.jsonl:1: field 'answer' is empty"),
        ([{"id": "a", "problem": "p", "answer": "1"}] * 2, r"x\.jsonl:2: duplicate id 'a' \(first at .*x\.jsonl:1\)"),
        ([[1, 2]], r"x\.jsonl:1: expected a JSON object"),
        ([], r"no benchmark rows"),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path: Path, rows: list[object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_benchmark(str(_write(tmp_path / "x.jsonl", rows)))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"id": "g", "question": "q", "choices": {"A": "1", "B": "2", "C": "3"}, "correct_answer": "1"},
         r"gpqa_diamond\.jsonl:1: field 'choices' must be an object with keys A, B, C, D"),
        ({"id": "g", "question": "q", "choices": {"A": "1", "B": "2", "C": "3", "D": "4"}, "correct_answer": "5"},
         r"gpqa_diamond\.jsonl:1: field 'correct_answer' matches 0 of the choices"),
        ({"id": "g", "choices": {"A": "1", "B": "2", "C": "3", "D": "4"}, "correct_answer": "1"},
         r"gpqa_diamond\.jsonl:1: missing field 'question'"),
        ({"Record ID": "g", "Question": "q", "Correct Answer": "x", "Incorrect Answer 1": "y", "Incorrect Answer 2": "z"},
         r"gpqa_diamond\.jsonl:1: field 'Incorrect Answer 3' must be a non-empty string"),
    ],
)
def test_malformed_gpqa_rows(tmp_path: Path, row: dict[str, object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_benchmark(str(_write(tmp_path / "gpqa_diamond.jsonl", [row])))


def test_missing_file_and_bad_limit(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_benchmark(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="limit"):
        load_benchmark(str(BENCH / "aime24.jsonl"), limit=0)


def test_hub_branch_loads_through_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ``datasets.load_dataset`` call of the hub branch, on a local dataset folder (no hub here).

    Arrow turns a column of ints and floats into floats, so integral floats must read back as ints.
    """
    import datasets

    from tasks.benchmarks import _item, _rows_from_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "ds"
    folder.mkdir()
    _write(folder / "test.jsonl", [{"unique_id": "u1", "problem": "1+1?", "answer": 2.0},
                                   {"unique_id": "u2", "problem": "2+2?", "answer": 4}])  # fmt: skip
    calls = []
    real = datasets.load_dataset

    def recording(*args, **kwargs):  # the real loader, with its arguments kept
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    rows = list(_rows_from_hub(str(folder), "test"))
    items = [_item(src, i, row, "x", "math", 0) for i, (src, row) in enumerate(rows)]
    assert [(it.id, it.answer) for it in items] == [("u1", "2"), ("u2", "4")]
    assert rows[1][0].where.endswith("[test] row 1")
    # a benchmark's revision reaches datasets (a local folder has no revisions: it reads the same rows)
    pinned = list(_rows_from_hub(str(folder), "test", "0123abc"))
    assert [row for _, row in pinned] == [row for _, row in rows]
    assert [c["revision"] for c in calls] == [None, "0123abc"]


def test_a_row_with_only_a_worked_solution_is_answered_by_its_last_box(tmp_path: Path) -> None:
    """math-ai/aime24 has id, problem, solution and url, no answer column: the answer is the solution's box."""
    from longshort.io import DataError
    from tasks.benchmarks import load_benchmark

    path = tmp_path / "aime24.jsonl"
    _write(path, [{"id": 60, "problem": "Find x.", "solution": "So $x = 2$ and then \\boxed{204}.", "url": "u"},
                  {"id": 61, "problem": "Find y.", "answer": "7", "solution": "... \\boxed{8}"}])  # fmt: skip
    items = load_benchmark(str(path))
    assert [(it.id, it.answer) for it in items] == [("60", "204"), ("61", "7")]  # an answer column wins
    _write(path, [{"id": 1, "problem": "Find x.", "solution": "x is 3"}])
    with pytest.raises(DataError, match=r"aime24.jsonl:1: missing field 'answer' .*'solution' has no \\boxed\{\} answer"):
        load_benchmark(str(path))


def test_a_mistyped_path_is_local_and_a_hub_id_is_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.benchmarks import is_local_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench").mkdir()
    for source in ("data/typo.json", "bench/math500", "mine.parquet", "./x", "~/b.jsonl"):
        assert is_local_source(source), source
    for source in ("HuggingFaceH4/MATH-500", "math-ai/aime24", "Idavidrein/gpqa:gpqa_diamond"):
        assert not is_local_source(source), source
    with pytest.raises(FileNotFoundError):
        load_benchmark("bench/math500")


def test_an_unreachable_hub_is_a_data_error_naming_the_id() -> None:
    """No network here; HF_HUB_OFFLINE makes `datasets` say so at once (its value is read at import)."""
    import os
    import subprocess
    import sys

    code = "from tasks.benchmarks import load_benchmark; load_benchmark('someone/no-such-set', revision='v2')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith(
        "longshort.io.DataError: benchmark someone/no-such-set: cannot load split 'test' at revision v2 from the hub: "
        "Couldn't reach 'someone/no-such-set' on the Hub"
    ), done.stderr[-2000:]


def test_benchmarks_need_distinct_names() -> None:
    from longshort.config import ConfigError, load_profile

    same = '[{source: a/test.jsonl}, {source: b/test.jsonl}]'
    with pytest.raises(ConfigError, match=r"benchmarks share the name\(s\) \['test'\]: give each a distinct `name`"):
        load_profile("smoke", [f"evaluate.benchmarks={same}"])
    clash = '[{source: a/heldout.jsonl}]'  # its name would be the held-out split's, whose rows it would mix with
    with pytest.raises(ConfigError, match="a benchmark is named 'heldout', the name of the run's held-out split"):
        load_profile("smoke", [f"evaluate.benchmarks={clash}"])
    named = '[{source: a/test.jsonl, name: a}, {source: b/test.jsonl, name: b}]'
    assert [b.name for b in load_profile("smoke", [f"evaluate.benchmarks={named}"]).evaluate.benchmarks] == ["a", "b"]
