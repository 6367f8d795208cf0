"""Evaluation benchmarks from a jsonl path or a hub dataset id, in one schema.

Every item has ``id``, ``problem``, ``answer`` (a string), ``kind`` (``math`` or
``choice``) and ``extras`` (the other fields of the source row). Known names —
math500, aime24, aime25, amc23, gpqa_diamond — are recognised from the file stem
or the hub id (or given as ``name=``). GPQA is multiple choice: the options are
shuffled again for every seed, deterministically from the seed and the row id,
the problem text is rebuilt as the question, a blank line, ``A) … D)`` and an
instruction to box the option's letter (``GPQA_INSTRUCTION``: the checker,
``tasks.answers.choice_letter``, accepts only a letter), and ``answer`` is the
letter of the correct option (the simple-evals convention).

Paths and hub ids come from the config or the command line, never from a fixed
location.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longshort.io import DataError, iter_jsonl, require_str
from models.protocol import extract_boxed
from tasks.answers import CHOICE_LETTERS, AnswerKind

log = logging.getLogger(__name__)

KNOWN_BENCHMARKS: dict[str, AnswerKind] = {
    "math500": "math",
    "aime24": "math",
    "aime25": "math",
    "amc23": "math",
    "gpqa_diamond": "choice",
}

DEFAULT_SPLIT = "test"  # load_benchmark's split when none is given (as BenchmarkSource.split)

# hub repository (lower case) -> (default config, split). The split replaces the default "test" where the
# dataset has only that one split; a split the caller names other than "test" is kept.
HUB_REPOS: dict[str, tuple[str | None, str | None]] = {
    "huggingfaceh4/math-500": (None, None),
    "huggingfaceh4/aime_2024": (None, "train"),
    "maxwell-jia/aime_2024": (None, "train"),
    "math-ai/aime24": (None, None),
    "math-ai/aime25": (None, None),
    "yentinglin/aime_2025": (None, "train"),
    "math-ai/amc23": (None, None),
    "idavidrein/gpqa": ("gpqa_diamond", "train"),
}

# (hub repository, config) (lower case; config None for a repository without configs) -> benchmark name
HUB_NAMES: dict[tuple[str, str | None], str] = {
    ("huggingfaceh4/math-500", None): "math500",
    ("huggingfaceh4/aime_2024", None): "aime24",
    ("maxwell-jia/aime_2024", None): "aime24",
    ("math-ai/aime24", None): "aime24",
    ("math-ai/aime25", None): "aime25",
    ("yentinglin/aime_2025", None): "aime25",
    ("math-ai/amc23", None): "amc23",
    ("idavidrein/gpqa", "gpqa_diamond"): "gpqa_diamond",
}

GPQA_INSTRUCTION = "Answer with the letter of the correct option (A, B, C or D) inside \\boxed{}."

# first field present wins; covers our jsonl files and the common hub layouts
ID_FIELDS = ("id", "unique_id", "ID", "Record ID", "idx")
PROBLEM_FIELDS = ("problem", "question", "Problem", "Question")
ANSWER_FIELDS = ("answer", "Answer", "correct_answer")
GPQA_INCORRECT = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
# a row with none of ANSWER_FIELDS takes its answer from the last \boxed{} of its worked solution: math-ai/aime24
# has only id, problem, solution and url
SOLUTION_FIELD = "solution"


@dataclass(frozen=True)
class BenchmarkItem:
    id: str
    problem: str
    answer: str
    kind: AnswerKind
    extras: dict[str, Any] = field(default_factory=dict)


def _hub_parts(dataset_id: str) -> tuple[str, str | None]:
    """``owner/name[:config]`` -> (repository, config as written or the repository's default; None if neither)."""
    repo, _, config = dataset_id.partition(":")
    repo = repo.strip()
    default = HUB_REPOS.get(repo.lower(), (None, None))[0]
    return repo, (config.strip() or default)


def benchmark_name(source: str) -> str:
    """The conventional name of a source.

    A local path: its file stem, or its folder's name (a trailing slash ignored). A hub id: the known name of
    its (repository, config), else the repository's tail, with the config appended unless it already starts
    with that tail (``idavidrein/gpqa:gpqa_main`` -> ``gpqa_main``, ``owner/math:algebra`` -> ``math_algebra``).
    """
    if is_local_source(source):
        path = Path(source).expanduser()
        name = path.stem if path.suffix.lower() in FILE_SUFFIXES else path.name
        return name or path.resolve().name  # "." and the like
    repo, config = _hub_parts(source)
    repo, config = repo.lower(), config.lower() if config else None
    known = HUB_NAMES.get((repo, config))
    if known:
        return known
    tail = repo.rsplit("/", 1)[-1]
    if not config:
        return tail
    return config if config.startswith(tail) else f"{tail}_{config}"


FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")


def is_local_source(source: str) -> bool:
    """A path (as opposed to a hub dataset id ``owner/name[:config]``): it exists, starts like a path, names a
    data file, or starts with a folder that exists here. So a mistyped path is reported missing at once
    instead of being looked up on the hub."""
    path = Path(source).expanduser()
    return (
        path.exists()
        or source.startswith((".", "/", "~"))
        or path.suffix.lower() in FILE_SUFFIXES
        or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())
    )


@dataclass(frozen=True)
class _Source:
    """Where a row came from: a file and line (errors go through ``require_str``) or a hub row."""

    where: str
    path: Path | None = None
    lineno: int = 0


def _field(src: _Source, row: Mapping[str, Any], fields: tuple[str, ...]) -> str:
    """The first of ``fields`` present in the row (a DataError naming the first when none is)."""
    for f in fields:
        if f in row:
            return f
    also = f" (also looked for {', '.join(fields[1:])})" if len(fields) > 1 else ""
    raise DataError(f"{src.where}: missing field '{fields[0]}'{also}")


def _string(src: _Source, row: Mapping[str, Any], field: str) -> str:
    """``row[field]`` as a non-empty string, or a DataError naming file:line and the field."""
    if src.path is not None:
        return require_str(src.path, src.lineno, row, field)
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{src.where}: field '{field}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{src.where}: field '{field}' is empty")
    return value


def _answer_str(src: _Source, row: Mapping[str, Any], name: str) -> str:
    """A reference answer as a string: strings as they are, ints (and integral floats) in decimal."""
    value = row[name]
    if isinstance(value, str):
        return _string(src, row, name).strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # hub copies of AMC23 store 27.0
    raise DataError(f"{src.where}: field '{name}' must be a string or an integer, got {type(value).__name__} {value!r}")


def _boxed_solution(src: _Source, row: Mapping[str, Any]) -> str:
    """The reference answer of a row that has only a worked ``solution``: its last ``\\boxed{}``."""
    answer = extract_boxed(_string(src, row, SOLUTION_FIELD))
    if not answer:
        raise DataError(
            f"{src.where}: missing field '{ANSWER_FIELDS[0]}' (also looked for {', '.join(ANSWER_FIELDS[1:])}), "
            f"and its '{SOLUTION_FIELD}' has no \\boxed{{}} answer"
        )
    return answer


def gpqa_permutation(seed: int, item_id: str) -> list[int]:
    """The option order for one GPQA row: a permutation of [correct, wrong 1, wrong 2, wrong 3].

    ``order[i]`` is the index (0 = correct) of the option shown at letter i. It depends
    only on the seed and the row id (sha256), so it is the same in every process and
    independent of file order and ``limit``.
    """
    digest = hashlib.sha256(f"gpqa\0{seed}\0{item_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).sample(range(4), 4)


def _gpqa_options(where: str, row: Mapping[str, Any]) -> list[str]:
    """[correct, wrong 1, wrong 2, wrong 3] from our jsonl (choices + correct_answer) or the hub CSV columns."""
    if "choices" in row:
        choices = row["choices"]
        if not isinstance(choices, dict) or sorted(choices) != list(CHOICE_LETTERS):
            raise DataError(f"{where}: field 'choices' must be an object with keys A, B, C, D")
        texts = [choices[k] for k in CHOICE_LETTERS]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise DataError(f"{where}: field 'choices' must hold four non-empty strings")
        correct = row.get("correct_answer")
        if not isinstance(correct, str):
            raise DataError(f"{where}: field 'correct_answer' must be a string, got {type(correct).__name__}")
        hits = [i for i, t in enumerate(texts) if t.strip() == correct.strip()]
        if len(hits) != 1:
            raise DataError(f"{where}: field 'correct_answer' matches {len(hits)} of the choices, expected exactly 1")
        return [texts[hits[0]]] + [t for i, t in enumerate(texts) if i != hits[0]]
    options = []
    for f in ("Correct Answer",) + GPQA_INCORRECT:
        value = row.get(f)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field '{f}' must be a non-empty string")
        options.append(value.strip())
    return options


def _gpqa_item(where: str, item_id: str, question: str, row: Mapping[str, Any], seed: int) -> BenchmarkItem:
    options = _gpqa_options(where, row)
    order = gpqa_permutation(seed, item_id)
    choices = {letter: options[j] for letter, j in zip(CHOICE_LETTERS, order, strict=True)}
    letter = CHOICE_LETTERS[order.index(0)]
    options_text = "\n".join(f"{k}) {v}" for k, v in choices.items())
    problem = f"{question.strip()}\n\n{options_text}\n\n{GPQA_INSTRUCTION}"
    extras = {k: v for k, v in row.items() if k not in ("id", "problem", "answer", "choices", "permutation")}
    extras.update(question=question.strip(), choices=choices, correct_answer=options[0], permutation=order)
    return BenchmarkItem(item_id, problem, letter, "choice", extras)


def _item(src: _Source, index: int, row: Mapping[str, Any], name: str, kind: AnswerKind, seed: int) -> BenchmarkItem:
    id_field = next((f for f in ID_FIELDS if f in row), None)
    item_id = _answer_str(src, row, id_field) if id_field else f"{name}-{index}"
    if kind == "choice":
        question = _string(src, row, _field(src, row, ("question", "Question")))
        return _gpqa_item(src.where, item_id, question, row, seed)
    problem_field = _field(src, row, PROBLEM_FIELDS)
    problem = _string(src, row, problem_field)
    if not any(f in row for f in ANSWER_FIELDS) and SOLUTION_FIELD in row:
        answer_field = SOLUTION_FIELD
        answer = _boxed_solution(src, row)
    else:
        answer_field = _field(src, row, ANSWER_FIELDS)
        answer = _answer_str(src, row, answer_field)
    extras = {k: v for k, v in row.items() if k not in (id_field, problem_field, answer_field)}
    return BenchmarkItem(item_id, problem, answer, "math", extras)


def _kind_of(name: str, first_row: Mapping[str, Any]) -> AnswerKind:
    if name in KNOWN_BENCHMARKS:
        return KNOWN_BENCHMARKS[name]
    if "choices" in first_row or "Correct Answer" in first_row:
        return "choice"
    return "math"


def _rows_from_path(path: Path, split: str) -> Iterable[tuple[_Source, Mapping[str, Any]]]:
    if path.is_dir():
        path = path / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    for lineno, row in iter_jsonl(path):
        yield _Source(f"{path}:{lineno}", path, lineno), row


def hub_load_args(dataset_id: str, split: str) -> tuple[str, str | None, str]:
    """(repository, config, split) to read ``owner/name[:config]`` with: the config as written, else the known
    repository's default; the split as asked, except that the default ``"test"`` becomes the only split of a
    known repository that has no test split (GPQA and some AIME copies: ``train``). A split other than
    ``"test"`` is always kept. (``"test"`` named explicitly cannot be told from the default here, and on such a
    repository would only fail to load.)"""
    repo, config = _hub_parts(dataset_id)
    only_split = HUB_REPOS.get(repo.lower(), (None, None))[1]
    return repo, config, (only_split if only_split and split == DEFAULT_SPLIT else split)


def _rows_from_hub(dataset_id: str, split: str, revision: str | None = None) -> Iterable[tuple[_Source, Mapping[str, Any]]]:
    import datasets  # lazy: heavy, and only needed for hub sources

    repo, config, split = hub_load_args(dataset_id, split)
    at = f" at revision {revision}" if revision else ""
    log.info("loading %s (config %s, split %s)%s from the hub", repo, config or "default", split, at)
    try:
        ds = datasets.load_dataset(repo, config or None, split=split, revision=revision)
    except (ConnectionError, OSError, ValueError) as exc:  # offline, unknown id or split (DatasetNotFoundError)
        detail = " ".join(str(exc).split())[:300]
        raise DataError(f"benchmark {dataset_id}: cannot load split '{split}'{at} from the hub: {detail}") from exc
    for i, row in enumerate(ds):
        yield _Source(f"{dataset_id}[{split}] row {i}"), row


def load_benchmark(
    source: str,
    *,
    split: str = DEFAULT_SPLIT,
    seed: int = 0,
    limit: int | None = None,
    name: str | None = None,
    revision: str | None = None,
) -> list[BenchmarkItem]:
    """Load a benchmark from a jsonl path (or a folder holding ``<split>.jsonl``) or a hub id.

    A hub id may name a config as ``owner/name:config`` and is read at ``revision`` (a commit, tag or
    branch; the default branch when None; ignored for a path). ``seed`` only changes the
    GPQA option order; ``limit`` keeps the first items in file order. Malformed rows
    raise ``longshort.io.DataError`` naming the file:line (or hub row) and the field.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    name = name or benchmark_name(source)
    if is_local_source(source):
        rows = _rows_from_path(Path(source).expanduser(), split)
    else:
        rows = _rows_from_hub(source, split, revision)
    items: list[BenchmarkItem] = []
    seen: dict[str, str] = {}
    kind: AnswerKind | None = None
    for index, (src, row) in enumerate(rows):
        if kind is None:
            kind = _kind_of(name, row)
        item = _item(src, index, row, name, kind, seed)
        if item.id in seen:
            raise DataError(f"{src.where}: duplicate id {item.id!r} (first at {seen[item.id]})")
        seen[item.id] = src.where
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise DataError(f"{source}: no benchmark rows")
    return items
