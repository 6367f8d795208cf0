"""Answer checking: math answers with math-verify, multiple-choice answers by letter.

``predicted`` may be the content of ``\\boxed{}`` or a longer text that contains
one or more boxes; the last box wins (``models.protocol.extract_boxed``).

Math: an exact match after light normalisation is accepted at once (it also
covers answers math-verify only parses as raw strings), otherwise both sides are
parsed as ``\\boxed{…}`` and compared with ``math_verify.verify(gold, pred)``,
which handles fractions vs decimals, ``\\dfrac``, units in ``\\text{}``, degrees,
thousands separators, leading zeros, sets, tuples and intervals.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from typing import Literal

from math_verify import parse, verify
from sympy import Add, Basic, MatrixBase, Mul, Pow
from sympy.functions.combinatorial.factorials import (
    FallingFactorial,
    RisingFactorial,
    binomial,
    factorial,
    factorial2,
    subfactorial,
)
from sympy.functions.special.gamma_functions import gamma

from models.protocol import extract_boxed

# math-verify warns on every call when its signal-based timeouts are off (worker threads).
logging.getLogger("math_verify").setLevel(logging.ERROR)

AnswerKind = Literal["math", "choice"]
CHOICE_LETTERS = "ABCD"

_PERCENT = re.compile(r"\s*\\?%$")
# for the exact-match fast path only: thin spaces (thousands separators) removed, wider
# spacing commands made spaces, \left/\right removed, \dfrac/\tfrac made \frac
_LATEX_NOISE = (
    (re.compile(r"\\[,!]"), ""),
    (re.compile(r"\\[;: ]|\\q?quad"), " "),
    (re.compile(r"\\(?:left|right)(?![a-zA-Z])"), ""),
    (re.compile(r"\\[dt]frac"), r"\\frac"),
)
_SPACES = re.compile(r"\s+")
_SPACE_NOT_BETWEEN_DIGITS = re.compile(r"(?<!\d) | (?!\d)")


def _boxed_or_self(text: str) -> str | None:
    """The last balanced ``\\boxed{}``'s content when the text has one, else the text.

    None when the text opens a box but never closes one (``\\boxed{\\frac{1}{2}``):
    a cut-off answer is no answer.
    """
    if "\\boxed" in text:
        boxed = extract_boxed(text)
        if boxed is not None:
            return boxed
        if "\\boxed{" in text:
            return None
    return text


def _clean(s: str) -> str:
    """Outer ``$``, a final full stop and a trailing percent sign removed."""
    return _PERCENT.sub("", s.strip().strip("$").strip().rstrip(".").rstrip())


def _normalize(s: str) -> str:
    """The exact-match key: ``_clean`` without LaTeX noise and without spaces.

    A space between two digits stays (one space), so ``1 2`` is not ``12``.
    """
    s = _clean(s)
    for pattern, repl in _LATEX_NOISE:
        s = pattern.sub(repl, s)
    return _SPACE_NOT_BETWEEN_DIGITS.sub("", _SPACES.sub(" ", s))


# Guards that keep sympy from evaluating huge numbers (``10^{10^{10}}``, ``(2^{40})!``:
# it holds the GIL) or expanding huge polynomials (``(a+b+c+d+e)^{16}``) in ``verify``:
# off the main thread no timeout can stop it.
_MAX_CHARS = 500  # longer answers are not parsed
_MAX_BITS = float(1 << 18)  # numbers up to about 79,000 decimal digits are evaluated
_MAX_TERMS = 200  # polynomials up to 200 monomials once expanded
_COUNTING = (factorial, factorial2, subfactorial, binomial, gamma, RisingFactorial, FallingFactorial)


def _value_bound(expr: object) -> float:
    """An upper bound on ``|expr|`` once evaluated: exact for rationals, else ``2**_bits``."""
    if isinstance(expr, Basic) and expr.is_Rational:
        num = max(abs(int(expr.p)), int(expr.q))  # type: ignore[attr-defined]
        return float(num) if num.bit_length() <= 64 else math.inf
    bits = _bits(expr)
    return 2.0**bits if bits <= 64 else math.inf


def _bits(expr: object) -> float:
    """An upper bound on the binary digits of the numbers in ``expr`` once evaluated.

    Symbols and constants count as one bit; a power multiplies its base's bits by its
    exponent's size, a factorial-like function of ``n`` costs ``n*log2(n)`` bits.
    """
    if isinstance(expr, MatrixBase):
        return 1.0 + sum(_bits(e) for e in expr)
    if not isinstance(expr, Basic):
        return 1.0
    if expr.is_Rational:
        num = max(abs(int(expr.p)), int(expr.q), 2)  # type: ignore[attr-defined]
        return math.log2(num)
    if expr.is_Float:
        magnitude = abs(float(expr))
        return math.inf if math.isinf(magnitude) else max(1.0, math.log2(magnitude + 1))
    if isinstance(expr, Pow):
        base, exponent = expr.args
        return _bits(base) * max(1.0, _value_bound(exponent))
    if isinstance(expr, _COUNTING):
        n = max(_value_bound(a) for a in expr.args)
        return n * max(1.0, math.log2(n)) if n <= _MAX_BITS else math.inf
    return 1.0 + sum(_bits(a) for a in expr.args)


def _terms(expr: object) -> float:
    """An upper bound on the monomials of ``expr`` once expanded (a number is one).

    A sum adds its terms' monomials, a product multiplies them, and a positive integer
    power ``e`` of a ``t``-monomial sum has ``C(e+t-1, t-1)``.
    """
    if isinstance(expr, MatrixBase):
        return sum(_terms(e) for e in expr)
    if not isinstance(expr, Basic) or not expr.args:
        return 1.0
    if isinstance(expr, Add):
        return sum(_terms(a) for a in expr.args)
    if isinstance(expr, Mul):
        return math.prod(_terms(a) for a in expr.args)
    if isinstance(expr, Pow):
        base, exponent = expr.args
        t = _terms(base)
        if t == 1 or not (exponent.is_Integer and exponent.is_positive):
            return t
        if t > _MAX_TERMS or int(exponent) > _MAX_TERMS:  # type: ignore[call-overload]
            return math.inf
        return float(math.comb(int(exponent) + int(t) - 1, int(t) - 1))  # type: ignore[call-overload]
    return sum(_terms(a) for a in expr.args)


def _too_big(parsed: list[object]) -> bool:
    """Whether a parsed answer is too big to evaluate: see ``_bits`` and ``_terms``."""
    try:
        return any(_bits(e) > _MAX_BITS or _terms(e) > _MAX_TERMS for e in parsed)
    except (RecursionError, OverflowError, TypeError, ValueError):
        return True


def is_correct(predicted: str | None, reference: str) -> bool:
    """Whether a predicted math answer matches the reference (math-verify, boxed-first).

    A percent sign is dropped on both sides (``50\\%`` == ``50``), since math-verify
    parses ``50\\%`` only as a raw string. Answers longer than ``_MAX_CHARS`` or holding
    numbers too big to evaluate (``10^{10^{10}}``, ``(2^{40})!``) are wrong unless they
    match exactly: math-verify's timeouts are off in worker threads, where such a number
    would hang the process.
    """
    if predicted is None or not predicted.strip():
        return False
    boxed = _boxed_or_self(predicted)
    if boxed is None:
        return False
    pred, gold = _clean(boxed), _clean(reference)
    if not pred:
        return False
    if _normalize(pred) == _normalize(gold):
        return True
    if len(pred) > _MAX_CHARS or len(gold) > _MAX_CHARS:
        return False
    # signal-based timeouts only work in the main thread (Prefect runs tasks in workers)
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed or _too_big(gold_parsed) or _too_big(pred_parsed):
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


# \text{C}, \textbf{(C)}, \mathrm{C} … -> their content
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
# an optional lead-in ("Answer:", "the answer is", "Option"), the letter alone or in
# brackets, then the end or punctuation/space before the option text ("C. Benzene", "C) 5 eV")
_CHOICE = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+)?(?:answer|option|choice)\s*(?:is)?\s*[:\-]?\s*)?"
    r"[(\[]?\s*([A-Za-z])\s*[)\]]?"
    r"(?:$|[\s.:,;)\]\-])",
    re.IGNORECASE,
)

_HEDGE = re.compile(r"(?:,|/|&|and\b|or\b)\s*[(\[]?\s*[A-Z](?:$|[\s.,)\]])")


def choice_letter(predicted: str | None, letters: str = CHOICE_LETTERS) -> str | None:
    """The option letter a predicted answer names, upper case, or None.

    Accepts ``C``, ``(C)``, ``C)``, ``[C]``, ``\\text{C}``, ``\\textbf{(C)}``,
    ``C. option text``, ``Answer: C``; a lower-case letter only when it stands alone;
    None for hedges that name two options (``C and D``).
    """
    boxed = None if predicted is None else _boxed_or_self(predicted)
    if boxed is None:
        return None
    s = boxed.strip().strip("$").strip()
    while True:
        unwrapped = _TEXT_WRAPPER.sub(r"\1", s)
        if unwrapped == s:
            break
        s = unwrapped
    s = s.strip().strip("*").strip()
    m = _CHOICE.match(s)
    if m is None:
        return None
    letter = m.group(1)
    if _HEDGE.match(s[m.end(1) :].lstrip(")] ")):
        return None  # "C and D", "C/D", "(B) or (C)": more than one option named
    if letter.islower() and s.strip("()[]. ") != letter:
        return None  # "a" may be a word: lower case only when the letter stands alone
    letter = letter.upper()
    return letter if letter in letters.upper() else None


def is_correct_choice(predicted: str | None, letter: str) -> bool:
    """Whether a predicted multiple-choice answer names the option ``letter``."""
    if len(letter.strip()) != 1:
        raise ValueError(f"reference must be one option letter, got {letter!r}")
    return choice_letter(predicted, letters=CHOICE_LETTERS + letter.upper()) == letter.strip().upper()


def check_answer(predicted: str | None, item_kind: AnswerKind, reference: str) -> bool:
    """Dispatch on the benchmark item's kind: ``math`` (math-verify) or ``choice`` (letter)."""
    if item_kind == "math":
        return is_correct(predicted, reference)
    if item_kind == "choice":
        return is_correct_choice(predicted, reference)
    raise ValueError(f"unknown answer kind {item_kind!r}: expected 'math' or 'choice'")
