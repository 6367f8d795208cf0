"""Evaluate a single long-CoT model on held-out problems: accuracy and tokens.

``think=True`` lets the model reason as trained; ``think=False`` forces an empty
``<think></think>`` and lets it answer directly, which shows how much the
thoughts matter.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from models.generation import GenerationBackend
from models.protocol import (
    STOP_STRINGS,
    SYSTEM_PROMPTS,
    ProtocolError,
    answer_prefix,
    parse_response,
    parse_turn,
)
from tasks.answers import is_correct


@dataclass(frozen=True)
class SingleModelResult:
    accuracy: float
    mean_tokens: float
    well_formed: float
    n: int

    def metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}accuracy": self.accuracy,
            f"{prefix}mean_tokens": self.mean_tokens,
            f"{prefix}well_formed": self.well_formed,
            f"{prefix}n": float(self.n),
        }


def evaluate_single_model(
    backend: GenerationBackend,
    rows: list[dict[str, Any]],
    *,
    think: bool = True,
    max_new_tokens: int = 512,
    seed: int = 0,
) -> tuple[SingleModelResult, list[dict[str, Any]]]:
    """Greedy-decode every problem once; return the summary and one record per problem."""
    prompts = [backend.chat_prompt(SYSTEM_PROMPTS["base"], r["problem"]) for r in rows]
    if not think:
        prompts = [p + answer_prefix("") for p in prompts]
    outs = backend.generate(prompts, max_new_tokens=max_new_tokens, stop=STOP_STRINGS["base"], seed=seed)
    records = []
    for row, out in zip(rows, outs):
        completion = out[0]
        answer, error = None, None
        try:
            if think:
                _, final = parse_response(completion.text)
            else:
                final = parse_turn("short", completion.text)
                if final.kind != "final":
                    raise ProtocolError("expected a final <answer> turn")
            answer = final.answer
        except ProtocolError as exc:
            error = str(exc)
        records.append(
            {
                "id": row["id"],
                "reference": row["answer"],
                "predicted": answer,
                "correct": is_correct(answer, row["answer"]),
                "tokens": completion.n_tokens,
                "finish_reason": completion.finish_reason,
                "error": error,
                "completion": completion.text,
            }
        )
    n = len(records)
    result = SingleModelResult(
        accuracy=sum(r["correct"] for r in records) / n,
        mean_tokens=statistics.fmean(r["tokens"] for r in records),
        well_formed=sum(r["error"] is None for r in records) / n,
        n=n,
    )
    return result, records
