"""Evaluate: every system on the same problems and seeds, one table, plots, and the importance AUROC.

Systems are the long-CoT base model alone (``kind: single``) and Long⊗Short
pairs (``kind: pair``), e.g. after SFT and after RL. Each is run on the demo
task's held-out split and on every configured benchmark (a jsonl path or a hub
id), k samples per problem; ``tasks.metrics`` summarises the records and
``tasks.plots`` draws them. On the demo, the Monte Carlo importance of the
held-out traces is compared with the teacher's hidden ``essential`` labels
(AUROC): the only place that reads those labels.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longshort.config import HELDOUT, EvaluateConfig, GenerationConfig, ModelConfig, ProtocolConfig
from longshort.io import write_jsonl
from models.generation import GenerationBackend, close_backend, make_backend, share_gpu_memory
from tasks.benchmarks import benchmark_name, load_benchmark
from tasks.evaluate import pair_records, single_model_records
from tasks.importance import auroc
from tasks.metrics import summarize
from tasks.plots import write_results
from tasks.synthesize import read_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Report:
    outputs: dict[str, str]
    metrics: dict[str, float]
    summary: list[dict[str, Any]]


def slug(name: str) -> str:
    """A metric-name-safe form of a system name: ``"Long⊗Short RL"`` -> ``"long_short_rl"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("⊗", "_")).strip("_")


def essential_labels(thoughts: list[str], teacher_thoughts: list[dict[str, Any]]) -> list[bool]:
    """A chunked thought is essential when it holds the text of an essential teacher thought."""
    essential = [t["text"] for t in teacher_thoughts if t.get("essential")]
    return [any(text in thought for text in essential) for thought in thoughts]


def importance_auroc(scored_rows: list[dict[str, Any]], split_rows: list[dict[str, Any]]) -> dict[str, float]:
    """AUROC of s_k against the demo teacher's hidden labels, over every thought of every scored trace."""
    teacher = {r["id"]: r.get("thoughts") for r in split_rows}
    scores: list[float] = []
    labels: list[bool] = []
    for row in scored_rows:
        hidden = teacher.get(row["id"])
        if not hidden:
            continue
        scores += row["importance"]
        labels += essential_labels(row["thoughts"], hidden)
    if not scores or all(labels) or not any(labels):
        return {}
    n_traces = sum(1 for r in scored_rows if teacher.get(r["id"]))
    return {"importance_auroc": auroc(scores, labels), "importance_auroc_traces": float(n_traces)}


def system_models(spec: dict[str, str]) -> list[str]:
    """The model folders a system runs: ``[model]`` for a single model, ``[long, short]`` for a pair."""
    return [spec["model"]] if spec["kind"] == "single" else [spec["long"], spec["short"]]


def _benchmarks(heldout_path: str, cfg: EvaluateConfig, seed: int) -> list[tuple[str, list[dict[str, Any]]]]:
    heldout = [{**r, "kind": "math"} for r in read_split(heldout_path)[: cfg.n_problems]]
    out = [(HELDOUT, heldout)]
    for bench in cfg.benchmarks:
        items = load_benchmark(
            bench.source, split=bench.split, seed=seed, limit=bench.limit, name=bench.name, revision=bench.revision
        )
        rows = [{"id": i.id, "problem": i.problem, "answer": i.answer, "kind": i.kind} for i in items]
        out.append((bench.name or benchmark_name(bench.source), rows))
    return out


def _interval_metrics(name: str, interval: dict[str, float] | None) -> dict[str, float]:
    """``name_ci_low`` and ``name_ci_high`` for MLflow; nothing when there is no interval."""
    return {} if interval is None else {f"{name}_ci_low": interval["low"], f"{name}_ci_high": interval["high"]}


def evaluate_systems(
    systems: dict[str, dict[str, str]],
    heldout_path: str,
    scored_heldout: str | None,
    model_cfg: ModelConfig,
    gen_cfg: GenerationConfig,
    protocol: ProtocolConfig,
    cfg: EvaluateConfig,
    out_dir: Path,
    seed: int = 0,
    reference: str | None = None,
) -> Report:
    """Run each system on each benchmark; write records, results.md/json and plots to ``out_dir``.

    One system at a time: its model(s) are loaded, run on every benchmark and released
    (``close_backend``) before the next system's are loaded, so at most the two engines of one pair
    hold GPU memory at once, each with half of ``gpu_memory_utilization`` (``share_gpu_memory``).
    A model the next system needs in the same way is kept. Records are written benchmark by
    benchmark, systems in the order given, whatever order they ran in.

    Accuracy gets a bootstrap interval over problems; with ``reference`` (one of ``systems``) every
    other system also gets its accuracy difference and token ratio against it, resampled in pairs
    (``tasks.metrics.summarize``).
    """
    benchmarks = _benchmarks(heldout_path, cfg, seed)
    by_run: dict[tuple[int, str], list[dict[str, Any]]] = {}  # (benchmark index, system) -> records
    held: dict[tuple[str, int], GenerationBackend] = {}  # (model folder, engines alive at once) -> backend
    try:
        for name, spec in systems.items():
            folders = list(dict.fromkeys(system_models(spec)))
            wanted = [(folder, len(folders)) for folder in folders]
            for key in [k for k in held if k not in wanted]:
                close_backend(held.pop(key))
            for key in wanted:
                if key not in held:
                    held[key] = make_backend(key[0], model_cfg, share_gpu_memory(gen_cfg, key[1]), seed)
            for b, (bench_name, rows) in enumerate(benchmarks):
                log.info("evaluate: %s on %s (%d problems, k=%d)", name, bench_name, len(rows), cfg.k)
                common = dict(benchmark=bench_name, system=name, k=cfg.k, temperature=cfg.temperature, seed=seed)
                if spec["kind"] == "single":
                    by_run[(b, name)] = single_model_records(
                        held[wanted[0]], rows, max_new_tokens=cfg.max_new_tokens, **common
                    )
                else:
                    long, short = (held[(spec[role], len(folders))] for role in ("long", "short"))
                    by_run[(b, name)], _ = pair_records(long, short, rows, protocol, **common)
    finally:
        for backend in held.values():
            close_backend(backend)
    records = [r for b in range(len(benchmarks)) for name in systems for r in by_run[(b, name)]]
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "records.jsonl", records)  # first: what was generated is kept if summarizing fails
    summary = summarize(records, k=cfg.k, budgets=cfg.budgets, reference=reference, seed=seed)
    outputs = {name: str(path) for name, path in write_results(summary, out_dir).items()}
    outputs["records"] = str(out_dir / "records.jsonl")
    metrics: dict[str, float] = {}
    for s in summary:
        prefix = f"{s['benchmark']}.{slug(s['system'])}"
        metrics[f"{prefix}.accuracy"] = s["mean_at_k"]
        metrics.update(_interval_metrics(f"{prefix}.accuracy", s["mean_at_k_ci"]))
        if "vs_reference" in s:
            vs = s["vs_reference"]
            metrics[f"{prefix}.accuracy_diff_vs_ref"] = vs["accuracy_diff"]
            metrics.update(_interval_metrics(f"{prefix}.accuracy_diff_vs_ref", vs["accuracy_diff_ci"]))
            if vs["token_ratio"] is not None:
                metrics[f"{prefix}.token_ratio_vs_ref"] = vs["token_ratio"]
                metrics.update(_interval_metrics(f"{prefix}.token_ratio_vs_ref", vs["token_ratio_ci"]))
        metrics[f"{prefix}.pass_at_k"] = s["pass_at_k"]
        metrics[f"{prefix}.mean_tokens"] = s["mean_tokens"]
        metrics[f"{prefix}.mean_tokens_long"] = s["mean_tokens_long"]
        metrics[f"{prefix}.mean_tokens_short"] = s["mean_tokens_short"]
        metrics[f"{prefix}.well_formed"] = s["well_formed"]
        metrics[f"{prefix}.turns"] = s["turns"]["mean"]
        for group in ("correct", "wrong"):
            mean = s["length"][group]["mean"] if s["length"].get(group) else None
            if mean is not None:
                metrics[f"{prefix}.mean_tokens_{group}"] = float(mean)
    if scored_heldout:
        metrics.update(importance_auroc(read_split(scored_heldout), read_split(heldout_path)))
    return Report(outputs, metrics, summary)
