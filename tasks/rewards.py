"""RL rewards for Long⊗Short episodes (DESIGN §3, "Multi-turn RL").

Small pure functions in the style of open-r1's ``rewards.py``: each takes
per-episode lists (final answers and references, transcripts, correctness,
lengths in model tokens) and returns one float per episode. Lengths are an episode's tokens (long + short
unless the caller passes something else). The efficiency rewards follow "The
Art of Efficient Reasoning" (arXiv 2602.20945), which compares them:

* ``kimi``       Kimi k1.5 (arXiv 2501.12599, §2.3.3) group-relative length reward;
* ``truncation`` a correct answer counts only within the target length L_T;
* ``laser``      LASER step reward (arXiv 2505.15612, Table 2);
* ``laser-d``    LASER plus an exploration bonus for wrong, long episodes.

``truncation``, ``laser`` and ``laser-d`` already contain the correctness
term; to use one of them *instead of* plain correctness, as the Art paper does,
set the correctness weight to 0 in ``combined_reward``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from longshort.config import Efficiency
from models.protocol import ProtocolError, parse_transcript
from tasks.answers import is_correct


def _check_same_length(**lists: Sequence) -> int:
    sizes = {name: len(v) for name, v in lists.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"reward inputs must have one entry per episode, got lengths {sizes}")
    return next(iter(sizes.values()), 0)


def correctness_reward(answers: Sequence[str | None], references: Sequence[str]) -> list[float]:
    """r = 1 if the episode's final answer (boxed content, None if none) is correct, else 0 (math-verify)."""
    _check_same_length(answers=answers, references=references)
    return [1.0 if is_correct(a, ref) else 0.0 for a, ref in zip(answers, references, strict=True)]


def format_reward(transcripts: Sequence[str]) -> list[float]:
    """r = 1 if the episode's transcript follows the turn protocol and ends with ``</answer>``, else 0."""
    out = []
    for text in transcripts:
        try:
            parse_transcript(text)
        except ProtocolError:
            out.append(0.0)
        else:
            out.append(1.0)
    return out


def kimi_length_reward(correct: Sequence[bool], lengths: Sequence[int]) -> list[float]:
    """Kimi k1.5 length reward over ONE group of rollouts of the same problem.

    λ_i = 0.5 − (L_i − L_min) / (L_max − L_min);  r_i = λ_i if correct else min(0, λ_i).
    When all lengths are equal (L_max = L_min) every r_i = 0.
    """
    _check_same_length(correct=correct, lengths=lengths)
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    rewards = []
    for c, n in zip(correct, lengths, strict=True):
        lam = 0.5 - (n - lo) / (hi - lo)
        rewards.append(lam if c else min(0.0, lam))
    return rewards


def truncation_reward(correct: Sequence[bool], lengths: Sequence[int], length_target: int) -> list[float]:
    """r = 1 if correct and L ≤ L_T, else 0 (an over-long answer counts as truncated)."""
    _check_same_length(correct=correct, lengths=lengths)
    return [1.0 if c and n <= length_target else 0.0 for c, n in zip(correct, lengths, strict=True)]


def laser_reward(correct: Sequence[bool], lengths: Sequence[int], length_target: int, alpha: float) -> list[float]:
    """LASER step reward: r = correct · (1 + α·[L < L_T])."""
    _check_same_length(correct=correct, lengths=lengths)
    return [(1.0 + (alpha if n < length_target else 0.0)) if c else 0.0 for c, n in zip(correct, lengths, strict=True)]


def laser_d_reward(
    correct: Sequence[bool], lengths: Sequence[int], length_target: int, alpha: float
) -> list[float]:
    """LASER plus a bonus for wrong episodes that reach the target length:

    r = correct · (1 + α·[L < L_T]) + α · [not correct and L ≥ L_T].

    Sign convention: the second term is a *bonus* (+α, α > 0), as DESIGN §3
    writes it ("plus α·[wrong and L ≥ L_T]"). It is the exploration term of the
    LASER paper's difficulty-aware variant (LASER-DE, arXiv 2505.15612): a wrong
    answer that used at least L_T tokens is not pushed towards shorter,
    still-wrong answers. The target length here is the fixed L_T, not the
    paper's per-difficulty adaptive L_A.
    """
    base = laser_reward(correct, lengths, length_target, alpha)
    bonus = [alpha if not c and n >= length_target else 0.0 for c, n in zip(correct, lengths, strict=True)]
    return [r + b for r, b in zip(base, bonus, strict=True)]


EfficiencyReward = Callable[[Sequence[bool], Sequence[int], int, float], list[float]]

EFFICIENCY_REWARDS: dict[str, EfficiencyReward] = {
    "kimi": lambda correct, lengths, length_target, alpha: kimi_length_reward(correct, lengths),
    "truncation": lambda correct, lengths, length_target, alpha: truncation_reward(correct, lengths, length_target),
    "laser": laser_reward,
    "laser-d": laser_d_reward,
}


def efficiency_reward(
    name: Efficiency,
    correct: Sequence[bool],
    lengths: Sequence[int],
    *,
    group_size: int,
    length_target: int,
    alpha: float,
) -> list[float]:
    """The named efficiency reward, applied group by group (consecutive blocks of ``group_size``).

    Only ``kimi`` depends on the group; the others are per episode. ``none`` is all zeros.
    """
    n = _check_same_length(correct=correct, lengths=lengths)
    if name == "none":
        return [0.0] * n
    if name not in EFFICIENCY_REWARDS:
        raise ValueError(f"unknown efficiency reward {name!r}; choose one of {[*EFFICIENCY_REWARDS, 'none']}")
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} episodes do not split into groups of {group_size}")
    fn = EFFICIENCY_REWARDS[name]
    out: list[float] = []
    for g in range(0, n, group_size):
        out += fn(correct[g : g + group_size], lengths[g : g + group_size], length_target, alpha)
    return out


def reward_components(
    answers: Sequence[str | None],
    references: Sequence[str],
    transcripts: Sequence[str],
    lengths: Sequence[int],
    *,
    group_size: int,
    efficiency: Efficiency,
    length_target: int,
    alpha: float,
) -> dict[str, list[float]]:
    """Each reward term per episode, unweighted: ``{"correctness", "format", "efficiency"}``.

    An episode cut by a rollout cap should be passed with answer None (it counts as wrong).
    """
    _check_same_length(answers=answers, references=references, transcripts=transcripts, lengths=lengths)
    correctness = correctness_reward(answers, references)
    correct = [c == 1.0 for c in correctness]
    return {
        "correctness": correctness,
        "format": format_reward(transcripts),
        "efficiency": efficiency_reward(
            efficiency, correct, lengths, group_size=group_size, length_target=length_target, alpha=alpha
        ),
    }


def combined_reward(
    answers: Sequence[str | None],
    references: Sequence[str],
    transcripts: Sequence[str],
    lengths: Sequence[int],
    *,
    group_size: int,
    efficiency: Efficiency,
    length_target: int,
    alpha: float,
    correctness_weight: float = 1.0,
    format_weight: float = 0.0,
    efficiency_weight: float = 1.0,
) -> list[float]:
    """r = w_c · correctness + w_f · format + w_e · efficiency, per episode."""
    parts = reward_components(
        answers,
        references,
        transcripts,
        lengths,
        group_size=group_size,
        efficiency=efficiency,
        length_target=length_target,
        alpha=alpha,
    )
    return weighted_total(
        parts, {"correctness": correctness_weight, "format": format_weight, "efficiency": efficiency_weight}
    )


def weighted_total(parts: dict[str, list[float]], weights: dict[str, float]) -> list[float]:
    """Σ_k w_k · parts[k][i] per episode, over the terms of ``reward_components``."""
    n = _check_same_length(**parts)
    return [sum(weights[k] * parts[k][i] for k in parts) for i in range(n)]
