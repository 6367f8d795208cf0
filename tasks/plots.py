"""Evaluation figures (PNG, matplotlib Agg) and the results table (Markdown, JSON).

Input is ``tasks.metrics.summarize``'s output: one dict per (benchmark, system).
Per benchmark: accuracy vs token budget (log-2 x axis), correct/wrong length
histograms per system, and accuracy vs mean tokens (Pareto scatter).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator  # noqa: E402

from longshort.io import atomic_write_bytes, atomic_write_text  # noqa: E402
from tasks.metrics import interval_text  # noqa: E402

Summary = Sequence[dict[str, Any]]
DPI = 120


def _by_benchmark(summary: Summary) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in summary:
        out.setdefault(s["benchmark"], []).append(s)
    return out


def _colors(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One colour per system, by sorted name, so a system looks the same in every figure."""
    cmap = plt.get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(sorted({s["system"] for s in rows}))}


def _tokens_label(n: float) -> str:
    return f"{n / 1024:g}k" if n >= 1024 else f"{n:g}"


def _save(fig: plt.Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_budget_accuracy(rows: list[dict[str, Any]], benchmark: str, path: Path) -> Path:
    """Accuracy (%) at each token budget, one line per system; x on a log-2 scale."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    budgets: set[int] = set()
    colors = _colors(rows)
    for s in rows:
        xs = [p["budget"] for p in s["budget_accuracy"]]
        ys = [100 * p["accuracy"] for p in s["budget_accuracy"]]
        budgets.update(xs)
        ax.plot(xs, ys, marker="o", color=colors[s["system"]], label=s["system"])
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(budgets)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _tokens_label(x)))
    ax.set_ylim(0, 100)
    ax.set_xlabel("token budget (long + short tokens per episode)")
    ax.set_ylabel("accuracy within budget (%)")
    ax.set_title(f"{benchmark}: accuracy vs token budget")
    ax.grid(True, alpha=0.3)
    ax.legend(title="system")
    return _save(fig, path)


def plot_length_histograms(rows: list[dict[str, Any]], benchmark: str, path: Path) -> Path:
    """Episode length histograms of correct vs wrong episodes, one panel per system."""
    n = len(rows)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    for ax, s in zip(axes.flat, rows, strict=False):  # the grid may have a spare axis
        hist = s["length"]["histogram"]
        edges = hist["edges"]
        widths = [b - a for a, b in pairwise(edges)]
        ax.bar(edges[:-1], hist["correct"], width=widths, align="edge", alpha=0.6, color="tab:green",
               label=f"correct (n={s['length']['correct']['n']})")
        ax.bar(edges[:-1], hist["wrong"], width=widths, align="edge", alpha=0.6, color="tab:red",
               label=f"wrong (n={s['length']['wrong']['n']})")
        ax.set_title(s["system"])
        ax.set_xlabel("episode length (tokens)")
        ax.set_ylabel("episodes")
        ax.legend(fontsize="small")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{benchmark}: length of correct vs wrong episodes")
    fig.tight_layout()
    return _save(fig, path)


def plot_pareto(rows: list[dict[str, Any]], benchmark: str, path: Path) -> Path:
    """Mean@k accuracy (%) vs mean tokens per episode; each point labelled by its system."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    pts = sorted((s["mean_tokens"], 100 * s["mean_at_k"], s["system"]) for s in rows)
    colors = _colors(rows)
    for x, y, name in sorted(pts, key=lambda p: p[2]):
        ax.scatter([x], [y], s=50, color=colors[name], label=name, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize="small")
    # frontier: points that no cheaper point beats on accuracy
    frontier, best = [], -1.0
    for x, y, _ in pts:
        if y > best:
            frontier.append((x, y))
            best = y
    if len(frontier) > 1:
        ax.plot(*zip(*frontier, strict=True), linestyle="--", color="gray", alpha=0.7, label="Pareto frontier")
    k = rows[0]["k"]
    ax.set_xlabel("mean tokens per episode (long + short)")
    ax.set_ylabel(f"Mean@{k} accuracy (%)")
    ax.set_title(f"{benchmark}: accuracy vs cost")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0, right=max(x for x, _, _ in pts) * 1.25 or 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def write_plots(summary: Summary, out_dir: Path) -> list[Path]:
    """All three figures for every benchmark: ``<out_dir>/<benchmark>_{budget,lengths,pareto}.png``."""
    out_dir = Path(out_dir)
    paths = []
    for benchmark, rows in _by_benchmark(summary).items():
        paths.append(plot_budget_accuracy(rows, benchmark, out_dir / f"{benchmark}_budget.png"))
        paths.append(plot_length_histograms(rows, benchmark, out_dir / f"{benchmark}_lengths.png"))
        paths.append(plot_pareto(rows, benchmark, out_dir / f"{benchmark}_pareto.png"))
    return paths


def _mean_cell(s: dict[str, Any], group: str) -> str:
    mean = s["length"][group]["mean"]
    return "–" if mean is None else f"{mean:.0f}"


def results_markdown(summary: Summary) -> str:
    """One Markdown table per benchmark: accuracy with its 95% interval, the difference and token ratio
    against the reference system (the long-CoT base) when there is one, cost and accuracy at each budget."""
    parts = []
    for benchmark, rows in _by_benchmark(summary).items():
        k = rows[0]["k"]
        budgets = [p["budget"] for p in rows[0]["budget_accuracy"]]
        reference = next((s["vs_reference"]["system"] for s in rows if "vs_reference" in s), None)
        ref_n = next((s["n_problems"] for s in rows if s["system"] == reference), None)
        head = ["system", f"Mean@{k} [95% CI]"]
        if reference:
            head += [f"Δ Mean@{k} vs {reference} [95% CI]", f"tokens vs {reference} [95% CI]"]
        head += [f"Pass@{k}", "mean tokens", "tokens (correct / wrong)", "turns", "well-formed"]
        head += [f"acc@{_tokens_label(b)}" for b in budgets]
        lines = [f"### {benchmark} ({rows[0]['n_problems']} problems)", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in rows:
            cells = [s["system"], interval_text(s["mean_at_k"], s.get("mean_at_k_ci"))]
            if reference:
                vs = s.get("vs_reference")
                # on fewer problems than the two rows' own (run on partly different problems): say on how many
                whole = vs is None or vs["n_problems"] == s["n_problems"] == ref_n
                n = "" if whole else f" (n={vs['n_problems']})"
                cells += [
                    interval_text(vs["accuracy_diff"], vs["accuracy_diff_ci"], fmt="+.1f") + n if vs else "–",
                    interval_text(vs["token_ratio"], vs["token_ratio_ci"], fmt=".1f", unit="%") + n if vs else "–",
                ]
            cells += [
                f"{100 * s['pass_at_k']:.1f}",
                f"{s['mean_tokens']:.0f}",
                f"{_mean_cell(s, 'correct')} / {_mean_cell(s, 'wrong')}",
                f"{s['turns']['mean']:.2f}",
                f"{100 * s['well_formed']:.0f}%",
            ]
            accs = {p["budget"]: p["accuracy"] for p in s["budget_accuracy"]}
            cells += [f"{100 * accs[b]:.1f}" if b in accs else "–" for b in budgets]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def results_json(summary: Summary) -> str:
    """The summary as stable, indented JSON."""
    return json.dumps(list(summary), indent=2, sort_keys=True) + "\n"


def write_results(summary: Summary, out_dir: Path) -> dict[str, Path]:
    """``results.md``, ``results.json`` and the figures under ``out_dir``; returns name -> path."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "results.md", results_markdown(summary))
    atomic_write_text(out_dir / "results.json", results_json(summary))
    paths = {"results.md": out_dir / "results.md", "results.json": out_dir / "results.json"}
    paths.update({p.name: p for p in write_plots(summary, out_dir)})
    return paths
