"""Synthesize: long chain-of-thought traces for the training problems (DESIGN §3).

Three sources, one output format (``train.jsonl`` and ``heldout.jsonl`` with
``{id, problem, answer, response}`` rows, the response in protocol format):

* ``demo``: the built-in arithmetic task and its R1-style teacher (CPU profile);
* ``traces``: existing ``{problem, answer, response}`` rows from a jsonl path or hub id;
* ``teacher``: ``{problem, answer}`` rows answered by a long-reasoning teacher model
  (e.g. DeepSeek-R1-Distill-Qwen-7B) through the generation backend; only
  traces whose final answer is correct are kept.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longshort.config import DataConfig, DemoTaskConfig, GenerationConfig, ModelConfig
from longshort.io import (
    DataError,
    OutputError,
    dumps_jsonl,
    ensure_dir,
    fault_point,
    file_digest,
    iter_jsonl,
    require_str,
    write_temp,
)
from models.protocol import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    STOP_STRINGS,
    SYSTEM_PROMPTS,
    THINK_CLOSE,
    THINK_OPEN,
    ProtocolError,
    extract_boxed,
    format_response,
    parse_response,
)
from tasks.answers import is_correct
from tasks.demo import demo_rows

if TYPE_CHECKING:
    from models.generation import GenerationBackend

log = logging.getLogger(__name__)

PUBLIC_FIELDS = ("id", "problem", "answer", "response")


@dataclass(frozen=True)
class DatasetFiles:
    train: str
    heldout: str
    train_md5: str  # the digest DVC records for the file
    heldout_md5: str
    n_train: int
    n_heldout: int


def _backup(path: Path) -> Path | None:
    """A temporary copy (a hard link where possible) of an existing file, to put back if a later step fails."""
    if not path.is_file():
        return None
    # a name, not a file: os.link refuses a name that is taken
    link = Path(tempfile.mktemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))  # noqa: S306
    try:
        os.link(path, link)
        return link
    except OSError:  # no hard links here (or the name was taken): copy the bytes
        pass
    fd, copy = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        shutil.copyfile(path, copy)
    except BaseException:
        Path(copy).unlink(missing_ok=True)
        raise
    return Path(copy)


def write_splits(out_dir: Path, train: list[dict], heldout: list[dict]) -> DatasetFiles:
    """Both splits or neither: a failed write leaves the previous pair (or no pair) as it was.

    Both files are written to temporary files in ``out_dir`` first (a full disk fails here, before any
    rename), then renamed over ``train.jsonl`` and ``heldout.jsonl``; when the second rename fails (a folder
    in the way), the previous ``train.jsonl`` is put back (or the new one removed). Temporary files are
    removed on any error; a kill leaves only ``.NAME.*.tmp`` files, which the next run deletes.
    """
    out_dir = ensure_dir(Path(out_dir))
    train_path, heldout_path = out_dir / "train.jsonl", out_dir / "heldout.jsonl"
    for path in (train_path, heldout_path):
        if path.is_dir():  # found before anything is written or renamed
            raise OutputError(path, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))
    temps: list[Path] = []
    try:
        temps.append(write_temp(train_path, dumps_jsonl(train).encode("utf-8")))
        temps.append(write_temp(heldout_path, dumps_jsonl(heldout).encode("utf-8")))
        try:
            old_train = _backup(train_path)
        except OSError as exc:
            raise OutputError(train_path, exc) from exc
        if old_train is not None:
            temps.append(old_train)
        fault_point(f"write:{train_path.name}")
        try:
            os.replace(temps[0], train_path)
        except OSError as exc:
            raise OutputError(train_path, exc) from exc
        try:
            fault_point(f"write:{heldout_path.name}")
            os.replace(temps[1], heldout_path)
        except BaseException as exc:
            if old_train is not None:
                os.replace(old_train, train_path)
            else:
                train_path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise OutputError(heldout_path, exc) from exc
            raise
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return DatasetFiles(
        train=str(train_path),
        heldout=str(heldout_path),
        train_md5=file_digest(train_path, "md5"),
        heldout_md5=file_digest(heldout_path, "md5"),
        n_train=len(train),
        n_heldout=len(heldout),
    )


def synthesize_demo(cfg: DemoTaskConfig, out_dir: Path) -> DatasetFiles:
    """Write the demo task's train and held-out splits; a pure function of ``cfg``."""
    train, heldout = demo_rows(cfg)
    return write_splits(out_dir, train, heldout)


def normalize_response(response: str, answer: str) -> str:
    """Bring an R1-style response into the protocol format.

    ``<think>…</think> final text`` keeps its final text as the answer (a
    ``\\boxed{}`` is added if it has none); a response with no tags is all thinking.
    The final text's own ``<answer>`` at its start and ``</answer>`` at its end are
    dropped before it is wrapped again: a teacher that stopped at its end of sequence
    before ``</answer>``, or whose stop string was kept, still yields one answer turn.
    A ``</rethink>`` is left alone: it hands back to a long model, which the base
    protocol (one thinking, one answer) has no place for, so such a response stays
    unparseable and is rejected by the caller.
    """
    try:
        parse_response(response)
        return response
    except ProtocolError:
        pass
    body = response.strip()
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN) :]
    thinking, _, final = body.partition(THINK_CLOSE)
    final = final.strip()
    if final.startswith(ANSWER_OPEN):
        final = final[len(ANSWER_OPEN) :].lstrip()
    if final.endswith(ANSWER_CLOSE):
        final = final[: -len(ANSWER_CLOSE)].rstrip()
    if extract_boxed(final) is None:
        final = (final + "\n\n" if final else "") + f"The final answer is \\boxed{{{answer}}}."
    return format_response(thinking.strip(), final)


def _rows_from_source(cfg: DataConfig) -> list[tuple[str, int, dict[str, Any]]]:
    """``(source name, line, row)`` from a jsonl path or a hub dataset."""
    if cfg.path:
        path = Path(cfg.path)
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        return [(str(path), lineno, row) for lineno, row in iter_jsonl(path)]
    from datasets import load_dataset  # noqa: PLC0415 - hub access only when asked for

    try:
        ds = load_dataset(cfg.hub_id, split=cfg.split, revision=cfg.revision)
    except (ConnectionError, OSError, ValueError) as exc:  # offline, unknown id or split (DatasetNotFoundError)
        detail = " ".join(str(exc).split())[:300]
        at = f" at revision {cfg.revision}" if cfg.revision else ""
        raise DataError(f"data.hub_id {cfg.hub_id}: cannot load split '{cfg.split}'{at} from the hub: {detail}") from exc
    return [(f"{cfg.hub_id}[{cfg.split}]", i + 1, dict(row)) for i, row in enumerate(ds)]


def _int_str(value: Any) -> str | None:
    """An int (not a bool) or an integral float in decimal (``27.0`` -> ``"27"``, as ``tasks.benchmarks``), else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


def _answer(source: str, lineno: int, row: dict[str, Any]) -> str:
    """A non-empty string as it is, an integer (or integral float) in decimal, another finite float as ``str``."""
    answer = row.get("answer")
    as_int = _int_str(answer)
    if as_int is not None:
        return as_int
    if isinstance(answer, float) and math.isfinite(answer):
        return str(answer)
    return require_str(Path(source), lineno, row, "answer")


def _id(source: str, lineno: int, row: dict[str, Any]) -> str:
    """The row's ``id`` (a non-empty string, stripped, or an integer, as ``tasks.benchmarks`` reads ids), or
    ``<file stem>-<line>`` when the row has none."""
    if "id" not in row:
        return f"{Path(source).stem}-{lineno}"
    value = row["id"]
    as_int = _int_str(value)
    if as_int is not None:
        return as_int
    if isinstance(value, str):
        return require_str(Path(source), lineno, row, "id").strip()
    raise DataError(
        f"{source}:{lineno}: field 'id' must be a string or an integer, got {type(value).__name__} {value!r}"
    )


def trace_answer(response: str) -> str | None:
    """The final answer a trace gives itself: the last ``\\boxed{}`` after its ``</think>``, or, in a trace
    written without tags (as R1 distillations are often stored), the last one in the whole text.

    None when it has none: cut off inside ``<think>`` (opened, never closed), or no box where the answer goes.
    """
    head, close, final = response.partition(THINK_CLOSE)
    if close:
        return extract_boxed(final)
    return None if THINK_OPEN in head else extract_boxed(response)


def _lines(numbers: list[int], first: int = 5) -> str:
    """``3, 7, 9`` or ``3, 7, 9, 12, 20, … (14 in all)``."""
    shown = ", ".join(str(n) for n in numbers[:first])
    return shown + (f", … ({len(numbers)} in all)" if len(numbers) > first else "")


def load_problems(cfg: DataConfig, need_response: bool) -> list[dict[str, str]]:
    """Validated ``{id, problem, answer[, response]}`` rows; a bad row names its file and line.

    ``problem`` and ``response`` must be non-empty strings, ``answer`` a non-empty string or a finite number
    (an integral one in decimal: ``27.0`` -> ``"27"``), ``id`` (optional; ``<file stem>-<line>`` when absent)
    a non-empty string or an integer, unique in the source. A response must be in the protocol format once
    normalized (no stray tags inside its thinking) with a non-empty thinking section. A trace whose own final
    ``\\boxed{}`` answer is missing (cut off) or differs from ``answer`` is dropped with a warning, as the
    teacher source drops wrong traces; a source with no rows at all, or none left, is an error.
    """
    rows = []
    seen: dict[str, int] = {}  # id -> first line
    dropped: list[int] = []
    name = cfg.path or f"{cfg.hub_id}[{cfg.split}]"
    for source, lineno, row in _rows_from_source(cfg):
        problem = require_str(Path(source), lineno, row, "problem")
        answer = _answer(source, lineno, row)
        row_id = _id(source, lineno, row)
        if row_id in seen:
            raise DataError(f"{source}:{lineno}: duplicate id {row_id!r} (first at line {seen[row_id]})")
        seen[row_id] = lineno
        out = {"id": row_id, "problem": problem, "answer": answer}
        if need_response:
            response = require_str(Path(source), lineno, row, "response")
            out["response"] = normalize_response(response, answer)
            try:
                thinking, _ = parse_response(out["response"])
            except ProtocolError as exc:
                raise DataError(f"{source}:{lineno}: field 'response': {exc}") from None
            if not thinking.strip():
                raise DataError(f"{source}:{lineno}: field 'response' has an empty thinking section")
            if not is_correct(trace_answer(response), answer):
                dropped.append(lineno)
                continue
        rows.append(out)
        if cfg.max_examples and len(rows) >= cfg.max_examples:
            break
    if dropped and not rows:
        raise DataError(
            f"{name}: no traces left: all {len(dropped)} have a final \\boxed{{}} answer that is missing "
            f"or differs from 'answer' (lines {_lines(dropped)})"
        )
    if not rows:
        raise DataError(f"{cfg.path or cfg.hub_id}: no problems (no non-blank rows)")
    if dropped:
        log.warning(
            "%s: dropped %d of %d traces whose final \\boxed{} answer is missing or differs from 'answer' (lines %s)",
            name,
            len(dropped),
            len(dropped) + len(rows),
            _lines(dropped),
        )
    return rows


def split_heldout(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A deterministic split by a hash of each problem, so duplicates land together."""

    def bucket(row: dict) -> float:
        h = hashlib.sha256(f"{seed}:{row['problem']}".encode()).hexdigest()
        return int(h[:8], 16) / 0xFFFFFFFF

    train = [r for r in rows if bucket(r) >= fraction]
    heldout = [r for r in rows if bucket(r) < fraction]
    return train, heldout


def synthesize_with_teacher(
    rows: list[dict], cfg: DataConfig, gen_cfg: GenerationConfig, model_cfg: ModelConfig, seed: int,
    backend: GenerationBackend | None = None,
) -> list[dict]:
    """Answer each problem with the long-reasoning teacher ``cfg.teacher`` (or ``backend``); keep the correct
    traces. The teacher samples at ``cfg.teacher_temperature`` and ``cfg.teacher_top_p``."""
    from models.generation import close_backend, make_backend  # noqa: PLC0415 - loads a model

    own = backend is None  # the teacher this call loads, it also closes (a vLLM engine holds most of the GPU)
    if backend is None:
        backend = make_backend(cfg.teacher, model_cfg, gen_cfg, seed=seed, revision=cfg.teacher_revision)
    try:
        prompts = [backend.chat_prompt(SYSTEM_PROMPTS["base"], r["problem"]) for r in rows]
        outs = backend.generate(
            prompts, max_new_tokens=cfg.teacher_max_new_tokens, stop=STOP_STRINGS["base"], seed=seed,
            temperature=cfg.teacher_temperature, top_p=cfg.teacher_top_p,
        )  # fmt: skip
    finally:
        if own:
            close_backend(backend)
    kept, unthought = [], 0
    for row, out in zip(rows, outs, strict=True):
        text = out[0].text
        if not is_correct(trace_answer(text), row["answer"]):  # its own answer: a cut-off trace has none
            continue
        response = normalize_response(text, row["answer"])
        try:
            thinking, _ = parse_response(response)
        except ProtocolError:
            continue
        if not thinking.strip():  # R1 models sometimes close </think> at once: no thought to score or keep
            unthought += 1
            continue
        kept.append({**row, "response": response})
    log.info("teacher kept %d of %d traces (correct final answer, non-empty thinking; %d had no thinking)",
             len(kept), len(rows), unthought)  # fmt: skip
    return kept


def synthesize(
    cfg: DataConfig, out_dir: Path, gen_cfg: GenerationConfig, model_cfg: ModelConfig, seed: int = 0
) -> DatasetFiles:
    if cfg.source == "demo":
        return synthesize_demo(cfg.demo, out_dir)
    rows = load_problems(cfg, need_response=cfg.source == "traces")
    train, heldout = split_heldout(rows, cfg.heldout_fraction, seed)
    name = cfg.path or cfg.hub_id
    if not train:
        raise DataError(f"{name}: all {len(rows)} problems fell in the held-out split (data.heldout_fraction "
                        f"{cfg.heldout_fraction}); nothing is left to train on")  # fmt: skip
    if cfg.source == "teacher":
        asked = len(train)
        train = synthesize_with_teacher(train, cfg, gen_cfg, model_cfg, seed)
        if not train:
            raise DataError(
                f"data.teacher {cfg.teacher}: none of its {asked} traces for {name} ended with the right boxed answer "
                f"within data.teacher_max_new_tokens={cfg.teacher_max_new_tokens}; nothing is left to train on"
            )
    return write_splits(out_dir, train, heldout)


def read_split(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a split written by this stage (hidden fields kept for evaluation)."""
    return [row for _, row in iter_jsonl(Path(path))]


def dataset_digest(files: DatasetFiles) -> str:
    return hashlib.sha256((file_digest(Path(files.train)) + file_digest(Path(files.heldout))).encode()).hexdigest()
