"""Answer checking: math answers with math-verify, multiple-choice answers by letter.

``predicted`` may be the content of ``\\boxed{}`` or a longer text that contains
one or more boxes; the last box wins (``models.protocol.extract_boxed``).

Math: an exact match after light normalisation is accepted at once (it also
covers answers math-verify only parses as raw strings), otherwise both sides are
parsed as ``\\boxed{…}`` and compared with ``math_verify.verify(gold, pred)``,
which handles fractions vs decimals, ``\\dfrac``, units in ``\\text{}``, degrees,
thousands separators, leading zeros, sets, tuples and intervals. A decimal must agree
to every digit it shows and to 6 significant figures; a base subscript (``52_8``)
must match the key's.

Bounded work: pipeline stages check answers in worker threads, where math-verify's
timeouts are off, so an answer that could take unbounded time is never evaluated and
counts only on an exact match: sums and products with infinite, symbolic or long
(over 100 values) limits, integrals, limits, derivatives of order over 100, huge
powers and factorials, and answers whose parsing alone computes big numbers
(``\\gcd``/``\\lcm``, matrix builders, binomials of 7-digit integers). So
``\\sum_{k=1}^{\\infty} 1/k^2`` is not matched with ``\\pi^2/6``.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Iterator
from typing import Literal

from math_verify import parse, verify
from sympy import Add, Basic, Derivative, Expr, Integral, Limit, MatrixBase, Mul, Pow, Product, S, Sum
from sympy.concrete.expr_with_limits import ExprWithLimits
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
# Sums and products: sympy's evalf of a Sum past about 2*53 terms switches to Euler–Maclaurin,
# whose n-th derivatives of the summand never finish for ``k!`` (measured: 105 terms 0.3 s,
# 120 terms > 15 s), so one limit may span 100 values and nested limits 10,000 in all.
_MAX_SPAN = 100
_MAX_LOOPS = 10_000
_COUNTING = (factorial, factorial2, subfactorial, binomial, gamma, RisingFactorial, FallingFactorial)
_INFINITIES = (S.Infinity, S.NegativeInfinity, S.ComplexInfinity, S.NaN)
# the LaTeX parser itself evaluates gcd/lcm (``\gcd(10^{10^{10}}, 4)``), builds
# ``\operatorname{zeros}(n, n)`` matrices and computes ``\binom`` of integer literals
# (``\binom{1000000}{500000}``) before any guard can look at the result: not parsed
_PARSE_HAZARD = re.compile(
    r"\\(?:gcd|lcm)(?![a-zA-Z])"
    r"|\\operatorname\*?\s*\{\s*(?:gcd|lcm|zeros|ones|diag|hstack|vstack|orth\w*)\s*\}"
)
_BINOMIAL = re.compile(r"binom|choose")
_LONG_INTEGER = re.compile(r"\d{7}")

Bounds = dict[Basic, float]  # an upper bound on |v| for each bound summation variable v


def _limit_bounds(expr: ExprWithLimits, bounds: Bounds) -> tuple[Bounds, int] | None:
    """The bounds with ``expr``'s variables added and its number of terms, or None if unbounded.

    A limit must be finite and numeric (or depend only on an enclosing sum's variable) and
    span at most ``_MAX_SPAN`` values: ``\\sum_{k=1}^{n}``, ``\\sum_{k=1}^{\\infty}`` and
    ``\\prod_{k=1}^{10^9}`` are None.
    """
    inner = dict(bounds)
    span_total = 1
    for limit in reversed(expr.limits):  # the outermost limit comes last
        if len(limit) != 3:
            return None
        var, lo, hi = limit
        if any(end.has(*_INFINITIES) or not end.free_symbols <= inner.keys() for end in (lo, hi)):
            return None
        lo_bound, hi_bound = _value_bound(lo, inner), _value_bound(hi, inner)
        if lo.is_Integer and hi.is_Integer:
            span = max(0, int(hi) - int(lo) + 1)  # type: ignore[call-overload]
        else:
            span = lo_bound + hi_bound + 1
        if span > _MAX_SPAN:
            return None
        inner[var] = max(lo_bound, hi_bound)
        span_total *= max(1, int(span))
    return inner, span_total


def _summand(
    expr: Sum | Product, bounds: Bounds | None, measure: Callable[[object, Bounds], float]
) -> tuple[float, int] | None:
    """(``measure`` of a sum's or product's summand, its variables bounded by the limits; the number of
    terms), or None when a limit is unbounded (``_limit_bounds``): ``_bits``, ``_terms`` and ``_loops``
    each combine the two their own way."""
    limited = _limit_bounds(expr, bounds or {})
    if limited is None:
        return None
    inner, span = limited
    return measure(expr.function, inner), span


def _value_bound(expr: object, bounds: Bounds | None = None) -> float:
    """An upper bound on ``|expr|`` once evaluated: exact for rationals, else ``2**_bits``."""
    if isinstance(expr, Basic) and expr.is_Rational:
        num = max(abs(int(expr.p)), int(expr.q))  # type: ignore[attr-defined]
        return float(num) if num.bit_length() <= 64 else math.inf
    if bounds and expr in bounds:
        return bounds[expr]  # type: ignore[index]
    bits = _bits(expr, bounds)
    return 2.0**bits if bits <= 64 else math.inf


def _bits(expr: object, bounds: Bounds | None = None) -> float:
    """An upper bound on the binary digits of the numbers in ``expr`` once evaluated.

    Symbols and constants count as one bit; a power multiplies its base's bits by its
    exponent's size, a factorial-like function of ``n`` costs ``n*log2(n)`` bits. A sum
    of ``s`` terms adds ``log2(s)`` bits to its summand's, a product of ``s`` factors
    multiplies them by ``s``, with the summation variable bounded by its limits.
    Integrals and limits are never evaluated (sympy's ``integrate`` and ``limit`` have no
    bound on their running time): infinite.
    """
    if isinstance(expr, MatrixBase):
        return 1.0 + sum(_bits(e, bounds) for e in expr)
    if not isinstance(expr, Basic):
        return 1.0
    if expr.is_Rational:
        num = max(abs(int(expr.p)), int(expr.q), 2)  # type: ignore[attr-defined]
        return math.log2(num)
    if expr.is_Float:
        magnitude = abs(float(expr))
        return math.inf if math.isinf(magnitude) else max(1.0, math.log2(magnitude + 1))
    if bounds and expr in bounds:
        return math.log2(max(2.0, bounds[expr]))
    if isinstance(expr, (Integral, Limit)):
        return math.inf
    if isinstance(expr, ExprWithLimits):
        summand = _summand(expr, bounds, _bits) if isinstance(expr, (Sum, Product)) else None
        if summand is None:
            return math.inf
        body, span = summand
        return body + math.log2(max(span, 1)) if isinstance(expr, Sum) else body * span
    if isinstance(expr, Derivative):
        counts = [count for _, count in expr.variable_count]
        if not all(c.is_Integer and int(c) <= _MAX_SPAN for c in counts):  # type: ignore[call-overload]
            return math.inf
    if isinstance(expr, Pow):
        base, exponent = expr.args
        return _bits(base, bounds) * max(1.0, _value_bound(exponent, bounds))
    if isinstance(expr, _COUNTING):
        n = max(_value_bound(a, bounds) for a in expr.args)
        return n * max(1.0, math.log2(n)) if n <= _MAX_BITS else math.inf
    return 1.0 + sum(_bits(a, bounds) for a in expr.args)


def _terms(expr: object, bounds: Bounds | None = None) -> float:
    """An upper bound on the monomials of ``expr`` once expanded (a number is one).

    A sum adds its terms' monomials, a product multiplies them, and a positive integer
    power ``e`` of a ``t``-monomial sum has ``C(e+t-1, t-1)``; a power whose exponent is
    a summation variable takes that variable's bound. A ``\\sum`` of ``s`` terms has at
    most ``s`` times its summand's monomials, a ``\\prod`` of ``s`` factors their ``s``-th power.
    """
    if isinstance(expr, MatrixBase):
        return sum(_terms(e, bounds) for e in expr)
    if not isinstance(expr, Basic) or not expr.args:
        return 1.0
    if isinstance(expr, (Sum, Product)):
        if (summand := _summand(expr, bounds, _terms)) is None:
            return math.inf
        t, span = summand
        return t * span if isinstance(expr, Sum) else t**span
    if isinstance(expr, Add):
        return sum(_terms(a, bounds) for a in expr.args)
    if isinstance(expr, Mul):
        return math.prod(_terms(a, bounds) for a in expr.args)
    if isinstance(expr, Pow):
        base, exponent = expr.args
        t = _terms(base, bounds)
        if bounds and exponent.free_symbols and exponent.free_symbols <= bounds.keys():
            exponent = S(int(min(_value_bound(exponent, bounds), 2.0 * _MAX_TERMS)))
        if t == 1 or not (exponent.is_Integer and exponent.is_positive):
            return t
        if t > _MAX_TERMS or int(exponent) > _MAX_TERMS:  # type: ignore[call-overload]
            return math.inf
        return float(math.comb(int(exponent) + int(t) - 1, int(t) - 1))  # type: ignore[call-overload]
    return sum(_terms(a, bounds) for a in expr.args)


def _loops(expr: object, bounds: Bounds | None = None) -> float:
    """How many summand evaluations nested sums and products need (1 without any)."""
    if not isinstance(expr, Basic) or not expr.args:
        return 1.0
    if isinstance(expr, (Sum, Product)):
        if (summand := _summand(expr, bounds, _loops)) is None:
            return math.inf
        loops, span = summand
        return span * loops
    return max(_loops(a, bounds) for a in expr.args)


def _too_big(parsed: list[object]) -> bool:
    """Whether a parsed answer is too big to evaluate: see ``_bits``, ``_terms`` and ``_loops``."""
    try:
        return any(
            _bits(e) > _MAX_BITS or _terms(e) > _MAX_TERMS or _loops(e) > _MAX_LOOPS for e in parsed
        )
    except (RecursionError, OverflowError, TypeError, ValueError):
        return True


def _parse_hazard(answer: str) -> bool:
    """Whether parsing ``answer`` alone could run unbounded (see ``_PARSE_HAZARD``)."""
    return bool(_PARSE_HAZARD.search(answer)) or bool(_BINOMIAL.search(answer) and _LONG_INTEGER.search(answer))

# a number with a base subscript: 52_8, 2220_{3}, 52_{(8)}
_BASE_SUBSCRIPT = re.compile(r"^(\w+?)_\{?\(?(\d+)\)?\}?$")
_DECIMALS = re.compile(r"(?<![\d.])\d*\.(\d+)")
_SIGNIFICANT_DIGITS = 6
_MIN_FLOAT_ROUNDING = 6  # math-verify's default: 0.333333 == 1/3
_MAX_FLOAT_ROUNDING = 20


def _same_base(pred: str, gold: str) -> bool:
    """False when the gold is a number in a base (``52_8``) and the prediction names another.

    math-verify drops the subscript (``52_9`` parses as 52). A prediction without a
    subscript (``52``) is not rejected here: the problem names the base.
    """
    gold_base = _BASE_SUBSCRIPT.match(_normalize(gold))
    pred_base = _BASE_SUBSCRIPT.match(_normalize(pred))
    return gold_base is None or pred_base is None or pred_base.group(2) == gold_base.group(2)


def _magnitudes(expr: object) -> Iterator[float]:
    """``|v|`` for each largest numeric sub-expression ``v`` of ``expr`` that is not zero."""
    if isinstance(expr, MatrixBase):
        for e in expr:
            yield from _magnitudes(e)
        return
    if not isinstance(expr, Basic):
        return
    if isinstance(expr, Expr) and expr.is_number:
        try:
            magnitude = abs(complex(expr))
        except (TypeError, ValueError, ArithmeticError, NotImplementedError):
            return
        if 0 < magnitude < math.inf:
            yield magnitude
        return
    for a in expr.args:
        yield from _magnitudes(a)


def _float_rounding(texts: list[str], parsed: list[object]) -> int:
    """The decimal places math-verify rounds floats to before comparing them.

    ``max(6, d, 5 - floor(log10 m))`` capped at 20, where ``d`` is the most decimals either
    answer writes and ``m`` the smallest non-zero number in either: a float must agree
    with the other side to every decimal it shows and to 6 significant digits. So
    ``0.333333 == 1/3`` and ``0.6666667 == 2/3`` (rounded), but ``.0000673 != .0000672``,
    ``0.0000001 != 0.0000002`` and ``0.7500001 != 0.75``. math-verify's default, 6 decimal
    places, calls every pair of numbers below ``5e-7`` equal.
    """
    decimals = max((len(d) for t in texts for d in _DECIMALS.findall(t)), default=0)
    smallest = min((m for e in parsed for m in _magnitudes(e)), default=1.0)
    significant = _SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(smallest))
    return min(_MAX_FLOAT_ROUNDING, max(_MIN_FLOAT_ROUNDING, decimals, significant))


def is_correct(predicted: str | None, reference: str) -> bool:
    """Whether a predicted math answer matches the reference (math-verify, boxed-first).

    A percent sign is dropped on both sides (``50\\%`` == ``50``), since math-verify
    parses ``50\\%`` only as a raw string. Answers longer than ``_MAX_CHARS`` or holding
    numbers too big to evaluate (``10^{10^{10}}``, ``(2^{40})!``, ``\\prod_{k=1}^{10^9} k``)
    are wrong unless they match exactly: math-verify's timeouts are off in worker threads,
    where such a number would hang the process. Decimals are compared at the precision
    ``_float_rounding`` picks (``.0000673`` is not ``.0000672``; ``0.333333`` is
    ``\\frac13``), and a number written in a base (``52_8``) is wrong in another base
    (``52_9``).
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
    if len(pred) > _MAX_CHARS or len(gold) > _MAX_CHARS or _parse_hazard(pred) or _parse_hazard(gold):
        return False
    if not _same_base(pred, gold):
        return False
    # signal-based timeouts only work in the main thread (Prefect runs tasks in workers)
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed or _too_big(gold_parsed) or _too_big(pred_parsed):
        return False
    rounding = _float_rounding([pred, gold], [*gold_parsed, *pred_parsed])
    return bool(verify(gold_parsed, pred_parsed, float_rounding=rounding, timeout_seconds=timeout))


# \text{C}, \textbf{(C)}, \mathrm{C} … -> their content
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
# an optional lead-in ("Answer:", "the answer is", "Option"), the letter alone or in
# brackets, then the end or punctuation/space before the option text ("C. Benzene", "C) 5 eV");
# not a letter followed by "=": that is an option's text ("A = benzoquinone, B = ...")
_CHOICE = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+)?(?:answer|option|choice)\s*(?:is)?\s*[:\-]?\s*)?"
    r"[(\[]?\s*([A-Za-z])(?![)\]]?\s*=)\s*[)\]]?"
    r"(?:$|[\s.:,;)\]\-])",
    re.IGNORECASE,
)

_HEDGE = re.compile(r"(?:,|;|/|&|and\b|or\b)\s*[(\[]?\s*[A-Z](?:$|[\s.,;)\]])")


def choice_letter(predicted: str | None, letters: str = CHOICE_LETTERS) -> str | None:
    """The option letter a predicted answer names, upper case, or None.

    Accepts ``C``, ``(C)``, ``C)``, ``[C]``, ``\\text{C}``, ``\\textbf{(C)}``,
    ``C. option text``, ``Answer: C``; a lower-case letter only when it stands alone;
    None for hedges that name two options (``C and D``, ``C;D``, ``C D``) and for option
    texts that assign letters (``A = benzoquinone, B = ...``).
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
    rest = s[m.end(1) :].lstrip(")]")
    if _HEDGE.match(rest.lstrip()):
        return None  # "C and D", "C/D", "C;D", "(B) or (C)": more than one option named
    if re.match(rf"\s+[(\[]?[{re.escape(letters.upper())}](?:$|[\s.,;:)\]])", rest):
        return None  # "A B", "(A) (B)": a second option letter right after the first
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
