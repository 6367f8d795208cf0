"""tasks.evaluate.evaluate_single_model: the evaluate_base stage's two passes sample as the evaluation does."""

from __future__ import annotations

from dataclasses import replace

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


class _Recording:
    """The real backend, with the prompts and settings of each call kept; it can answer with given texts."""

    def __init__(self, backend, answers: list[str] | None = None):
        self.backend, self.answers, self.calls = backend, answers, []

    def chat_prompt(self, system, user):
        return self.backend.chat_prompt(system, user)

    def generate(self, prompts, **kwargs):
        self.calls.append((list(prompts), kwargs))
        outs = self.backend.generate(prompts, **kwargs)
        if self.answers is None:
            return outs
        return [[replace(c, text=text) for c in out] for out, text in zip(outs, self.answers, strict=True)]


@pytest.mark.parametrize("think", [True, False])
def test_prompts_force_the_answer_without_thinking_and_answers_are_checked(demo_rows_small, demo_tokenizer, tiny_model, think):
    """think=False appends an empty think turn and the answer tag to the chat prompt (the model must answer at
    once); answers are parsed from the response as that mode writes it and checked against the reference."""
    from models.protocol import STOP_STRINGS, SYSTEM_PROMPTS, answer_prefix, format_response, format_short_turn

    _, heldout = demo_rows_small
    rows = heldout[:3]
    said = [rows[0]["answer"], rows[1]["answer"], str(int(rows[2]["answer"]) + 1)]  # the third is wrong
    # with thinking the whole response; without, the prompt ends with the empty think turn: the answer turn alone
    texts = [(format_response("Thinking.", f"So \\boxed{{{a}}}.") if think else format_short_turn(f"So \\boxed{{{a}}}.", final=True))
             for a in said]  # fmt: skip
    backend = _Recording(TransformersBackend(tiny_model, demo_tokenizer, device="cpu"), texts)
    result, records = evaluate_single_model(backend, rows, think=think, max_new_tokens=4, k=1)
    ((prompts, kwargs),) = backend.calls
    chat = [backend.chat_prompt(SYSTEM_PROMPTS["base"], r["problem"]) for r in rows]
    assert prompts == (chat if think else [p + answer_prefix("") for p in chat])
    assert kwargs["stop"] == STOP_STRINGS["base"] and kwargs["n"] == 1 and kwargs["temperature"] == 0.0
    assert [r["predicted"] for r in records] == said
    assert [r["correct"] for r in records] == [True, True, False] and result.accuracy == pytest.approx(2 / 3)
    assert all(r["error"] is None for r in records) and result.well_formed == 1.0
