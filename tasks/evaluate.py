"""Evaluate a single long-CoT model on held-out problems: accuracy and tokens.

``think=True`` lets the model reason as trained; ``think=False`` forces an empty
``<think></think>`` and lets it answer directly, which shows how much the
thoughts matter. Both sample as the evaluation does (``evaluate.k`` samples per
problem at ``evaluate.temperature``, the run's seed), so their rows sit beside
the evaluate stage's on equal terms.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from longshort.config import ProtocolConfig
from models.generation import GenerationBackend
from models.protocol import (
    STOP_STRINGS,
    SYSTEM_PROMPTS,
    Episode,
    ProtocolError,
    answer_prefix,
    parse_response,
    parse_turn,
    run_episodes,
)
from tasks.answers import check_answer, is_correct


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
    k: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
) -> tuple[SingleModelResult, list[dict[str, Any]]]:
    """k responses per problem (greedy by default); the summary and one record per response.

    Every problem gets the same k, so ``accuracy`` (over responses) is Mean@k.
    """
    prompts = [backend.chat_prompt(SYSTEM_PROMPTS["base"], r["problem"]) for r in rows]
    if not think:
        prompts = [p + answer_prefix("") for p in prompts]
    outs = backend.generate(
        prompts, max_new_tokens=max_new_tokens, stop=STOP_STRINGS["base"], temperature=temperature, n=k, seed=seed
    )
    records = []
    for row, completion, sample in (
        (row, c, i) for row, out in zip(rows, outs, strict=True) for i, c in enumerate(out)
    ):
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
                "sample": sample,
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


# --------------------------------------------------------------------------- systems side by side


def response_answer(text: str) -> tuple[str | None, bool]:
    """(boxed answer, well formed) of one long-CoT response; one that breaks the protocol is (None, False)."""
    try:
        _, final = parse_response(text)
    except ProtocolError:
        return None, False
    return final.answer, True


def single_model_records(
    backend: GenerationBackend,
    rows: list[dict[str, Any]],
    *,
    benchmark: str,
    system: str,
    k: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 512,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """k sampled responses of one long-CoT model per problem, as ``tasks.metrics`` records.

    A single model's response is all its own tokens, so they count as ``tokens_long``.
    """
    prompts = [backend.chat_prompt(SYSTEM_PROMPTS["base"], r["problem"]) for r in rows]
    outs = backend.generate(
        prompts, max_new_tokens=max_new_tokens, stop=STOP_STRINGS["base"], temperature=temperature, n=k, seed=seed
    )
    records = []
    for row, completions in zip(rows, outs, strict=True):
        for sample, completion in enumerate(completions):
            answer, well_formed = response_answer(completion.text)
            records.append(
                {
                    "benchmark": benchmark,
                    "system": system,
                    "problem_id": row["id"],
                    "sample": sample,
                    "correct": well_formed and check_answer(answer, row.get("kind", "math"), row["answer"]),
                    "tokens_long": completion.n_tokens,
                    "tokens_short": 0,
                    "turns": 1,
                    "well_formed": well_formed,
                    "answer": answer,
                }
            )
    return records


def pair_records(
    long_backend: GenerationBackend,
    short_backend: GenerationBackend,
    rows: list[dict[str, Any]],
    protocol: ProtocolConfig,
    *,
    benchmark: str,
    system: str,
    k: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[Episode]]:
    """k Long⊗Short episodes per problem through the turn protocol, as ``tasks.metrics`` records.

    An episode that ends without ``</answer>`` (turn cap, malformed turn) is wrong. The k copies of a
    problem go out as k identical prompts in one call per turn; they are k different samples because
    every backend gives each prompt its own random draw (vLLM: a seed per prompt, ``vllm_request_seeds``).
    """
    problems = [r for r in rows for _ in range(k)]
    episodes = run_episodes(
        [r["problem"] for r in problems],
        long_backend,
        short_backend,
        max_turns=protocol.max_turns,
        max_new_tokens_long=protocol.max_new_tokens_long,
        max_new_tokens_short=protocol.max_new_tokens_short,
        temperature=temperature,
        seed=seed,
    )
    records = []
    for i, (row, episode) in enumerate(zip(problems, episodes, strict=True)):
        records.append(
            {
                "benchmark": benchmark,
                "system": system,
                "problem_id": row["id"],
                "sample": i % k,
                "correct": episode.well_formed and check_answer(episode.answer, row.get("kind", "math"), row["answer"]),
                "tokens_long": episode.tokens("long"),
                "tokens_short": episode.tokens("short"),
                "turns": len(episode.turns),
                "well_formed": episode.well_formed,
                "answer": episode.answer,
                "stop_reason": episode.stop_reason,
            }
        )
    return records, episodes
