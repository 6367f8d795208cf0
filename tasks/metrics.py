"""Evaluation metrics: Mean@k, Pass@k, accuracy at token budgets, length statistics,
and bootstrap confidence intervals for accuracy and for each system against a reference.

Pure functions over evaluation records, one per sampled episode::

    {benchmark, system, problem_id, sample, correct: bool,
     tokens_long, tokens_short, turns, well_formed: bool}

An episode's cost is its long + short tokens (DESIGN §2). ``summarize`` gives one
JSON-able dict per (benchmark, system).

Uncertainty is over problems: a benchmark's problems are a sample, and the k episodes of one
problem are not independent draws of the benchmark, so the bootstrap resamples whole problems
(``tasks.intervals.bootstrap_interval``: scipy's ``stats.bootstrap``, percentile intervals, seeded). A system compared with a reference
(the long-CoT base) on the same problems is resampled in pairs, which is what decides whether,
say, "within 2 points of the base" holds beyond the noise of 300 problems.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tasks.intervals import CONFIDENCE, bootstrap_interval

log = logging.getLogger(__name__)

DEFAULT_BUDGETS = (2048, 4096, 8192, 16384, 32768)
RECORD_FIELDS = ("problem_id", "sample", "correct", "tokens_long", "tokens_short", "turns", "well_formed")


def mean_at_k(correct_matrix: Sequence[Sequence[bool]]) -> float:
    """Mean@k: the accuracy averaged over problems and their k samples.

    Mean@k = (1/P) Σ_p (1/k_p) Σ_i c_{p,i}, with c_{p,i} ∈ {0, 1} the correctness of
    sample i of problem p (rows may differ in length; each problem weighs the same).
    """
    if not correct_matrix:
        raise ValueError("mean_at_k needs at least one problem")
    per_problem = []
    for p, row in enumerate(correct_matrix):
        if not row:
            raise ValueError(f"problem {p} has no samples")
        per_problem.append(sum(bool(c) for c in row) / len(row))
    return math.fsum(per_problem) / len(per_problem)


def interval_text(
    value: float | None, interval: dict[str, float] | None, *, scale: float = 100.0, fmt: str = ".1f", unit: str = ""
) -> str:
    """``93.7 [90.9, 96.3]``: a value and its interval, each times ``scale`` and followed by ``unit``; "–" for no value."""
    if value is None:
        return "–"

    def num(x: float) -> str:
        return format(scale * x, fmt) + unit

    return num(value) if interval is None else f"{num(value)} [{num(interval['low'])}, {num(interval['high'])}]"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples with c correct (Chen et al. 2021, eq. 1).

    pass@k = 1 − C(n−c, k) / C(n, k), computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i)
    to avoid huge binomials; it is 1 when n − c < k.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def episode_tokens(record: Mapping[str, Any]) -> int:
    """An episode's cost: long-model tokens + short-model tokens."""
    return int(record["tokens_long"]) + int(record["tokens_short"])


def budget_accuracy(episodes: Iterable[Mapping[str, Any]], budgets: Sequence[int]) -> dict[int, float]:
    """Accuracy at each token budget B: the share of episodes that are correct AND cost ≤ B.

    acc(B) = (1/E) Σ_e correct_e · [tokens_long_e + tokens_short_e ≤ B]; an episode that
    runs past the budget counts as wrong, so acc(B) is non-decreasing in B.
    """
    eps = list(episodes)
    if not eps:
        raise ValueError("budget_accuracy needs at least one episode")
    costs = np.array([episode_tokens(e) for e in eps])
    correct = np.array([bool(e["correct"]) for e in eps])
    return {int(b): float(np.mean(correct & (costs <= b))) for b in budgets}


def _describe(values: np.ndarray) -> dict[str, float | int | None]:
    if values.size == 0:
        return {"n": 0, "mean": None, "median": None, "p90": None}
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),  # linear interpolation between order statistics
    }


def length_stats(tokens: Sequence[int], correct: Sequence[bool], n_bins: int = 20) -> dict[str, Any]:
    """Length distribution overall and conditioned on correctness.

    Returns ``{"all"|"correct"|"wrong": {n, mean, median, p90}, "histogram": {edges,
    correct, wrong}}``; the histograms share ``n_bins`` equal bins over [0, max tokens]
    so the two can be drawn on one axis. Statistics of an empty group are None.
    """
    if len(tokens) != len(correct):
        raise ValueError(f"tokens ({len(tokens)}) and correct ({len(correct)}) differ in length")
    if not tokens:
        raise ValueError("length_stats needs at least one episode")
    t = np.asarray(tokens, dtype=float)
    ok = np.asarray(correct, dtype=bool)
    edges = np.linspace(0.0, max(float(t.max()), 1.0), n_bins + 1)
    return {
        "all": _describe(t),
        "correct": _describe(t[ok]),
        "wrong": _describe(t[~ok]),
        "histogram": {
            "edges": edges.tolist(),
            "correct": np.histogram(t[ok], bins=edges)[0].tolist(),
            "wrong": np.histogram(t[~ok], bins=edges)[0].tolist(),
        },
    }


def _check_record(i: int, r: Mapping[str, Any]) -> None:
    missing = [f for f in ("benchmark", "system", *RECORD_FIELDS) if f not in r]
    if missing:
        raise ValueError(f"record {i}: missing field(s) {', '.join(missing)}")


def _by_problem(records: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """The records grouped by problem id, in the order the problems first appear."""
    by_problem: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        by_problem[str(r["problem_id"])].append(r)
    return by_problem


def _per_problem(records: Iterable[Mapping[str, Any]]) -> dict[str, tuple[float, float]]:
    """Each problem's accuracy over its samples and its mean episode tokens, by problem id."""
    return {
        pid: (float(np.mean([bool(s["correct"]) for s in samples])), float(np.mean([episode_tokens(s) for s in samples])))
        for pid, samples in _by_problem(records).items()
    }


def _interval(ci: tuple[float, float] | None) -> dict[str, float] | None:
    return None if ci is None else {"low": ci[0], "high": ci[1], "confidence": CONFIDENCE}


def compare_with_reference(
    records: Iterable[Mapping[str, Any]], reference: Iterable[Mapping[str, Any]], seed: int = 0
) -> dict[str, Any]:
    """A system against a reference on the problems both were run on, resampled in pairs.

    ``accuracy_diff`` = Mean@k − the reference's Mean@k (−0.05: five points lower) and
    ``token_ratio`` = mean tokens / the reference's mean tokens (0.3: 70% fewer), each with its
    bootstrap interval (None with fewer than two problems in common).
    """
    mine, theirs = _per_problem(records), _per_problem(reference)
    common = sorted(set(mine) & set(theirs))
    if not common:
        raise ValueError("compare_with_reference: the system and its reference share no problem")
    acc, ref_acc = [mine[p][0] for p in common], [theirs[p][0] for p in common]
    tok, ref_tok = [mine[p][1] for p in common], [theirs[p][1] for p in common]
    ref_mean_tokens = math.fsum(ref_tok) / len(common)
    return {
        "n_problems": len(common),
        "accuracy_diff": (math.fsum(acc) - math.fsum(ref_acc)) / len(common),
        "accuracy_diff_ci": _interval(bootstrap_interval(acc, reference=ref_acc, seed=seed)),
        "token_ratio": math.fsum(tok) / len(common) / ref_mean_tokens if ref_mean_tokens else None,
        "token_ratio_ci": _interval(bootstrap_interval(tok, reference=ref_tok, ratio=True, seed=seed))
        if ref_mean_tokens
        else None,
    }


def _summarize_group(
    records: list[Mapping[str, Any]], k: int, budgets: Sequence[int], seed: int = 0
) -> dict[str, Any]:
    by_problem = _by_problem(records)
    matrix, pass_k = [], []
    for pid, samples in by_problem.items():
        ids = [s["sample"] for s in samples]
        if len(set(ids)) != len(ids):
            raise ValueError(f"problem {pid!r}: duplicate sample indices {sorted(ids)}")
        n = len(samples)
        if n < k:
            raise ValueError(f"problem {pid!r} has {n} samples, fewer than k={k}")
        c = sum(bool(s["correct"]) for s in samples)
        matrix.append([bool(s["correct"]) for s in samples])
        pass_k.append(pass_at_k(n, c, k))
    tokens = [episode_tokens(r) for r in records]
    correct = [bool(r["correct"]) for r in records]
    turns = [int(r["turns"]) for r in records]
    return {
        "n_problems": len(by_problem),
        "min_samples": min(len(v) for v in by_problem.values()),  # samples per problem (the least)
        "n_episodes": len(records),
        "k": k,
        "mean_at_k": mean_at_k(matrix),
        "mean_at_k_ci": _interval(bootstrap_interval([sum(row) / len(row) for row in matrix], seed=seed)),
        "pass_at_k": math.fsum(pass_k) / len(pass_k),
        "mean_tokens": float(np.mean(tokens)),
        "mean_tokens_long": float(np.mean([int(r["tokens_long"]) for r in records])),
        "mean_tokens_short": float(np.mean([int(r["tokens_short"]) for r in records])),
        "well_formed": float(np.mean([bool(r["well_formed"]) for r in records])),
        "turns": {
            "mean": float(np.mean(turns)),
            "max": int(max(turns)),
            "counts": {str(t): n for t, n in sorted(Counter(turns).items())},
        },
        "budget_accuracy": [{"budget": b, "accuracy": a} for b, a in budget_accuracy(records, budgets).items()],
        "length": length_stats(tokens, correct),
        "problems_digest": hashlib.sha256("\n".join(sorted(by_problem)).encode()).hexdigest()[:16],
    }


def summarize(
    records: Iterable[Mapping[str, Any]],
    k: int,
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    *,
    reference: str | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One summary per (benchmark, system), sorted by benchmark then system.

    Each problem needs at least k samples: ``mean_at_k`` averages all of them, and
    ``pass_at_k`` is the unbiased estimator from each problem's n samples; both weigh
    each problem the same. The episode statistics (tokens, turns, well-formed share,
    accuracy at a budget, lengths of correct and wrong episodes) average over episodes,
    which is the same when every problem has the same number of samples, as the evaluate
    stage gives; records with unequal counts weigh a problem by its samples there. A
    warning is logged when systems of one benchmark were run on different problems.

    ``mean_at_k_ci`` is a bootstrap interval over problems (``bootstrap_interval``, seeded by
    ``seed``). With ``reference`` (a system's name), every other system of a benchmark the
    reference was run on gets ``vs_reference``: its accuracy difference and token ratio against
    it, with paired intervals (``compare_with_reference``).
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for i, r in enumerate(records):
        _check_record(i, r)
        groups[(str(r["benchmark"]), str(r["system"]))].append(r)
    if not groups:
        raise ValueError("summarize needs at least one record")
    if reference is not None and reference not in {system for _, system in groups}:
        raise ValueError(f"summarize: the reference system {reference!r} has no records")
    out = []
    for (benchmark, system), group in sorted(groups.items()):
        summary = {"benchmark": benchmark, "system": system, **_summarize_group(group, k, budgets, seed)}
        if reference is not None and system != reference and (benchmark, reference) in groups:
            summary["vs_reference"] = {
                "system": reference,
                **compare_with_reference(group, groups[(benchmark, reference)], seed),
            }
        out.append(summary)
    for benchmark in sorted({s["benchmark"] for s in out}):
        digests = {s["system"]: s["problems_digest"] for s in out if s["benchmark"] == benchmark}
        if len(set(digests.values())) > 1:
            log.warning("benchmark %s: systems were evaluated on different problems: %s", benchmark, digests)
    return out
