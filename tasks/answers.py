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
import re
import threading
from typing import Literal

from math_verify import parse, verify

from models.protocol import extract_boxed

# math-verify warns on every call when its signal-based timeouts are off (worker threads).
logging.getLogger("math_verify").setLevel(logging.ERROR)

AnswerKind = Literal["math", "choice"]
CHOICE_LETTERS = "ABCD"

_PERCENT = re.compile(r"\s*\\?%$")
# removed for the exact-match fast path only: spacing commands, \left/\right, \dfrac/\tfrac
_LATEX_NOISE = (
    (re.compile(r"\\[,!;: ]|\\q?quad"), ""),
    (re.compile(r"\\(?:left|right)(?![a-zA-Z])"), ""),
    (re.compile(r"\\[dt]frac"), r"\\frac"),
)


def _boxed_or_self(text: str) -> str:
    """The last ``\\boxed{}``'s content when the text has one, else the text."""
    if "\\boxed" in text:
        boxed = extract_boxed(text)
        if boxed is not None:
            return boxed
    return text


def _clean(s: str) -> str:
    """Outer ``$``, a final full stop and a trailing percent sign removed."""
    return _PERCENT.sub("", s.strip().strip("$").strip().rstrip(".").rstrip())


def _normalize(s: str) -> str:
    """The exact-match key: ``_clean`` without LaTeX spacing noise and without spaces."""
    s = _clean(s)
    for pattern, repl in _LATEX_NOISE:
        s = pattern.sub(repl, s)
    return s.replace(" ", "")


def is_correct(predicted: str | None, reference: str) -> bool:
    """Whether a predicted math answer matches the reference (math-verify, boxed-first).

    A percent sign is dropped on both sides (``50\\%`` == ``50``), since math-verify
    parses ``50\\%`` only as a raw string.
    """
    if predicted is None or not predicted.strip():
        return False
    pred, gold = _clean(_boxed_or_self(predicted)), _clean(reference)
    if not pred:
        return False
    if _normalize(pred) == _normalize(gold):
        return True
    # signal-based timeouts only work in the main thread (Prefect runs tasks in workers)
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
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
    if predicted is None:
        return None
    s = _boxed_or_self(predicted).strip().strip("$").strip()
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
