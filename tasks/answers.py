"""Answer checking with math-verify (boxed-first), with an exact-match fast path."""

from __future__ import annotations

import logging
import threading

from math_verify import parse, verify

# math-verify warns on every call when its signal-based timeouts are off (worker threads).
logging.getLogger("math_verify").setLevel(logging.ERROR)


def _normalize(s: str) -> str:
    return s.strip().strip("$").replace(" ", "").rstrip(".")


def is_correct(predicted: str | None, reference: str) -> bool:
    """Whether a predicted final answer (the content of ``\\boxed{}``) matches the reference."""
    if predicted is None or not predicted.strip():
        return False
    if _normalize(predicted) == _normalize(reference):
        return True
    # signal-based timeouts only work in the main thread (Prefect runs tasks in workers)
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
    pred = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout))
