"""Chunk: split a long chain-of-thought trace into thoughts (DESIGN §3).

Step 1 cuts the trace into *steps* at blank lines, as the Long⊗Short reference
implementation does (``trace.split("\\n\\n")``), but keeps each separator at the
end of the step before it, so no character is lost.

Step 2 merges consecutive steps into *thoughts*, either

* by rules (default): a step that opens with a discourse marker ("Wait",
  "Alternatively", "Let me verify", "So the answer", ...) starts a new thought,
  any other step continues the current one, and a thought shorter than
  ``min_chars`` joins its neighbour; or
* by a model: it is shown the numbered steps and asked for
  ``{"block k": {"start": i, "end": j, "type": "..."}}`` JSON over step indices.
  An answer that does not parse or does not cover the steps exactly once, in
  order, is retried with another seed; when every try fails the rules decide,
  and the log says why.

Either way chunking never changes the text: ``"".join(t.text for t in thoughts)``
is the trace, and each thought records its character offsets into it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Literal, get_args


from longshort.config import ChunkConfig
from models.protocol import THINK_CLOSE, THINK_OPEN

if TYPE_CHECKING:
    from models.generation import GenerationBackend

log = logging.getLogger(__name__)

ThoughtType = Literal["restate", "plan", "detour", "compute", "verify", "conclude", "other"]
THOUGHT_TYPES: tuple[str, ...] = get_args(ThoughtType)

# Discourse markers that open a new thought, and the kind of thought each one opens.
# Matching picks the longest marker, so "Let me verify" wins over "Let me".
MARKER_TYPES: dict[str, ThoughtType] = {
    "Okay": "restate",
    "Alright": "restate",
    "First": "plan",
    "So the plan": "plan",
    "Hmm": "detour",
    "Alternatively": "detour",
    "Let me compute": "compute",
    "Now": "compute",
    "Wait": "verify",
    "Actually": "verify",
    "But wait": "verify",
    "Let me verify": "verify",
    "Let me check": "verify",
    "Let me double-check": "verify",
    "So the answer": "conclude",
    "Therefore": "conclude",
    "Thus": "conclude",
    "Hence": "conclude",
    "Final Answer": "conclude",
    "But": "other",
    "So,": "other",
    "So the": "other",
    "Let me": "other",
}
DEFAULT_MARKERS: tuple[str, ...] = tuple(MARKER_TYPES)

# A run of blank lines (lines holding at most spaces/tabs) separates two steps.
_STEP_SEP = re.compile(r"\n(?:[ \t\r]*\n)+")
# Markdown decoration that may precede a marker, as in "**Final Answer**".
_LEADING_DECORATION = " \t\r\n*_#>"


@dataclass(frozen=True)
class ThoughtSpan:
    """One thought: ``trace[start:end] == text``."""

    text: str
    start: int
    end: int
    type: ThoughtType


@dataclass(frozen=True)
class Chunking:
    """The thoughts of one trace and how they were found."""

    thoughts: list[ThoughtSpan]
    method: Literal["rules", "llm", "fallback"]  # fallback: every LLM answer was rejected
    attempts: int = 0  # model calls made for this trace
    errors: tuple[str, ...] = ()  # why each rejected model answer was rejected


# --------------------------------------------------------------------------- traces


def thinking_of(response: str) -> str:
    """The thinking part of a long-CoT response.

    ``<think>…</think>``: the text inside (a missing close means a truncated
    trace: everything after ``<think>``). R1 style, where the chat template
    already opened ``<think>`` and the response holds only ``</think>``: the text
    before it. Without tags: the whole response. Newlines next to the tags are
    dropped, as ``models.protocol.parse_turn`` does.
    """
    open_at = response.find(THINK_OPEN)
    if open_at != -1:
        body_start = open_at + len(THINK_OPEN)
        close_at = response.find(THINK_CLOSE, body_start)
        body = response[body_start:] if close_at == -1 else response[body_start:close_at]
        return body.strip("\n")
    close_at = response.find(THINK_CLOSE)
    if close_at != -1:
        return response[:close_at].strip("\n")
    return response


def split_steps(trace: str) -> list[str]:
    """Step 1: cut at blank lines; each step keeps the separator that follows it.

    A trace that opens with blank lines keeps them at the front of its first
    step, so every step but a whitespace-only trace's has visible text.
    ``"".join(split_steps(trace)) == trace``.
    """
    cuts = [m.end() for m in _STEP_SEP.finditer(trace) if m.start() > 0 and m.end() < len(trace)]
    bounds = [0, *cuts, len(trace)]
    return [trace[a:b] for a, b in pairwise(bounds) if b > a]


def marker_of(step: str, markers: Sequence[str] = DEFAULT_MARKERS) -> str | None:
    """The longest marker that opens ``step`` as a whole word (case-sensitive), or None.

    Leading whitespace and markdown decoration (``**``, ``#``, ``>``) are skipped.
    A marker ending in a letter or digit must not run on into one: "Now" does
    not open "Nowhere".
    """
    head = step.lstrip(_LEADING_DECORATION)
    for marker in sorted(markers, key=len, reverse=True):
        if head.startswith(marker):
            nxt = head[len(marker) : len(marker) + 1]
            if not (marker[-1].isalnum() and nxt.isalnum()):
                return marker
    return None


def thought_type(marker: str | None) -> ThoughtType:
    """The kind of thought a marker opens; markers outside ``MARKER_TYPES`` give "other"."""
    return MARKER_TYPES.get(marker, "other") if marker is not None else "other"


def _spans(steps: Sequence[str], blocks: Sequence[tuple[int, int, ThoughtType]]) -> list[ThoughtSpan]:
    """Thoughts from blocks of step indices ``(first, last, type)``, 0-based and inclusive."""
    offsets = [0]
    for step in steps:
        offsets.append(offsets[-1] + len(step))
    return [
        ThoughtSpan("".join(steps[a : b + 1]), offsets[a], offsets[b + 1], kind) for a, b, kind in blocks
    ]


def _content_len(steps: Sequence[str], first: int, last: int) -> int:
    return len("".join(steps[first : last + 1]).strip())


# --------------------------------------------------------------------------- rules


def rule_blocks(
    steps: Sequence[str], markers: Sequence[str] = DEFAULT_MARKERS, min_chars: int = 16
) -> list[tuple[int, int, ThoughtType]]:
    """Step 2 by rules: blocks of step indices ``(first, last, type)``, 0-based, inclusive."""
    blocks: list[list] = []  # [first, last, type]
    for i, step in enumerate(steps):
        marker = marker_of(step, markers)
        if blocks and marker is None:
            blocks[-1][1] = i
        else:
            blocks.append([i, i, thought_type(marker)])
    # A tiny thought joins the one before it; the first joins the one after it.
    merged: list[list] = []
    for block in blocks:
        if merged and _content_len(steps, block[0], block[1]) < min_chars:
            merged[-1][1] = block[1]
        else:
            merged.append(block)
    if len(merged) > 1 and _content_len(steps, merged[0][0], merged[0][1]) < min_chars:
        first = merged.pop(0)
        merged[0][0] = first[0]
    return [(a, b, kind) for a, b, kind in merged]


def chunk_by_rules(trace: str, markers: Sequence[str] = DEFAULT_MARKERS, min_chars: int = 16) -> list[ThoughtSpan]:
    """Split ``trace`` into thoughts at discourse markers; an empty trace has none."""
    steps = split_steps(trace)
    return _spans(steps, rule_blocks(steps, markers, min_chars))


# --------------------------------------------------------------------------- LLM

CHUNK_SYSTEM_PROMPT = (
    "You split a chain of thought into thoughts. A thought is a run of consecutive steps "
    "with one purpose. Thought types: restate (restates the problem), plan, compute, "
    "verify (checks or corrects earlier work), detour (tries another way or a wrong idea), "
    "conclude (states a result), other."
)


def llm_chunk_prompt(steps: Sequence[str]) -> str:
    """The user message: the numbered steps and the JSON shape to answer with."""
    numbered = "\n\n".join(f"[{k}] {step.strip()}" for k, step in enumerate(steps, start=1))
    n = len(steps)
    return (
        f"Here are the {n} steps of a chain of thought.\n\n{numbered}\n\n"
        f"Group steps 1 to {n} into thoughts. Every step belongs to exactly one thought, "
        "thoughts are contiguous and listed in order. Answer with JSON only, like\n"
        '{"block 1": {"start": 1, "end": 3, "type": "restate"}, '
        '"block 2": {"start": 4, "end": 4, "type": "compute"}, ...}'
    )


class BlockError(ValueError):
    """A model's answer that is not a valid set of thought blocks."""


def parse_blocks(output: str, n_steps: int) -> list[tuple[int, int, ThoughtType]]:
    """Validate a model's ``{"block k": {start, end, type}}`` answer over steps 1..n_steps.

    Returns 0-based inclusive ``(first, last, type)``; raises BlockError saying
    what is wrong. An unknown or missing type becomes "other".
    """
    if THINK_CLOSE in output:  # a reasoning model may think before it answers
        output = output[output.rfind(THINK_CLOSE) + len(THINK_CLOSE) :]
    elif THINK_OPEN in output:
        raise BlockError(f"the answer is still thinking: {THINK_OPEN} without {THINK_CLOSE}")
    lo, hi = output.find("{"), output.rfind("}")
    if lo == -1 or hi < lo:
        raise BlockError(f"no JSON object in the answer: {output[:60]!r}")
    try:
        data = json.loads(output[lo : hi + 1])
    except json.JSONDecodeError as exc:
        raise BlockError(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, dict) or not data:
        raise BlockError(f"expected a non-empty JSON object of blocks, got {type(data).__name__}")
    blocks: list[tuple[int, int, ThoughtType]] = []
    next_step = 1
    for name, block in data.items():
        if not isinstance(block, dict):
            raise BlockError(f"{name!r}: expected an object with start and end, got {type(block).__name__}")
        start, end = block.get("start"), block.get("end")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
            raise BlockError(f"{name!r}: start and end must be integers, got {start!r} and {end!r}")
        if start > end:
            raise BlockError(f"{name!r}: start {start} is after end {end}")
        if start < next_step:
            raise BlockError(f"{name!r}: starts at step {start}, which an earlier block already covers")
        if start > next_step:
            raise BlockError(f"{name!r}: steps {next_step}..{start - 1} are in no block")
        if end > n_steps:
            raise BlockError(f"{name!r}: ends at step {end}, but there are {n_steps} steps")
        kind = block.get("type")
        kind = kind.strip().lower() if isinstance(kind, str) else "other"
        blocks.append((start - 1, end - 1, kind if kind in THOUGHT_TYPES else "other"))
        next_step = end + 1
    if next_step <= n_steps:
        raise BlockError(f"steps {next_step}..{n_steps} are in no block")
    return blocks


TOKENS_PER_STEP = 32  # the least answer cap per step of a trace: '"block 12": {"start": 30, "end": 34, "type": "verify"},'


def chunk_traces_by_llm(
    traces: Sequence[str],
    backend: GenerationBackend,
    *,
    markers: Sequence[str] = DEFAULT_MARKERS,
    min_chars: int = 16,
    max_retries: int = 5,
    max_new_tokens: int = 2048,
    temperature: float = 0.6,
    seed: int = 0,
) -> list[Chunking]:
    """Step 2 by a model, batched over traces.

    Each round sends one prompt per trace still without valid blocks, with seed
    ``seed + round``; a trace gets at most ``1 + max_retries`` tries, then the
    rules decide. Traces with fewer than two steps need no model. A trace of n steps
    may answer in ``max(max_new_tokens, TOKENS_PER_STEP * n)`` tokens; an invalid answer
    cut off there goes to the rules at once (its retries would be cut off as well).
    """
    steps_of = [split_steps(t) for t in traces]
    results: list[Chunking | None] = [None] * len(traces)
    errors: list[list[str]] = [[] for _ in traces]
    pending, given_up = [], []
    for i, steps in enumerate(steps_of):
        if len(steps) < 2:
            results[i] = Chunking(_spans(steps, rule_blocks(steps, markers, min_chars)), "rules")
        else:
            pending.append(i)
    for attempt in range(1 + max_retries):
        if not pending:
            break
        prompts = [backend.chat_prompt(CHUNK_SYSTEM_PROMPT, llm_chunk_prompt(steps_of[i])) for i in pending]
        caps = [max(max_new_tokens, TOKENS_PER_STEP * len(steps_of[i])) for i in pending]
        outs = backend.generate(prompts, max_new_tokens=caps, temperature=temperature, seed=seed + attempt)
        still = []
        for i, cap, out in zip(pending, caps, outs, strict=True):
            try:
                blocks = parse_blocks(out[0].text, len(steps_of[i]))
            except BlockError as exc:
                cut = out[0].finish_reason == "length"
                note = f" (cut off at {cap} new tokens: raise chunk.llm_max_new_tokens)" if cut else ""
                errors[i].append(f"try {attempt + 1}: {exc}{note}")
                log.debug("chunk: trace %d: %s", i, errors[i][-1])
                if not cut:
                    still.append(i)
                else:
                    given_up.append(i)
                continue
            results[i] = Chunking(_spans(steps_of[i], blocks), "llm", attempt + 1, tuple(errors[i]))
        pending = still
    for i in sorted([*pending, *given_up]):
        log.warning(
            "chunk: trace %d: %d model answers rejected, using the rules (%s)",
            i, len(errors[i]), "; ".join(errors[i]),
        )  # fmt: skip
        thoughts = _spans(steps_of[i], rule_blocks(steps_of[i], markers, min_chars))
        results[i] = Chunking(thoughts, "fallback", len(errors[i]), tuple(errors[i]))
    return [r for r in results if r is not None]


# --------------------------------------------------------------------------- entry points


def chunk_traces(
    traces: Sequence[str], cfg: ChunkConfig, backend: GenerationBackend | None = None, *, seed: int = 0
) -> list[Chunking]:
    """Chunk many traces the configured way (``backend`` is needed for ``method: llm``)."""
    markers = cfg.markers or DEFAULT_MARKERS
    if cfg.method == "rules":
        return [Chunking(chunk_by_rules(t, markers, cfg.min_chars), "rules") for t in traces]
    if backend is None:
        raise ValueError("chunk.method is 'llm' but no generation backend was given")
    return chunk_traces_by_llm(
        traces,
        backend,
        markers=markers,
        min_chars=cfg.min_chars,
        max_retries=cfg.llm_max_retries,
        max_new_tokens=cfg.llm_max_new_tokens,
        temperature=cfg.llm_temperature,
        seed=seed,
    )


def chunk_trace(
    trace: str, cfg: ChunkConfig | None = None, backend: GenerationBackend | None = None, *, seed: int = 0
) -> list[ThoughtSpan]:
    """The thoughts of one trace; ``"".join(t.text for t in result) == trace``."""
    return chunk_traces([trace], cfg or ChunkConfig(), backend, seed=seed)[0].thoughts


def chunk_rows(
    rows: Sequence[dict], cfg: ChunkConfig, backend: GenerationBackend | None = None, *, seed: int = 0
) -> list[dict]:
    """Rows of ``{id, problem, answer, response}`` -> ``{id, problem, answer, thoughts, types}``.

    ``thoughts`` are the exact texts of the thinking's thoughts (joined, they give
    ``thinking_of(response)`` back); only public fields are read.
    """
    chunkings = chunk_traces([thinking_of(r["response"]) for r in rows], cfg, backend, seed=seed)
    return [
        {
            "id": r["id"],
            "problem": r["problem"],
            "answer": r["answer"],
            "thoughts": [t.text for t in c.thoughts],
            "types": [t.type for t in c.thoughts],
            "chunk_method": c.method,
        }
        for r, c in zip(rows, chunkings, strict=True)
    ]
