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

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longshort.config import DataConfig, DemoTaskConfig, GenerationConfig, ModelConfig
from longshort.io import DataError, file_digest, iter_jsonl, require_str, write_jsonl
from models.protocol import (
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


def _md5(path: Path) -> str:
    h = hashlib.md5()  # noqa: S324 - DVC's content digest, not for security
    h.update(Path(path).read_bytes())
    return h.hexdigest()


def write_splits(out_dir: Path, train: list[dict], heldout: list[dict]) -> DatasetFiles:
    """Both splits or neither: when the second write fails (disk full), the first file is removed."""
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "train.jsonl", train)
    try:
        write_jsonl(out_dir / "heldout.jsonl", heldout)
    except BaseException:
        (out_dir / "train.jsonl").unlink(missing_ok=True)
        raise
    return DatasetFiles(
        train=str(out_dir / "train.jsonl"),
        heldout=str(out_dir / "heldout.jsonl"),
        train_md5=_md5(out_dir / "train.jsonl"),
        heldout_md5=_md5(out_dir / "heldout.jsonl"),
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

    ds = load_dataset(cfg.hub_id, split=cfg.split)
    return [(f"{cfg.hub_id}[{cfg.split}]", i + 1, dict(row)) for i, row in enumerate(ds)]


def load_problems(cfg: DataConfig, need_response: bool) -> list[dict[str, str]]:
    """Validated ``{id, problem, answer[, response]}`` rows; a bad row names its file and line.

    ``problem`` and ``response`` must be non-empty strings, ``answer`` a non-empty string or a
    finite number; a response must be in the protocol format once normalized (no stray tags inside its
    thinking). A source with no rows at all is an error too.
    """
    rows = []
    for source, lineno, row in _rows_from_source(cfg):
        problem = require_str(Path(source), lineno, row, "problem")
        answer = row.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool) and math.isfinite(answer):
            answer = str(answer)
        else:
            answer = require_str(Path(source), lineno, row, "answer")
        out = {"id": str(row.get("id", f"{Path(source).stem}-{lineno}")), "problem": problem, "answer": answer}
        if need_response:
            response = require_str(Path(source), lineno, row, "response")
            out["response"] = normalize_response(response, answer)
            try:
                parse_response(out["response"])
            except ProtocolError as exc:
                raise DataError(f"{source}:{lineno}: field 'response': {exc}") from None
        rows.append(out)
        if cfg.max_examples and len(rows) >= cfg.max_examples:
            break
    if not rows:
        raise DataError(f"{cfg.path or cfg.hub_id}: no problems (no non-blank rows)")
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
    rows: list[dict], teacher: str, gen_cfg: GenerationConfig, model_cfg: ModelConfig, max_new_tokens: int, seed: int
) -> list[dict]:
    """Answer each problem with a long-reasoning teacher; keep the correct traces."""
    from models.generation import make_backend  # noqa: PLC0415 - loads a model

    backend = make_backend(teacher, model_cfg, gen_cfg, seed=seed)
    prompts = [backend.chat_prompt(SYSTEM_PROMPTS["base"], r["problem"]) for r in rows]
    outs = backend.generate(prompts, max_new_tokens=max_new_tokens, stop=STOP_STRINGS["base"], seed=seed)
    kept = []
    for row, out in zip(rows, outs):
        response = normalize_response(out[0].text, row["answer"])
        _, final = parse_response(response)
        if is_correct(final.answer, row["answer"]):
            kept.append({**row, "response": response})
    log.info("teacher kept %d of %d traces (correct final answer)", len(kept), len(rows))
    return kept


def synthesize(
    cfg: DataConfig, out_dir: Path, gen_cfg: GenerationConfig, model_cfg: ModelConfig, seed: int = 0
) -> DatasetFiles:
    if cfg.source == "demo":
        return synthesize_demo(cfg.demo, out_dir)
    rows = load_problems(cfg, need_response=cfg.source == "traces")
    train, heldout = split_heldout(rows, cfg.heldout_fraction, seed)
    if cfg.source == "teacher":
        train = synthesize_with_teacher(train, cfg.teacher, gen_cfg, model_cfg, cfg.teacher_max_new_tokens, seed)
    return write_splits(out_dir, train, heldout)


def read_split(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a split written by this stage (hidden fields kept for evaluation)."""
    return [row for _, row in iter_jsonl(Path(path))]


def dataset_digest(files: DatasetFiles) -> str:
    return hashlib.sha256((file_digest(Path(files.train)) + file_digest(Path(files.heldout))).encode()).hexdigest()
