"""Answer checking: math-verify on hard math cases, option letters for multiple choice."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tasks.answers import check_answer, choice_letter, is_correct, is_correct_choice

ROOT = Path(__file__).resolve().parents[1]

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
    assert not is_correct("\\boxed{\\frac{1}{2}", "1/2")
    assert not is_correct("\\boxed{\\frac{1}{2}", "\\frac{1}{2}")
    assert not is_correct("so the answer is \\boxed{5", "5")
    assert is_correct("\\boxed{3}, or maybe \\boxed{5", "3")  # the last balanced box still counts
    assert choice_letter("\\boxed{C") is None
    assert not is_correct(None, "5")
    assert not is_correct("", "5")
    assert not is_correct("   ", "5")


@pytest.mark.parametrize(
    ("predicted", "reference", "expected"),
    [
        ("\\boxed{1 2}", "12", False),
        ("\\boxed{12}", "1\\ 2", False),
        ("1\\;2", "12", False),
        ("1 2", "1\\quad 2", True),
        ("1\\,000", "1000", True),
        ("1{,}000", "1000", True),
        ("1,000", "1000", True),
        ("x ^ 2 + 1", "x^2+1", True),
        ("2 \\sqrt{3}", "2\\sqrt{3}", True),
    ],
)
def test_spaces_between_digits_do_not_join_numbers(predicted: str, reference: str, expected: bool) -> None:
    assert is_correct(predicted, reference) is expected


HUGE_ANSWERS = [
    "10^{10^{10}}",
    "2^{2^{40}}",
    "2^{2^{40}} 3",
    "{10^{10}}^{10^{10}}",
    "(2^{40})!",
    "\\binom{2^{60}}{2^{59}}",
    "10^{-10^{10}}",
    "1e99999",
    "(x+1)^{80000}",
    "(a+b+c+d+e)^{16}",
    "1" * 600,
]


def _in_worker_thread(check: Callable[[], list[bool]], timeout_s: float) -> tuple[bool, list[bool]]:
    """(still running after ``timeout_s``, results) of ``check`` run in a worker thread, as Prefect runs
    a task: math-verify's signal-based timeouts are off there."""
    results: list[bool] = []
    t = threading.Thread(target=lambda: results.extend(check()), daemon=True)
    t.start()
    t.join(timeout=timeout_s)
    return t.is_alive(), results


@pytest.mark.parametrize("predicted", HUGE_ANSWERS)
def test_huge_answers_are_wrong_without_hanging_a_worker_thread(predicted: str) -> None:
    # sympy would evaluate these for minutes holding the GIL, and worker threads have no timeout
    alive, results = _in_worker_thread(
        lambda: [is_correct(f"\\boxed{{{predicted}}}", "1"), is_correct("1", predicted)], timeout_s=5
    )
    assert not alive
    assert results == [False, False]


UNBOUNDED_ANSWERS = [
    "\\prod_{k=1}^{10^9} k",  # sympy multiplies 10^9 factors
    "\\sum_{k=1}^{10^9} k!",
    "\\sum_{k=1}^{1000} k!",  # evalf switches to Euler-Maclaurin past ~106 terms: derivatives of k! never end
    "\\sum_{k=1}^{n} k^{300}",  # a symbolic limit: Faulhaber's formula of degree 301 (5 s)
    "\\sum_{k=1}^{\\infty} k!",
    "\\sum_{i=1}^{100}\\sum_{j=1}^{10^9} i j",
    "\\int_0^{10^9} x!\\,dx",  # 18 s before the guard
    "\\lim_{x\\to\\infty} x!",
    "\\operatorname{zeros}(3000, 3000)",  # built by the LaTeX parser itself
    "\\binom{1000000}{500000}",  # computed by the LaTeX parser itself
]


def _check_in_worker_thread(predicted: str) -> tuple[bool, list[bool]]:
    """(still running after 30 s, results) of checking ``predicted`` both ways in a worker thread."""
    return _in_worker_thread(
        lambda: [is_correct(f"The answer is \\boxed{{{predicted}}}", "1"), is_correct("1", predicted)], timeout_s=30
    )


@pytest.mark.parametrize("predicted", UNBOUNDED_ANSWERS)
def test_unbounded_sums_products_and_parser_hazards_are_wrong_in_a_worker_thread(predicted: str) -> None:
    # Prefect runs tasks in worker threads, where math-verify has no timeout: each of these
    # ran for seconds to forever inside parse() or verify() before the guard
    alive, results = _check_in_worker_thread(predicted)
    assert not alive
    assert results == [False, False]


# These hang inside one big-integer operation in C, which holds the GIL, so a hung worker
# thread would block join() too: they run in worker threads of a child process the test can kill.
GIL_HOLDING_ANSWERS = ["\\sum_{k=1}^{50} (10^{k})!", "\\gcd(10^{10^{10}}, 4)", "10^{10^{10}}", "(2^{40})!"]


def test_answers_that_hang_holding_the_gil_are_wrong_in_a_worker_thread_of_a_child() -> None:
    script = (
        "import json, sys\n"
        "from tests.test_answers import _check_in_worker_thread\n"
        "for predicted in sys.argv[1:]:\n"
        "    print(json.dumps([predicted, *_check_in_worker_thread(predicted)]), flush=True)\n"
    )
    try:
        child = subprocess.run(
            [sys.executable, "-c", script, *GIL_HOLDING_ANSWERS], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired as hung:
        done = hung.stdout.decode() if isinstance(hung.stdout, bytes) else hung.stdout
        pytest.fail(f"checking hung after these lines: {done!r}")
    assert child.returncode == 0, child.stderr[-2000:]
    assert [json.loads(line) for line in child.stdout.splitlines()] == [[p, False, [False, False]] for p in GIL_HOLDING_ANSWERS]


@pytest.mark.parametrize(
    ("predicted", "reference", "expected"),
    [
        ("\\sum_{k=1}^{10} k", "55", True),
        ("\\sum_{k=1}^{10} k", "56", False),
        ("\\sum_{k=1}^{10} k^2", "385", True),
        ("\\prod_{k=1}^{100} k", "100!", True),
        ("\\sum_{i=1}^{3}\\sum_{j=1}^{i} j", "10", True),  # an inner limit bounded by the outer variable
        ("\\sum_{k=1}^{100} k!", "1", False),
    ],
)
def test_small_sums_and_products_are_still_evaluated(predicted: str, reference: str, expected: bool) -> None:
    alive, results = _in_worker_thread(lambda: [is_correct(predicted, reference)], timeout_s=30)
    assert not alive
    assert results == [expected]


@pytest.mark.parametrize(
    ("predicted", "reference", "expected"),
    [
        (".0000673", ".0000672", False),  # math-verify's default rounds both to 0.000067
        ("0.0000001", "0.0000002", False),
        ("0", "0.0000004", False),
        ("0.0000672", ".0000672", True),
        ("6.72\\times10^{-5}", ".0000672", True),
        ("6.7\\times10^{-5}", ".0000672", False),
        ("0.7500001", "0.75", False),  # a decimal the answer writes must agree
        ("0.333333", "\\frac13", True),  # six decimals of a repeating fraction, as MATH answers write them
        ("0.3333333", "\\frac13", True),
        ("0.6666667", "\\frac23", True),  # rounded, not truncated
        ("0.0333333", "\\frac{1}{30}", True),  # six significant digits
        ("0.33", "\\frac13", False),
        ("3.141593", "\\pi", True),
        ("3.14", "\\pi", False),
    ],
)
def test_decimals_are_compared_to_the_digits_they_show(predicted: str, reference: str, expected: bool) -> None:
    assert is_correct(predicted, reference) is expected


@pytest.mark.parametrize(
    ("predicted", "reference", "expected"),
    [
        ("2220_4", "2220_{3}", False),
        ("52_9", "52_8", False),
        ("52_{10}", "52_8", False),
        ("2220_3", "2220_{3}", True),
        ("52_{(8)}", "52_8", True),
        ("52", "52_8", True),  # the problem names the base
        ("42_8", "52_8", False),
    ],
)
def test_numbers_in_a_base_must_name_the_same_base(predicted: str, reference: str, expected: bool) -> None:
    assert is_correct(predicted, reference) is expected


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("2^{10}", "1024"),
        ("10^{-3}", "0.001"),
        ("x^2+1", "1+x^2"),
        ("(x^2+1)^2", "x^4+2x^2+1"),
        ("e^{-x^2}", "\\exp(-x^2)"),
        ("3\\sqrt{2}", "\\sqrt{18}"),
        ("\\frac{1}{2}", "2^{-1}"),
        ("2^{2^{3}}", "256"),
        ("2^{1000}", "2^{1000}"),
        ("9999^{9999}+1", "1+9999^{9999}"),
        ("10!", "3628800"),
        ("10^{10^{10}}", "10^{10^{10}}"),  # an exact match is accepted before parsing
    ],
)
def test_large_but_tractable_answers_still_match(predicted: str, reference: str) -> None:
    assert is_correct(predicted, reference)


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
     "C. A decrease in entropy", "C) B-cells",
     "Answer: C", "The answer is (C)", "Option C", "c", "(c)", "$C$", "**C**", "\\boxed{B} then \\boxed{C}"],
)  # fmt: skip
def test_choice_letter_forms_are_accepted(predicted: str) -> None:
    assert choice_letter(predicted) == "C"
    assert is_correct_choice(predicted, "C")
    assert not is_correct_choice(predicted, "B")
    assert check_answer(predicted, "choice", "C")


@pytest.mark.parametrize(
    "predicted",
    ["", None, "E", "CD", "Cat", "a cat", "C and D", "C or D", "(B) or (C)", "C/D", "C, D", "ABCD", "10^-4 eV",
     "C;D", "C; D", "C D", "(C) (D)", "C = benzoquinone, B = dimethyl fumarate", "(C) = 5 eV"],
)  # fmt: skip
def test_choice_non_answers_name_no_letter(predicted: str | None) -> None:
    assert choice_letter(predicted) is None
    assert not is_correct_choice(predicted, "C")


def test_choice_reference_must_be_one_letter_and_kind_must_be_known() -> None:
    with pytest.raises(ValueError, match="one option letter"):
        is_correct_choice("C", "CD")
    with pytest.raises(ValueError, match="unknown answer kind 'code'"):
        check_answer("C", "code", "C")  # type: ignore[arg-type]
