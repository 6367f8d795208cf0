"""tasks.evaluate.evaluate_single_model: the evaluate_base stage's two passes sample as the evaluation does."""

from __future__ import annotations

import pytest

from models.generation import TransformersBackend
from tasks.evaluate import evaluate_single_model


@pytest.mark.parametrize("think", [True, False])
def test_k_samples_per_problem_reproducible_by_seed(demo_rows_small, demo_tokenizer, tiny_model, think):
    _, heldout = demo_rows_small
    rows = heldout[:3]
    backend = TransformersBackend(tiny_model, demo_tokenizer, device="cpu")
    run = dict(think=think, max_new_tokens=12, k=3, temperature=1.0)
    result, records = evaluate_single_model(backend, rows, seed=7, **run)
    assert [(r["id"], r["sample"]) for r in records] == [(row["id"], i) for row in rows for i in range(3)]
    assert result.n == 9
    assert result.accuracy == pytest.approx(sum(r["correct"] for r in records) / 9)
    assert result.mean_tokens == pytest.approx(sum(r["tokens"] for r in records) / 9)
    assert all(1 <= r["tokens"] <= 12 for r in records)
    again = [r["completion"] for r in evaluate_single_model(backend, rows, seed=7, **run)[1]]
    assert again == [r["completion"] for r in records]
    # an untrained model at temperature 1: a problem's three samples differ, and so does another seed
    texts = [r["completion"] for r in records]
    assert any(len(set(texts[i : i + 3])) > 1 for i in range(0, 9, 3))
    assert [r["completion"] for r in evaluate_single_model(backend, rows, seed=8, **run)[1]] != texts


def test_greedy_default_is_one_sample_per_problem(demo_rows_small, demo_tokenizer, tiny_model):
    _, heldout = demo_rows_small
    backend = TransformersBackend(tiny_model, demo_tokenizer, device="cpu")
    result, records = evaluate_single_model(backend, heldout[:2], think=False, max_new_tokens=8)
    assert result.n == 2 and [r["sample"] for r in records] == [0, 0]
    assert all(r["error"] is not None and not r["correct"] for r in records)  # untrained: no final <answer>
