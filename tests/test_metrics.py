"""Evaluation metrics: known values, pass@k vs mean@k, budget monotonicity, summaries."""

from __future__ import annotations

import json
import logging
import math
import random
from itertools import combinations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.intervals import bootstrap_interval
from tasks.metrics import (
    budget_accuracy,
    compare_with_reference,
    length_stats,
    mean_at_k,
    pass_at_k,
    summarize,
)


def _record(pid: str, sample: int, correct: bool, long: int, short: int, *, system: str = "ls",
            benchmark: str = "b", turns: int = 2, well_formed: bool = True) -> dict[str, object]:  # fmt: skip
    return {"benchmark": benchmark, "system": system, "problem_id": pid, "sample": sample, "correct": correct,
            "tokens_long": long, "tokens_short": short, "turns": turns, "well_formed": well_formed}  # fmt: skip


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    """The share of k-subsets of n samples (c of them correct) that hold a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_mean_at_k_known_values() -> None:
    assert mean_at_k([[True, False], [True, True]]) == 0.75
    assert mean_at_k([[False] * 4]) == 0.0
    # ragged rows: each problem weighs the same
    assert mean_at_k([[True], [False, False, True, True]]) == 0.75
    with pytest.raises(ValueError, match="problem 1 has no samples"):
        mean_at_k([[True], []])


def test_pass_at_k_known_values() -> None:
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))  # 1 - 21/252
    assert pass_at_k(5, 0, 2) == 0.0
    assert pass_at_k(4, 2, 3) == 1.0  # n - c < k: every 3-subset holds a correct sample
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    for bad in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


@given(n=st.integers(1, 9), data=st.data())
@settings(max_examples=60, deadline=None)
def test_pass_at_k_is_the_subset_probability_and_at_least_mean(n: int, data: st.DataObject) -> None:
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    value = pass_at_k(n, c, k)
    assert value == pytest.approx(_pass_at_k_by_enumeration(n, c, k))
    assert value >= c / n - 1e-12  # pass@k >= pass@1 = mean accuracy
    if k < n:
        assert pass_at_k(n, c, k + 1) >= value - 1e-12


records_strategy = st.lists(
    st.tuples(st.booleans(), st.integers(0, 40_000), st.integers(0, 5_000)), min_size=1, max_size=60
).map(lambda rows: [_record(f"p{i}", 0, c, lo, sh) for i, (c, lo, sh) in enumerate(rows)])


@given(records=records_strategy, budgets=st.lists(st.integers(0, 50_000), min_size=1, max_size=8, unique=True))
@settings(max_examples=100, deadline=None)
def test_budget_accuracy_is_monotone_and_bounded_by_accuracy(records: list[dict], budgets: list[int]) -> None:
    acc = budget_accuracy(records, sorted(budgets))
    values = [acc[b] for b in sorted(budgets)]
    assert values == sorted(values)  # non-decreasing in the budget
    overall = sum(r["correct"] for r in records) / len(records)
    assert all(0.0 <= v <= overall + 1e-12 for v in values)
    assert budget_accuracy(records, [10**9])[10**9] == pytest.approx(overall)  # an endless budget loses nothing


def test_budget_counts_long_plus_short_and_over_budget_is_wrong() -> None:
    records = [
        _record("a", 0, True, 1500, 500),  # exactly 2000 tokens: within a 2000 budget
        _record("b", 0, True, 1500, 501),  # 2001: over
        _record("c", 0, False, 10, 10),  # cheap but wrong
        _record("d", 0, True, 3000, 0),
    ]
    assert budget_accuracy(records, [1999, 2000, 4000]) == {1999: 0.0, 2000: 0.25, 4000: 0.75}


def test_length_stats_conditions_on_correctness() -> None:
    tokens = [10, 20, 30, 40, 100, 200]
    correct = [True, True, True, True, False, False]
    stats = length_stats(tokens, correct, n_bins=4)
    assert stats["correct"] == {"n": 4, "mean": 25.0, "median": 25.0, "p90": pytest.approx(37.0)}
    assert stats["wrong"] == {"n": 2, "mean": 150.0, "median": 150.0, "p90": pytest.approx(190.0)}
    assert stats["all"]["n"] == 6 and stats["all"]["mean"] == pytest.approx(400 / 6)
    assert stats["histogram"]["edges"] == [0.0, 50.0, 100.0, 150.0, 200.0]
    assert stats["histogram"]["correct"] == [4, 0, 0, 0]
    assert stats["histogram"]["wrong"] == [0, 0, 1, 1]  # 100 opens bin 3; 200 closes the last bin
    empty = length_stats([5, 6], [True, True])
    assert empty["wrong"] == {"n": 0, "mean": None, "median": None, "p90": None}
    assert sum(empty["histogram"]["wrong"]) == 0
    with pytest.raises(ValueError, match="differ in length"):
        length_stats([1, 2], [True])


def test_summarize_one_dict_per_benchmark_and_system() -> None:
    # problem p0: 2 of 4 samples right; p1: 0 of 4; system "long" is right everywhere but costs more
    records = [_record("p0", s, s < 2, 100 * (s + 1), 10, turns=s + 1) for s in range(4)]
    records += [_record("p1", s, False, 50, 5, well_formed=s != 0) for s in range(4)]
    records += [_record(p, s, True, 5000, 0, system="long", turns=1) for p in ("p0", "p1") for s in range(4)]
    records += [_record("q", s, True, 10, 0, benchmark="a") for s in range(2)]
    out = summarize(records, k=2, budgets=[256, 8192])
    assert [(s["benchmark"], s["system"]) for s in out] == [("a", "ls"), ("b", "long"), ("b", "ls")]
    ls = out[2]
    assert ls["n_problems"] == 2 and ls["min_samples"] == 4 and ls["n_episodes"] == 8
    assert ls["mean_at_k"] == 0.25
    assert ls["pass_at_k"] == pytest.approx((pass_at_k(4, 2, 2) + 0.0) / 2)  # (5/6 + 0) / 2
    assert ls["pass_at_k"] >= ls["mean_at_k"]
    assert ls["mean_tokens"] == pytest.approx((1000 + 40 + 4 * 55) / 8)
    assert ls["mean_tokens_long"] + ls["mean_tokens_short"] == pytest.approx(ls["mean_tokens"])
    assert ls["well_formed"] == 7 / 8
    assert ls["turns"] == {"mean": pytest.approx((1 + 2 + 3 + 4 + 4 * 2) / 8), "max": 4,
                           "counts": {"1": 1, "2": 5, "3": 1, "4": 1}}  # fmt: skip
    assert ls["budget_accuracy"] == [{"budget": 256, "accuracy": 0.25}, {"budget": 8192, "accuracy": 0.25}]
    # lengths of correct and wrong episodes, long + short tokens: correct 110, 210; wrong 310, 410 and 4 × 55
    length = ls["length"]
    assert length["all"]["n"] == 8 and length["all"]["mean"] == pytest.approx(1260 / 8)
    assert length["correct"]["n"] == 2 and length["correct"]["mean"] == pytest.approx(160.0)
    assert length["wrong"]["n"] == 6 and length["wrong"]["mean"] == pytest.approx((310 + 410 + 4 * 55) / 6)
    assert sum(length["histogram"]["correct"]) == 2 and sum(length["histogram"]["wrong"]) == 6
    long = out[1]
    assert long["mean_at_k"] == 1.0 and long["budget_accuracy"][0]["accuracy"] == 0.0
    assert long["problems_digest"] == ls["problems_digest"]
    json.dumps(out)  # JSON-able as it is


def test_summarize_rejects_bad_records_and_warns_on_different_problems(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="fewer than k=3"):
        summarize([_record("p", s, True, 1, 1) for s in range(2)], k=3)
    with pytest.raises(ValueError, match="duplicate sample indices"):
        summarize([_record("p", 0, True, 1, 1), _record("p", 0, False, 1, 1)], k=1)
    bad = _record("p", 0, True, 1, 1)
    del bad["turns"]
    with pytest.raises(ValueError, match="record 0: missing field\\(s\\) turns"):
        summarize([bad], k=1)
    with caplog.at_level(logging.WARNING, logger="tasks.metrics"):
        summarize([_record("p", 0, True, 1, 1), _record("q", 0, True, 1, 1, system="other")], k=1)
    assert "different problems" in caplog.text


def test_mean_at_k_matches_random_matrix_average() -> None:
    rng = random.Random(0)
    matrix = [[rng.random() < 0.3 for _ in range(8)] for _ in range(50)]
    flat = [c for row in matrix for c in row]
    assert mean_at_k(matrix) == pytest.approx(sum(flat) / len(flat))
    passes = [pass_at_k(8, sum(row), 4) for row in matrix]
    assert sum(passes) / len(passes) >= mean_at_k(matrix)


def test_bootstrap_interval_of_an_accuracy() -> None:
    values = [1.0] * 270 + [0.0] * 30  # 90% of 300 problems
    low, high = bootstrap_interval(values, seed=0)
    half = 1.96 * math.sqrt(0.9 * 0.1 / 300)  # the normal approximation: ±3.4 points
    assert low == pytest.approx(0.9 - half, abs=0.01) and high == pytest.approx(0.9 + half, abs=0.01)
    assert bootstrap_interval(values, seed=0) == (low, high)  # seeded
    assert bootstrap_interval([1.0] * 300) == (1.0, 1.0)  # every problem solved: nothing varies
    assert bootstrap_interval([1.0]) is None  # one problem: nothing to resample
    with pytest.raises(ValueError, match="3 values but 2 reference values"):
        bootstrap_interval([1.0, 0.0, 1.0], reference=[1.0, 0.0])


def test_paired_interval_sees_a_difference_the_separate_intervals_hide() -> None:
    """Both systems fail the same hard half; the candidate solves 3 more: each accuracy is uncertain by
    ±6 points, but the paired difference is known to within 2."""
    reference = [1.0] * 150 + [0.0] * 150
    system = [1.0] * 153 + [0.0] * 147
    low, high = bootstrap_interval(system, seed=0)
    assert high - low > 0.1
    d_low, d_high = bootstrap_interval(system, reference=reference, seed=0)
    assert 0.0 <= d_low <= 0.01 < d_high < 0.025
    assert bootstrap_interval(reference, reference=reference) == (0.0, 0.0)
    # 25 of 300 lost: 8.3 points down, and the interval excludes "within 2 points"
    lost = [0.0] * 25 + [1.0] * 275
    d_low, d_high = bootstrap_interval(lost, reference=[1.0] * 300, seed=0)
    assert d_low < -25 / 300 < d_high < -0.02


def test_token_ratio_interval() -> None:
    rng = random.Random(0)
    reference = [rng.uniform(100, 400) for _ in range(200)]
    assert bootstrap_interval([0.4 * t for t in reference], reference=reference, ratio=True) == pytest.approx((0.4, 0.4))
    # a reference that costs 0 tokens in some resamples: no finite interval, so none (not NaN/inf in results.json)
    assert bootstrap_interval([0.0, 50.0, 50.0], reference=[0.0, 0.0, 100.0], ratio=True) is None
    assert bootstrap_interval([10.0, 50.0], reference=[0.0, 100.0], ratio=True) is None
    noisy = [0.3 * t + rng.uniform(-20, 20) for t in reference]
    low, high = bootstrap_interval(noisy, reference=reference, ratio=True, seed=1)
    assert low < sum(noisy) / sum(reference) < high and high - low < 0.05


def test_compare_with_reference_and_summarize() -> None:
    # the base solves p0..p3 at 200 tokens; the pair solves p0..p2 at 60 tokens and fails p3 at 80
    base = [_record(f"p{i}", 0, True, 200, 0, system="base") for i in range(4)]
    pair = [_record(f"p{i}", 0, i < 3, 40, 20 + 20 * (i == 3), system="pair") for i in range(4)]
    vs = compare_with_reference(pair, base, seed=0)
    assert vs["n_problems"] == 4
    assert vs["accuracy_diff"] == -0.25
    assert vs["token_ratio"] == pytest.approx((3 * 60 + 80) / 4 / 200)
    assert vs["accuracy_diff_ci"]["low"] <= -0.25 <= vs["accuracy_diff_ci"]["high"] == 0.0
    assert vs["accuracy_diff_ci"]["confidence"] == 0.95
    out = summarize(base + pair, k=1, budgets=[256], reference="base")
    by_system = {s["system"]: s for s in out}
    assert "vs_reference" not in by_system["base"]
    assert by_system["pair"]["vs_reference"] == {"system": "base", **vs}
    assert by_system["base"]["mean_at_k_ci"] == {"low": 1.0, "high": 1.0, "confidence": 0.95}
    json.dumps(out)
    with pytest.raises(ValueError, match="reference system 'nope' has no records"):
        summarize(base + pair, k=1, reference="nope")
    with pytest.raises(ValueError, match="share no problem"):
        compare_with_reference(pair, [_record("other", 0, True, 1, 1)])


def test_run_summary_prints_intervals_and_the_comparison_with_the_base() -> None:
    from longshort import cli

    m = {"heldout.long_cot_base.accuracy": 0.987, "heldout.long_cot_base.accuracy_ci_low": 0.973,
         "heldout.long_cot_base.accuracy_ci_high": 1.0, "heldout.long_cot_base.mean_tokens": 271.6,
         "heldout.long_short_rl.accuracy": 0.903, "heldout.long_short_rl.accuracy_ci_low": 0.87,
         "heldout.long_short_rl.accuracy_ci_high": 0.937, "heldout.long_short_rl.mean_tokens": 109.0,
         "heldout.long_short_rl.accuracy_diff_vs_ref": -0.083, "heldout.long_short_rl.accuracy_diff_vs_ref_ci_low": -0.117,
         "heldout.long_short_rl.accuracy_diff_vs_ref_ci_high": -0.05, "heldout.long_short_rl.token_ratio_vs_ref": 0.401,
         "heldout.long_short_rl.token_ratio_vs_ref_ci_low": 0.399, "heldout.long_short_rl.token_ratio_vs_ref_ci_high": 0.404}  # fmt: skip
    m |= {"rl_probe_reward_start": 2.1, "rl_probe_reward_end": 2.27, "rl_probe_reward_gain": 0.17,
          "rl_probe_reward_gain_ci_low": 0.05, "rl_probe_reward_gain_ci_high": 0.3, "rl_probe_accuracy_start": 0.922,
          "rl_probe_accuracy_end": 0.883, "rl_probe_tokens_start": 122.6, "rl_probe_tokens_end": 111.0}  # fmt: skip
    summary = {"profile": "demo", "metrics": m, "stage_times_s": {}, "flow_time_s": 1.0, "cache_hits": 0, "n_stages": 1}
    with cli.console.capture() as captured:
        cli._print_summary(summary)
    lines = captured.get().splitlines()
    base = next(line for line in lines if "long-CoT base" in line)
    rl = next(line for line in lines if "Long⊗Short RL" in line)
    assert "98.7 [97.3, 100.0]" in base and "100" in base
    assert "90.3 [87.0, 93.7]" in rl and "-8.3 [-11.7, -5.0]" in rl and "40.1 [39.9, 40.4]" in rl
    assert any("bootstrap over the held-out problems" in line for line in lines)
    probe = next(line for line in lines if "fixed probe batch" in line)
    assert "reward 2.10 -> 2.27 (gain +0.17 [95% CI +0.05, +0.30])" in probe and "tokens 122.6 -> 111.0" in probe
