"""Evaluation figures and tables from a summary of seeded synthetic episodes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tasks.metrics import summarize
from tasks.plots import results_json, results_markdown, write_results

# (system, accuracy, mean long tokens, mean short tokens, turns): long CoT is accurate but costly
SYSTEMS = [("long-cot", 0.70, 9000, 0, 1), ("truncation", 0.62, 3500, 0, 1), ("long-short", 0.66, 2500, 900, 4)]


def _records(seed: int = 0) -> list[dict[str, object]]:
    rng = random.Random(seed)
    out = []
    for benchmark, n_problems in (("math500", 40), ("gpqa_diamond", 20)):
        for system, acc, long_mean, short_mean, turns in SYSTEMS:
            for p in range(n_problems):
                for s in range(4):
                    correct = rng.random() < acc
                    scale = 0.7 if correct else 1.6  # wrong episodes run longer, as in the papers
                    out.append({
                        "benchmark": benchmark, "system": system, "problem_id": f"{benchmark}-{p}", "sample": s,
                        "correct": correct, "tokens_long": int(rng.expovariate(1 / (long_mean * scale))),
                        "tokens_short": int(rng.expovariate(1 / short_mean)) if short_mean else 0,
                        "turns": rng.randint(1, turns), "well_formed": rng.random() < 0.97,
                    })  # fmt: skip
    return out


@pytest.fixture(scope="module")
def summary() -> list[dict[str, object]]:
    return summarize(_records(), k=4, budgets=[1024, 2048, 4096, 8192, 16384, 32768])


def test_write_results_writes_tables_and_non_empty_pngs(summary: list[dict], tmp_path: Path) -> None:
    paths = write_results(summary, tmp_path / "eval")
    figures = sorted(name for name in paths if name.endswith(".png"))
    assert figures == sorted(f"{b}_{kind}.png" for b in ("math500", "gpqa_diamond")
                             for kind in ("budget", "lengths", "pareto"))  # fmt: skip
    for name in figures:
        data = paths[name].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 10_000  # axes, text and data drawn, not a blank canvas
    assert json.loads(paths["results.json"].read_text()) == json.loads(results_json(summary))


def test_results_markdown_has_one_table_per_benchmark(summary: list[dict]) -> None:
    md = results_markdown(summary)
    assert md.count("### ") == 2 and "### math500 (40 problems)" in md
    header = next(line for line in md.splitlines() if line.startswith("| system"))
    assert header.split(" | ")[1:3] == ["Mean@4 [95% CI]", "Pass@4"]  # no reference system: no comparison columns
    assert "acc@1k" in header and "acc@32k" in header
    rows = [line for line in md.splitlines() if line.startswith("| long-short")]
    assert len(rows) == 2
    ls = next(s for s in summary if s["benchmark"] == "math500" and s["system"] == "long-short")
    ci = ls["mean_at_k_ci"]
    assert ci["low"] < ls["mean_at_k"] < ci["high"]
    assert rows[1].split(" | ")[1] == f"{100 * ls['mean_at_k']:.1f} [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"


def test_results_markdown_compares_with_the_reference_system() -> None:
    summary = summarize(_records(), k=4, budgets=[1024, 32768], reference="long-cot")
    md = results_markdown(summary)
    header = next(line for line in md.splitlines() if line.startswith("| system"))
    assert header.split(" | ")[1:4] == ["Mean@4 [95% CI]", "Δ Mean@4 vs long-cot [95% CI]", "tokens vs long-cot [95% CI]"]
    ls = next(s for s in summary if s["benchmark"] == "gpqa_diamond" and s["system"] == "long-short")
    vs = ls["vs_reference"]
    row = next(line for line in md.splitlines() if line.startswith("| long-short")).split(" | ")  # gpqa_diamond's
    d, r = vs["accuracy_diff_ci"], vs["token_ratio_ci"]
    assert row[2] == f"{100 * vs['accuracy_diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    assert row[3] == f"{100 * vs['token_ratio']:.1f}% [{100 * r['low']:.1f}%, {100 * r['high']:.1f}%]"
    base_row = next(line for line in md.splitlines() if line.startswith("| long-cot")).split(" | ")
    assert base_row[2:4] == ["–", "–"]  # the reference itself
    # a system run on only part of the reference's problems: its comparison says on how many
    partial = [r for r in _records() if r["system"] != "truncation" or r["problem_id"] not in ("math500-0", "math500-1")]
    md = results_markdown(summarize(partial, k=4, budgets=[1024], reference="long-cot"))
    row = next(line for line in md.splitlines() if line.startswith("| truncation") and "(n=" in line).split(" | ")
    assert row[2].endswith(" (n=38)") and row[3].endswith(" (n=38)")


def test_results_json_is_stable(summary: list[dict]) -> None:
    assert results_json(summary) == results_json(json.loads(results_json(summary)))


def test_figures_draw_the_summary_numbers(summary: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PNGs hold the summary's numbers (axes and labels alone make a large PNG): each system's budget curve,
    its correct/wrong length histogram and its Pareto point."""
    import tasks.plots as plots

    figs, real = {}, plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.setdefault(path.name, fig) and real(fig, path))
    plots.write_plots(summary, tmp_path)
    rows = {s["system"]: s for s in summary if s["benchmark"] == "math500"}
    assert len(rows) >= 2
    budget = {line.get_label(): line for line in figs["math500_budget.png"].axes[0].lines}
    for name, s in rows.items():
        assert list(budget[name].get_xdata()) == [p["budget"] for p in s["budget_accuracy"]]
        assert list(budget[name].get_ydata()) == pytest.approx([100 * p["accuracy"] for p in s["budget_accuracy"]])
    panels = {ax.get_title(): ax for ax in figs["math500_lengths.png"].axes if ax.get_visible()}
    for name, s in rows.items():
        correct, wrong = panels[name].containers  # two bar containers: correct, then wrong
        assert [b.get_height() for b in correct] == s["length"]["histogram"]["correct"]
        assert [b.get_height() for b in wrong] == s["length"]["histogram"]["wrong"]
    points = {c.get_label(): tuple(c.get_offsets()[0]) for c in figs["math500_pareto.png"].axes[0].collections}
    for name, s in rows.items():
        assert points[name] == pytest.approx((s["mean_tokens"], 100 * s["mean_at_k"]))
