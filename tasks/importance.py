"""Monte Carlo thought importance (DESIGN §3 "Score (Monte Carlo)").

For a trace with thoughts t_1 … t_n, the prefix P_k is the thinking up to the
end of t_k (P_0 = empty thinking). From each prefix the rollout model is forced
to answer: the prompt is the base chat prompt for the problem followed by
``answer_prefix(P_k)`` (``<think>\\nP_k\\n</think>\\n``), and the model writes the
``<answer>…</answer>`` turn. With N rollouts per prefix,

    acc_k = N_k^right / N,   c_k = tokens of P_k (c_0 = 0),   δ(c) = exp(−c / L_δ) ∈ (0, 1],

    s_k = acc_k · δ(c_k) − acc_{k−1} · δ(c_{k−1})   ∈ [−1, 1],   k = 1 … n.

A thought earns the accuracy it adds and pays for the tokens it costs. The
scores telescope: Σ_k s_k = acc_n · δ(c_n) − acc_0. The paper (Long⊗Short,
arXiv 2505.11827) does not publish its formula; this one is ours.

Scoring reads only ``{id, problem, answer, thoughts: [str]}``. The demo
teacher's hidden ``essential`` labels are for evaluation (``auroc``) only.
All prefixes of a shard of traces go through the backend in one ``generate``
call, whose ``n`` rollouts per prefix share the prefix's encoding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from longshort.config import ScoreConfig
from models.generation import GenerationBackend, PrefixMode
from models.protocol import STOP_STRINGS, SYSTEM_PROMPTS, ProtocolError, answer_prefix, parse_turn
from tasks.answers import is_correct

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoredTrace:
    """Per-prefix rollout results (index k = 0 … n) and per-thought importance (k = 1 … n)."""

    id: str
    acc: list[float]  # acc_k, n + 1 values
    context_tokens: list[int]  # c_k, n + 1 values, c_0 = 0
    rollout_tokens: list[float]  # mean tokens of the rollouts from P_k, n + 1 values
    importance: list[float]  # s_k, n values
    n_rollouts: int


def decay(context_tokens: float, L_delta: float) -> float:
    """δ(c) = exp(−c / L_δ)."""
    return math.exp(-context_tokens / L_delta)


def importance_scores(acc: Sequence[float], context_tokens: Sequence[float], L_delta: float) -> list[float]:
    """s_k = acc_k·δ(c_k) − acc_{k−1}·δ(c_{k−1}) for k = 1 … n (DESIGN §3), δ(c) = exp(−c/L_δ).

    ``acc`` and ``context_tokens`` hold the n + 1 prefixes P_0 … P_n.
    """
    if len(acc) != len(context_tokens):
        raise ValueError(f"importance_scores: {len(acc)} accuracies but {len(context_tokens)} context lengths")
    if L_delta <= 0:
        raise ValueError(f"importance_scores: L_delta must be > 0, got {L_delta}")
    value = [a * decay(c, L_delta) for a, c in zip(acc, context_tokens, strict=True)]
    return [b - a for a, b in pairwise(value)]


def prefix_thinkings(thoughts: Sequence[str]) -> list[str]:
    """The thinking of P_0 … P_n: the thoughts joined exactly as in the trace (chunker
    thoughts carry their separators, ``"".join`` gives the trace back), less the blank
    lines that separate the last of them from the next."""
    return ["".join(thoughts[:k]).rstrip() for k in range(len(thoughts) + 1)]


def _checked_trace(trace: Mapping[str, Any], where: str) -> tuple[str, str, str, list[str]]:
    for field in ("id", "problem", "answer"):
        if not isinstance(trace.get(field), str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(trace.get(field)).__name__}")
    thoughts = trace.get("thoughts")
    if not isinstance(thoughts, list) or not all(isinstance(t, str) for t in thoughts):
        # Thought records (dicts) are refused on purpose: scoring must not see hidden labels.
        raise ValueError(f"{where} ({trace['id']}): field 'thoughts' must be a list of strings")
    return trace["id"], trace["problem"], trace["answer"], thoughts


def rollout_prompt(head: str, thinking: str, answer_probe: str = "") -> str:
    """The prompt of a rollout from the prefix ``thinking``: the thinking is closed at once and the
    model must answer (``answer_prefix``). ``answer_probe`` starts the answer turn for it (e.g. the
    demo's ``<answer>The final number is \\boxed{``), so that a model that only ever answered after a
    whole trace still answers from a partial one instead of drifting back into thinking.
    """
    return head + answer_prefix(thinking) + answer_probe


def rollout_correct(text: str, reference: str) -> bool:
    """A rollout is right when its last turn is a well-formed final ``<answer>`` whose boxed answer matches."""
    try:
        turn = parse_turn("short", text)
    except ProtocolError:
        return False
    return turn.kind == "final" and is_correct(turn.answer, reference)


_CUT_OFF_WARN = 0.1  # share of a shard's rollouts cut off by score.max_new_tokens above which the run warns


def score_traces(
    backend: GenerationBackend,
    traces: Sequence[Mapping[str, Any]],
    cfg: ScoreConfig,
    *,
    prefix: PrefixMode = "shared",
    first_shard: int = 0,
) -> list[ScoredTrace]:
    """Score every thought of every trace; one ``generate`` call per shard of ``cfg.shard_size`` traces.

    Shard ``k`` samples with seed ``cfg.seed + first_shard + k``: a pipeline that scores its shards one
    call at a time passes each one's index as ``first_shard``, so that shards draw independent rollouts
    (with one seed, the i-th prompt of every shard would share its random draws) and get the numbers
    one call over all the traces would. ``prefix`` is passed to the backend only when it is not the
    default (the benchmark's naive baseline uses ``"separate"``).
    """
    log.info(
        "score: %d traces, N=%d rollouts, L_delta=%g, temperature=%g, top_p=%g",
        len(traces), cfg.n_rollouts, cfg.L_delta, cfg.temperature, cfg.top_p,
    )  # fmt: skip
    checked = [_checked_trace(t, f"trace {i}") for i, t in enumerate(traces)]
    extra = {} if prefix == "shared" else {"prefix": prefix}
    scored: list[ScoredTrace] = []
    for shard_no, first in enumerate(range(0, len(checked), cfg.shard_size), start=first_shard):
        shard = checked[first : first + cfg.shard_size]
        prompts, owners = [], []
        thinkings_of = []
        for t, (_, problem, _, thoughts) in enumerate(shard):
            head = backend.chat_prompt(SYSTEM_PROMPTS["base"], problem)
            thinkings = prefix_thinkings(thoughts)
            thinkings_of.append(thinkings)
            prompts += [rollout_prompt(head, thinking, cfg.answer_probe) for thinking in thinkings]
            owners += [t] * len(thinkings)
        outs = backend.generate(
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            stop=STOP_STRINGS["base"],
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            n=cfg.n_rollouts,
            seed=cfg.seed + shard_no,  # shard_no counts from first_shard
            **extra,
        )
        cut = sum(c.finish_reason == "length" for rs in outs for c in rs)
        if cut > _CUT_OFF_WARN * cfg.n_rollouts * len(prompts):
            # a rollout cut off before its \\boxed{} counts as wrong: acc_k is then the cap's doing, not the prefix's
            log.warning(
                "score: %d of %d rollouts of shard %d hit score.max_new_tokens=%d before the answer ended and count "
                "as wrong; raise it, or start the answer at the box with score.answer_probe",
                cut, cfg.n_rollouts * len(prompts), shard_no, cfg.max_new_tokens,
            )  # fmt: skip
        at = 0
        for (trace_id, _, reference, _), thinkings in zip(shard, thinkings_of, strict=True):
            rollouts = outs[at : at + len(thinkings)]
            at += len(thinkings)
            acc = [sum(rollout_correct(cfg.answer_probe + c.text, reference) for c in rs) / len(rs) for rs in rollouts]
            tokens = [sum(c.n_tokens for c in rs) / len(rs) for rs in rollouts]
            context = [backend.count_tokens(th) if th else 0 for th in thinkings]
            scored.append(
                ScoredTrace(
                    id=trace_id,
                    acc=acc,
                    context_tokens=context,
                    rollout_tokens=tokens,
                    importance=importance_scores(acc, context, cfg.L_delta),
                    n_rollouts=cfg.n_rollouts,
                )
            )
        log.info("score: shard %d done (%d traces, %d prefixes)", shard_no, len(shard), len(prompts))
    return scored


def score_trace(backend: GenerationBackend, trace: Mapping[str, Any], cfg: ScoreConfig) -> ScoredTrace:
    """Score one trace (see ``score_traces``)."""
    return score_traces(backend, [trace], cfg)[0]


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` against binary ``labels``, by ranks.

    AUROC = (R₊ − n₊(n₊+1)/2) / (n₊·n₋), R₊ the sum of the positives' ranks
    (Mann–Whitney U); tied scores share their average rank, so a tie between a
    positive and a negative counts one half. Evaluation only (the demo's hidden
    ``essential`` labels).
    """
    if len(scores) != len(labels):
        raise ValueError(f"auroc: {len(scores)} scores but {len(labels)} labels")
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc: needs both classes, got {n_pos} positive and {n_neg} negative labels")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1  # 1-based average rank of the tie group
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels, strict=True) if y)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def score_rows(
    backend: GenerationBackend, rows: Sequence[Mapping[str, Any]], cfg: ScoreConfig, *, first_shard: int = 0
) -> list[dict[str, Any]]:
    """Chunked rows ``{id, problem, answer, thoughts, ...}`` with their scores added, jsonl-ready
    (``first_shard``: see :func:`score_traces`)."""
    scored = score_traces(backend, rows, cfg, first_shard=first_shard)
    return [
        {
            **{k: row[k] for k in ("id", "problem", "answer", "thoughts")},
            "acc": s.acc,
            "context_tokens": s.context_tokens,
            "rollout_tokens": s.rollout_tokens,
            "importance": s.importance,
            "n_rollouts": s.n_rollouts,
            "L_delta": cfg.L_delta,
        }
        for row, s in zip(rows, scored, strict=True)
    ]


def score_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean acc_0 (no thinking), mean acc_n (the whole trace) and thoughts per trace over scored rows."""
    if not rows:
        return {"traces": 0.0}
    n = len(rows)
    return {
        "traces": float(n),
        "acc_0": sum(r["acc"][0] for r in rows) / n,
        "acc_n": sum(r["acc"][-1] for r in rows) / n,
        "thoughts_per_trace": sum(len(r["thoughts"]) for r in rows) / n,
        "rollout_tokens": sum(sum(r["rollout_tokens"]) / len(r["rollout_tokens"]) for r in rows) / n,
    }
