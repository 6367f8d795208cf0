"""Answer checking: math-verify on hard math cases, option letters for multiple choice."""

from __future__ import annotations

import threading

import pytest

from tasks.answers import check_answer, choice_letter, is_correct, is_correct_choice

MATH_CASES = [
    # fractions, decimals and fraction styles
    ("0.5", "\\frac{1}{2}", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\\tfrac12", "\\frac{1}{2}", True),
    ("1/2", "\\frac{1}{2}", True),
    ("1.5", "\\frac32", True),
    ("0.51", "\\frac{1}{2}", False),
    ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}", True),
    # units, degrees, percent, money, thousands separators
    ("5", "5\\text{ cm}", True),
    ("5\\text{ cm}", "5", True),
    ("5 \\mbox{ cm}", "5", True),
    ("6\\text{ cm}", "5", False),
    ("90", "90^\\circ", True),
    ("50\\%", "50", True),
    ("50", "50\\%", True),
    ("10080", "10,\\!080", True),
    ("32348", "\\$32,\\!348", True),
    ("5.4", "5.4 \\text{ cents}", True),
    # leading zeros (AIME answers are written 025 in places)
    ("025", "25", True),
    ("25", "025", True),
    ("250", "25", False),
    # intervals, unions, sets, tuples
    ("(3,4]", "(3,4]", True),
    ("[3,4)", "(3,4]", False),
    ("(-2,7)", "[-2,7]", False),
    ("[-2,7]", "x \\in [-2,7]", True),
    ("(0,9)\\cup(9,36)", "(0,9) \\cup (9,36)", True),
    ("(0,9)\\cup(9,37)", "(0,9) \\cup (9,36)", False),
    ("1,-2", "-2,1", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)", True),
    ("(3,\\pi)", "(3,\\pi/2)", False),
    # roots and symbols
    ("\\sqrt{12}", "2\\sqrt{3}", True),
    ("2\\sqrt3", "2\\sqrt{3}", True),
    ("\\sqrt{3}", "2\\sqrt{3}", False),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\pi r^2", "r^2\\pi", True),
    # words and lettered answers inside math problems
    ("Evelyn", "\\text{Evelyn}", True),
    ("C", "\\text{(C)}", True),
    ("D", "\\text{(C)}", False),
    # equations and trailing punctuation
    ("x=5", "5", True),
    ("5.", "5", True),
    ("$5$", "5", True),
    ("-1", "1", False),
]


@pytest.mark.parametrize(("predicted", "reference", "expected"), MATH_CASES)
def test_hard_math_answers(predicted: str, reference: str, expected: bool) -> None:
    assert is_correct(predicted, reference) is expected
    assert check_answer(predicted, "math", reference) is expected


def test_last_box_wins_and_missing_answers_are_wrong() -> None:
    assert is_correct("first \\boxed{3}, no wait: \\boxed{5}", "5")
    assert not is_correct("first \\boxed{5}, no wait: \\boxed{3}", "5")
    assert is_correct("so \\boxed{\\frac{1}{2}} cm.", "0.5")  # braces inside the box stay balanced
    assert not is_correct("\\boxed{", "5")  # an unclosed box is not an answer
    assert not is_correct(None, "5")
    assert not is_correct("", "5")
    assert not is_correct("   ", "5")


def test_checker_runs_in_a_worker_thread() -> None:
    # Prefect runs tasks in worker threads, where math-verify's signal timeouts cannot be used
    results: list[bool] = []
    t = threading.Thread(target=lambda: results.extend([is_correct("0.5", "\\frac12"), is_correct("0.4", "\\frac12")]))
    t.start()
    t.join()
    assert results == [True, False]


@pytest.mark.parametrize(
    "predicted",
    ["C", "(C)", "C)", "[C]", "\\text{C}", "\\text{(C)}", "\\textbf{C}", "C. 10^-4 eV", "C) 10^-4 eV", "C: benzene",
     "Answer: C", "The answer is (C)", "Option C", "c", "(c)", "$C$", "**C**", "\\boxed{B} then \\boxed{C}"],
)  # fmt: skip
def test_choice_letter_forms_are_accepted(predicted: str) -> None:
    assert choice_letter(predicted) == "C"
    assert is_correct_choice(predicted, "C")
    assert not is_correct_choice(predicted, "B")
    assert check_answer(predicted, "choice", "C")


@pytest.mark.parametrize("predicted", ["", None, "E", "CD", "Cat", "a cat", "C and D", "C or D", "(B) or (C)", "C/D", "C, D", "ABCD", "10^-4 eV"])
def test_choice_non_answers_name_no_letter(predicted: str | None) -> None:
    assert choice_letter(predicted) is None
    assert not is_correct_choice(predicted, "C")


def test_choice_reference_must_be_one_letter_and_kind_must_be_known() -> None:
    with pytest.raises(ValueError, match="one option letter"):
        is_correct_choice("C", "CD")
    with pytest.raises(ValueError, match="unknown answer kind 'code'"):
        check_answer("C", "code", "C")  # type: ignore[arg-type]
